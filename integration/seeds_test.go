//go:build integration

package integration

// TestCaptureSeeds runs real sessions and keeps their bytes: real NBD
// clients (nbdinfo, qemu-io, nbdcopy) against a Primary's export through a
// recording Unix-socket proxy, and the peer link between two daemons
// through a recording TCP proxy (initial sync, replicated writes, a
// disconnect with writes and the resync after it, an online verify, the
// orderly end). It checks what it captured as a peer would: every frame
// well formed (no compression, a payload within bounds), every handshake
// message and every replication message decoding, and re-encoding to its
// own bytes. With -update-seeds it writes the captured inputs as seed
// corpus files (session-*) of the fuzz targets of nbd, transport and
// replicator/wire; without it, it checks that those files are there and
// well formed.

import (
	"bytes"
	binenc "encoding/binary"
	"flag"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the session-* seed corpus files of the fuzz targets")

// tapConn is one proxied connection's bytes in each direction.
type tapConn struct {
	name   string // what opened it
	up     bytes.Buffer
	down   bytes.Buffer
	closed chan struct{}
}

// tap is a recording proxy: it accepts on l, dials target for each
// connection and copies both ways, keeping every byte.
type tap struct {
	l      net.Listener
	dial   func() (net.Conn, error)
	mu     sync.Mutex
	conns  []*tapConn
	label  string
	wg     sync.WaitGroup
	active map[net.Conn]struct{}
}

func newTap(t *testing.T, l net.Listener, dial func() (net.Conn, error)) *tap {
	tp := &tap{l: l, dial: dial, active: map[net.Conn]struct{}{}}
	tp.wg.Go(tp.accept)
	t.Cleanup(func() {
		l.Close()
		tp.mu.Lock()
		for c := range tp.active {
			c.Close()
		}
		tp.mu.Unlock()
		tp.wg.Wait()
	})
	return tp
}

// setLabel names the connections accepted from now on.
func (tp *tap) setLabel(s string) {
	tp.mu.Lock()
	tp.label = s
	tp.mu.Unlock()
}

func (tp *tap) accept() {
	for {
		c, err := tp.l.Accept()
		if err != nil {
			return
		}
		s, err := tp.dial()
		if err != nil {
			c.Close()
			continue
		}
		tc := &tapConn{closed: make(chan struct{})}
		tp.mu.Lock()
		tc.name = tp.label
		tp.conns = append(tp.conns, tc)
		tp.active[c], tp.active[s] = struct{}{}, struct{}{}
		tp.mu.Unlock()
		tp.wg.Go(func() {
			var both sync.WaitGroup
			copyHalf := func(dst, src net.Conn, rec *bytes.Buffer) {
				buf := make([]byte, 64<<10)
				for {
					n, err := src.Read(buf)
					if n > 0 {
						tp.mu.Lock()
						rec.Write(buf[:n])
						tp.mu.Unlock()
						if _, werr := dst.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				// Pass the end on, then let the other half finish.
				if cw, ok := dst.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				} else {
					dst.Close()
				}
			}
			both.Go(func() { copyHalf(s, c, &tc.up) })
			both.Go(func() { copyHalf(c, s, &tc.down) })
			both.Wait()
			c.Close()
			s.Close()
			tp.mu.Lock()
			delete(tp.active, c)
			delete(tp.active, s)
			tp.mu.Unlock()
			close(tc.closed)
		})
	}
}

// finished returns the connections labelled name, once all have closed.
func (tp *tap) finished(t *testing.T, name string) []*tapConn {
	t.Helper()
	tp.mu.Lock()
	var cs []*tapConn
	for _, c := range tp.conns {
		if c.name == name {
			cs = append(cs, c)
		}
	}
	tp.mu.Unlock()
	for _, c := range cs {
		select {
		case <-c.closed:
		case <-time.After(30 * time.Second):
			t.Fatalf("a %s connection through the tap did not end", name)
		}
	}
	return cs
}

// seedFile is one corpus file: its name and the go fuzz v1 lines.
type seedFile struct {
	dir, name string // dir: package/testdata/fuzz/Target
	values    []string
}

func (s seedFile) text() string {
	return "go test fuzz v1\n" + strings.Join(s.values, "\n") + "\n"
}

func bytesValue(b []byte) string { return fmt.Sprintf("[]byte(%q)", b) }

// nbdSplit parses a client's bytes: the client flags and options up to the
// first GO or EXPORT_NAME (negotiation), then requests with their write
// payloads (transmission), each request header also returned.
func nbdSplit(t *testing.T, b []byte) (neg, xmit []byte, reqs [][]byte) {
	t.Helper()
	if len(b) < 4 {
		t.Fatalf("client sent %d bytes, not even its flags", len(b))
	}
	p := 4
	for {
		if len(b)-p < 16 {
			if p != len(b) {
				t.Fatalf("option header cut at byte %d of %d", p, len(b))
			}
			return b, nil, nil // negotiation only (LIST, INFO, ABORT)
		}
		if m := binenc.BigEndian.Uint64(b[p:]); m != 0x49484156454f5054 {
			t.Fatalf("option at byte %d: magic %#x", p, m)
		}
		opt, n := binenc.BigEndian.Uint32(b[p+8:]), int(binenc.BigEndian.Uint32(b[p+12:]))
		p += 16 + n
		if p > len(b) {
			t.Fatalf("option %d of %d bytes runs past the %d bytes sent", opt, n, len(b))
		}
		if opt == 7 || opt == 1 { // GO, EXPORT_NAME
			break
		}
	}
	neg, xmit = b[:p], b[p:]
	for q := 0; q < len(xmit); {
		if len(xmit)-q < 28 || binenc.BigEndian.Uint32(xmit[q:]) != 0x25609513 {
			t.Fatalf("request at byte %d of the transmission is malformed", q)
		}
		hdr := xmit[q : q+28]
		reqs = append(reqs, hdr)
		q += 28
		if binenc.BigEndian.Uint16(hdr[6:]) == 1 { // WRITE
			q += int(binenc.BigEndian.Uint32(hdr[24:]))
		}
		if q > len(xmit) {
			t.Fatalf("write payload runs past the end of the transmission")
		}
	}
	return neg, xmit, reqs
}

// frame is one peer-protocol frame as sent: header, payload, trailer.
type frame struct {
	typ  transport.Type
	raw  []byte // the whole frame
	body []byte // the payload
}

// peerFrames splits a plain peer stream into frames (8-byte header, payload,
// 8-byte checksum), checking each header as a receiver would. A stream that
// ends inside a frame (a connection torn down mid-send) reports how many
// bytes of it were sent.
func peerFrames(t *testing.T, b []byte) (fs []frame, cut int) {
	t.Helper()
	for p := 0; p < len(b); {
		if len(b)-p < 8 {
			return fs, len(b) - p
		}
		typ, flags, n := binenc.BigEndian.Uint16(b[p:]), binenc.BigEndian.Uint16(b[p+2:]), int(binenc.BigEndian.Uint32(b[p+4:]))
		if flags != 0 || n > transport.MaxPayload {
			t.Fatalf("frame at byte %d: type %d, flags %#x, %d bytes", p, typ, flags, n)
		}
		end := p + 8 + n + 8
		if end > len(b) {
			return fs, len(b) - p
		}
		fs = append(fs, frame{typ: transport.Type(typ), raw: b[p:end], body: b[p+8 : p+8+n]})
		p = end
	}
	return fs, 0
}

// Transport frame types (transport/doc.go).
const (
	frameHello   = 1
	frameAck     = 2
	frameAuth    = 3
	frameOK      = 4
	frameRefuse  = 5
	appTypesFrom = 16
)

func TestCaptureSeeds(t *testing.T) {
	need(t, "nbdinfo", "qemu-io", "nbdcopy")
	dir := t.TempDir()
	const size = 16 * mib
	alphaPort, betaPort, deadPort := freePort(t), freePort(t), freePort(t)

	// The peer link: alpha dials beta through the tap; beta's dials go
	// nowhere, so the one session is alpha's, and all of it is seen. The
	// ping timeout is 5 s: the proxy, two race-detector daemons and the
	// resync share two CPUs, and a 500 ms one cut sessions here.
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peerTap := newTap(t, pl, func() (net.Conn, error) {
		return net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", betaPort))
	})
	tapPort := pl.Addr().(*net.TCPAddr).Port
	type dnode struct {
		name, dir, conf, run string
		d                    *proc
	}
	mk := func(name string, alphaAt, betaAt int) *dnode {
		n := &dnode{name: name, dir: filepath.Join(dir, name)}
		os.MkdirAll(n.dir, 0o755)
		n.conf, n.run = filepath.Join(n.dir, "nbdmirror.conf"), filepath.Join(n.dir, "run")
		disk := sparseFile(t, n.dir, "d0", size)
		conf := fmt.Sprintf("resource r0 { net { verify-alg sha256; ping-timeout 50; } disk { c-plan-ahead 0; resync-rate 100M; }\n"+
			"  disk %s; meta-disk internal;\n"+
			"  on alpha { address 127.0.0.1:%d; } on beta { address 127.0.0.1:%d; } }\n", disk, alphaAt, betaAt)
		if err := os.WriteFile(n.conf, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		return n
	}
	alpha, beta := mk("alpha", alphaPort, tapPort), mk("beta", deadPort, betaPort)
	cli := func(n *dnode, args ...string) string {
		t.Helper()
		code, out, errOut := runCLI(t, 2*time.Minute, append([]string{"--config", n.conf, "--node", n.name, "--run-dir", n.run}, args...))
		if code != 0 {
			t.Fatalf("%s: nbdmirror %s: exit %d: %s%s", n.name, strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	for _, n := range []*dnode{alpha, beta} {
		cli(n, "create-md", "r0")
		args := []string{"--config", n.conf, "--node", n.name, "--run-dir", n.run, "--log-level", "debug", "daemon", "--up", "r0"}
		n.d = startEnv(t, []string{"NOTIFY_SOCKET="}, binary, args...)
		waitUnix(t, n.d, filepath.Join(n.run, "control.sock"))
	}
	peerTap.setLabel("peer")
	cli(alpha, "wait-connect", "--timeout", "60s", "r0")
	cli(alpha, "primary", "--force", "r0")
	cli(alpha, "wait-sync", "--timeout", "120s", "r0")

	// NBD clients through the tap in front of alpha's export.
	nl, err := net.Listen("unix", filepath.Join(dir, "tap.sock"))
	if err != nil {
		t.Fatal(err)
	}
	nbdTap := newTap(t, nl, func() (net.Conn, error) { return net.Dial("unix", filepath.Join(alpha.run, "nbd.sock")) })
	uri := "nbd+unix:///r0?socket=" + filepath.Join(dir, "tap.sock")
	src := filepath.Join(dir, "src.img")
	if err := os.WriteFile(src, bytes.Repeat([]byte("nbdmirror seed "), 64<<10/15+1)[:64<<10], 0o644); err != nil {
		t.Fatal(err)
	}
	clients := []struct {
		name string
		cmd  []string
	}{
		{"nbdinfo", []string{"nbdinfo", uri}},
		{"nbdinfo-list", []string{"nbdinfo", "--list", "nbd+unix:///?socket=" + filepath.Join(dir, "tap.sock")}},
		{"qemu-io", []string{"qemu-io", "-f", "raw", "-d", "unmap",
			"-c", "write -P 0xa5 0 4k", "-c", "read -P 0xa5 0 4k", "-c", "write -z 4k 4k", "-c", "discard 8k 4k",
			"-c", "write -P 0x5a -f 12k 4k", "-c", "flush", uri}},
		{"nbdcopy", []string{"nbdcopy", "--flush", "--connections=1", src, uri}},
	}
	for _, c := range clients {
		nbdTap.setLabel(c.name)
		run(t, time.Minute, c.cmd[0], c.cmd[1:]...)
	}
	// A disconnect with writes behind it: the reconnect exchanges bitmaps
	// and resyncs them. Then an online verify.
	cli(alpha, "disconnect", "r0")
	nbdTap.setLabel("qemu-io-disconnected")
	run(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 0x33 1m 8k", "-c", "write -P 0x44 5m 4k", uri)
	cli(alpha, "connect", "r0")
	cli(alpha, "wait-sync", "--timeout", "120s", "r0")
	cli(alpha, "verify", "r0")
	cli(alpha, "wait-sync", "--timeout", "120s", "r0")
	cli(alpha, "secondary", "r0")
	cli(alpha, "down", "r0")
	cli(beta, "down", "r0")
	for _, n := range []*dnode{alpha, beta} {
		if err := n.d.stop(syscall.SIGTERM); err != nil {
			t.Fatalf("%s daemon: %v", n.name, err)
		}
	}

	var seeds []seedFile
	add := func(dir, name string, values ...string) {
		for _, s := range seeds { // one file per distinct input
			if s.dir == dir && slices.Equal(s.values, values) {
				return
			}
		}
		seeds = append(seeds, seedFile{dir, name, values})
	}

	// NBD: negotiation, transmission, and one request header per command.
	const maxSeed = 96 << 10
	cmdNames := map[uint16]string{0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 6: "write-zeroes"}
	for _, c := range clients {
		conns := nbdTap.finished(t, c.name)
		if len(conns) == 0 {
			t.Fatalf("%s: no connection through the tap", c.name)
		}
		for i, tc := range conns {
			neg, xmit, reqs := nbdSplit(t, tc.up.Bytes())
			name := fmt.Sprintf("session-%s-%d", c.name, i+1)
			add("nbd/testdata/fuzz/FuzzNegotiation", name, bytesValue(neg))
			if len(xmit) > 0 {
				cut := 0
				for _, r := range reqs { // whole requests, up to maxSeed
					n := 28
					if binenc.BigEndian.Uint16(r[6:]) == 1 {
						n += int(binenc.BigEndian.Uint32(r[24:]))
					}
					if cut > 0 && cut+n > maxSeed {
						break
					}
					cut += n
				}
				add("nbd/testdata/fuzz/FuzzTransmission", name, bytesValue(xmit[:cut]))
			}
			for _, r := range reqs {
				cmd := binenc.BigEndian.Uint16(r[6:])
				add("nbd/testdata/fuzz/FuzzRequest", fmt.Sprintf("session-%s-%s", c.name, cmdNames[cmd]), bytesValue(r))
			}
			t.Logf("%s connection %d: %d bytes of negotiation, %d of transmission, %d requests", c.name, i+1, len(neg), len(xmit), len(reqs))
		}
	}
	if n := len(nbdTap.finished(t, "qemu-io-disconnected")); n != 1 {
		t.Fatalf("%d qemu-io connections while disconnected, want 1", n)
	}

	// The peer link: every frame, every handshake message and every
	// replication message as the receiver reads them.
	peers := peerTap.finished(t, "peer")
	if len(peers) < 4 {
		t.Fatalf("%d peer connections through the tap, want two sessions of two streams", len(peers))
	}
	byType := map[transport.Type][]byte{} // the shortest payload of each application type
	counts := map[transport.Type]int{}
	hsNames := map[transport.Type]string{frameHello: "hello", frameAck: "ack", frameAuth: "auth", frameOK: "ok", frameRefuse: "refuse"}
	hsWhich := map[transport.Type]uint8{frameHello: 0, frameAck: 1, frameRefuse: 2, frameAuth: 3, frameOK: 3}
	for i, pc := range peers {
		for dirName, b := range map[string][]byte{"dialer": pc.up.Bytes(), "listener": pc.down.Bytes()} {
			fs, cut := peerFrames(t, b)
			if len(fs) == 0 { // a dial abandoned before its HELLO
				t.Logf("peer connection %d: the %s sent %d bytes, no whole frame", i+1, dirName, len(b))
				continue
			}
			if cut > 0 {
				t.Logf("peer connection %d: the %s's stream ends %d bytes into a frame, after %d whole frames (last type %d)",
					i+1, dirName, cut, len(fs), fs[len(fs)-1].typ)
			}
			start := 0
			for j, f := range fs {
				counts[f.typ]++
				switch {
				case f.typ >= appTypesFrom:
					m, err := wire.Decode(f.typ, f.body)
					if err != nil {
						t.Fatalf("peer connection %d, %s frame %d: %v", i+1, dirName, j, err)
					}
					if !bytes.Equal(wire.Encode(m), f.body) {
						t.Errorf("peer connection %d, %s frame %d (type %d) re-encodes to other bytes", i+1, dirName, j, f.typ)
					}
					if old, ok := byType[f.typ]; !ok || len(f.body) < len(old) {
						byType[f.typ] = f.body
					}
				case hsNames[f.typ] != "":
					start = j + 1
					add("transport/testdata/fuzz/FuzzHandshake", fmt.Sprintf("session-%s-%d", hsNames[f.typ], i+1),
						fmt.Sprintf("uint8(%d)", hsWhich[f.typ]), bytesValue(f.body))
				}
			}
			// FuzzFrame: the stream's first frames after the handshake,
			// up to eight and maxSeed bytes.
			var win []byte
			for _, f := range fs[start:min(start+8, len(fs))] {
				if len(win) > 0 && len(win)+len(f.raw) > maxSeed {
					break
				}
				win = append(win, f.raw...)
			}
			if len(win) > 0 {
				add("transport/testdata/fuzz/FuzzFrame", fmt.Sprintf("session-%d-%s", i+1, dirName), bytesValue(win), "bool(false)")
			}
		}
	}
	for _, typ := range []transport.Type{wire.TypeParams, wire.TypeState, wire.TypeUUIDs, wire.TypeBitmap, wire.TypeSyncUUID,
		wire.TypeWrite, wire.TypeBarrier, wire.TypeBarrierAck, wire.TypeWriteAck, wire.TypeResyncRequest,
		wire.TypeResyncReply, wire.TypeResyncAck, wire.TypeVerifyRequest, wire.TypeVerifyReply} {
		if counts[typ] == 0 {
			t.Errorf("no message of type %d in the captured sessions", typ)
		}
	}
	for _, typ := range slices.Sorted(maps.Keys(byType)) {
		p := byType[typ]
		if len(p) > maxSeed { // a bulk message: only a small one makes a seed
			continue
		}
		add("replicator/wire/testdata/fuzz/FuzzDecode", fmt.Sprintf("session-type-%d", typ), fmt.Sprintf("uint16(%d)", typ), bytesValue(p))
	}
	t.Logf("peer frames by type: %v", counts)

	// Write the seeds, or check the committed ones.
	root := ".."
	dirs := map[string]bool{}
	for _, s := range seeds {
		dirs[s.dir] = true
	}
	for _, d := range []string{"nbd/testdata/fuzz/FuzzNegotiation", "nbd/testdata/fuzz/FuzzTransmission",
		"nbd/testdata/fuzz/FuzzRequest", "transport/testdata/fuzz/FuzzHandshake", "transport/testdata/fuzz/FuzzFrame",
		"replicator/wire/testdata/fuzz/FuzzDecode"} {
		if !dirs[d] {
			t.Errorf("nothing captured for %s", d)
		}
	}
	if *updateSeeds {
		for d := range dirs {
			old, _ := filepath.Glob(filepath.Join(root, d, "session-*"))
			for _, f := range old {
				os.Remove(f)
			}
		}
		for _, s := range seeds {
			path := filepath.Join(root, s.dir, s.name)
			if err := os.WriteFile(path, []byte(s.text()), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("wrote %d seed files", len(seeds))
		return
	}
	// Without -update-seeds: each target has its captured seeds, each one
	// well formed with the target's argument types.
	kinds := map[string][]string{
		"nbd/testdata/fuzz/FuzzNegotiation":        {"[]byte("},
		"nbd/testdata/fuzz/FuzzTransmission":       {"[]byte("},
		"nbd/testdata/fuzz/FuzzRequest":            {"[]byte("},
		"transport/testdata/fuzz/FuzzHandshake":    {"uint8(", "[]byte("},
		"transport/testdata/fuzz/FuzzFrame":        {"[]byte(", "bool("},
		"replicator/wire/testdata/fuzz/FuzzDecode": {"uint16(", "[]byte("},
	}
	for d, want := range kinds {
		files, _ := filepath.Glob(filepath.Join(root, d, "session-*"))
		if len(files) == 0 {
			t.Errorf("%s has no captured seeds (go test -tags integration -run TestCaptureSeeds -update-seeds ./integration/ writes them)", d)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			ok := len(lines) == 1+len(want) && lines[0] == "go test fuzz v1"
			for i := 0; ok && i < len(want); i++ {
				ok = strings.HasPrefix(lines[1+i], want[i]) && strings.HasSuffix(lines[1+i], ")")
			}
			if !ok {
				t.Errorf("%s is not a corpus file of %v", f, want)
			}
		}
	}
}
