package replicator

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nbdmirror/nbdmirror/internal/pagecache"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// pair is two resources r0, alpha and beta, in this process, each over a
// 32 MiB file with internal metadata, linked over loopback TCP.
type pair struct {
	t           *testing.T
	alpha, beta *Resource
	disks       [2]string
	logs        [2]*logBuf
}

// freePorts returns two distinct free ports (both listeners are open at
// once, so the kernel cannot hand out the same one twice).
func freePorts(t *testing.T) (int, int) {
	t.Helper()
	var ports [2]int
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports[0], ports[1]
}

// newPair makes the pair; metaDisks, if given, replace alpha's and then
// beta's `meta-disk internal`.
func newPair(t *testing.T, opts string, metaDisks ...string) *pair {
	t.Helper()
	meta := [2]string{"internal", "internal"}
	copy(meta[:], metaDisks)
	dir := t.TempDir()
	p := &pair{t: t}
	for i := range p.disks {
		p.disks[i] = filepath.Join(dir, fmt.Sprintf("d%d", i))
		if err := os.WriteFile(p.disks[i], nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p.disks[i], 32<<20); err != nil {
			t.Fatal(err)
		}
	}
	portA, portB := freePorts(t)
	src := fmt.Sprintf(`resource r0 { %s
  on alpha { disk %s; meta-disk %s; address 127.0.0.1:%d; }
  on beta { disk %s; meta-disk %s; address 127.0.0.1:%d; } }`, opts, p.disks[0], meta[0], portA, p.disks[1], meta[1], portB)
	c, err := config.Parse(fstest.MapFS{"r.conf": {Data: []byte(src)}}, "r.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.Resources[0]
	for i, node := range []string{"alpha", "beta"} {
		host, _ := cfg.Host(node)
		dev, err := OpenMetaDevice(host, true)
		if err != nil {
			t.Fatal(err)
		}
		err = metadisk.Create(dev.File, dev.Layout, node, "r0", false, metadisk.Options{})
		dev.Close()
		if err != nil {
			t.Fatal(err)
		}
		p.logs[i] = &logBuf{}
		r, err := New(Options{Config: cfg, Node: node, Logger: slog.New(slog.NewTextHandler(p.logs[i], nil))})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Attach(); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			p.alpha = r
		} else {
			p.beta = r
		}
	}
	t.Cleanup(func() {
		for i, r := range []*Resource{p.alpha, p.beta} {
			if err := r.Stop(); err != nil {
				t.Errorf("stop: %v", err)
			}
			if t.Failed() {
				t.Logf("%s log:\n%s", []string{"alpha", "beta"}[i], p.logs[i].String())
			}
		}
	})
	return p
}

// writeLoad writes 64 KiB of random data through alpha every interval,
// cycling over the first 16 MiB, until the returned stop is called (which
// waits for the writer).
func (p *pair) writeLoad(interval time.Duration) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for i := 0; ; i++ {
			select {
			case <-quit:
				return
			case <-time.After(interval):
			}
			rand.Read(buf)
			if err := p.alpha.WriteAt(buf, int64(i%256)*int64(len(buf)), false); err != nil {
				p.t.Errorf("application write: %v", err)
				return
			}
		}
	}()
	return func() {
		close(quit)
		<-done
	}
}

// connect starts both nodes connecting.
func (p *pair) connect() {
	p.t.Helper()
	for _, r := range []*Resource{p.alpha, p.beta} {
		if err := r.Connect(false); err != nil {
			p.t.Fatal(err)
		}
	}
}

// connected waits until both nodes are Connected: each ends its own
// handshake, so one being Connected says nothing about the other.
func (p *pair) connected() {
	p.t.Helper()
	for _, r := range []*Resource{p.alpha, p.beta} {
		p.wait(r, "Connected", func(s Snapshot) bool { return s.Conn == Connected })
	}
}

// wait waits until cond holds for r's snapshot.
func (p *pair) wait(r *Resource, what string, cond func(Snapshot) bool) {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := r.Snapshot()
		if cond(s) {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: %s not within 30s: %s %s/%s %s/%s", r.host.Name(), what, s.Conn, s.Disk, s.PeerDisk, s.Role, s.PeerRole)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *pair) inSync() {
	p.t.Helper()
	for _, r := range []*Resource{p.alpha, p.beta} {
		p.wait(r, "Connected UpToDate/UpToDate", func(s Snapshot) bool {
			return s.Conn == Connected && s.Disk == UpToDate && s.PeerDisk == UpToDate
		})
	}
}

// same compares the data areas of both disks.
func (p *pair) same() {
	p.t.Helper()
	size := p.alpha.Size()
	var data [2][]byte
	for i, d := range p.disks {
		b, err := os.ReadFile(d)
		if err != nil {
			p.t.Fatal(err)
		}
		data[i] = b[:size]
	}
	if !bytes.Equal(data[0], data[1]) {
		p.t.Fatalf("the disks differ")
	}
}

// TestPair_Lifecycle: connect, full sync after primary --force, protocol
// A/C writes of every kind, a disconnect with writes (bitmap resync of
// exactly those), a switchover; the disks end equal.
func TestPair_Lifecycle(t *testing.T) {
	for _, proto := range []string{"A", "B", "C"} {
		t.Run("protocol "+proto, func(t *testing.T) {
			p := newPair(t, fmt.Sprintf("net { protocol %s; } disk { c-plan-ahead 0; resync-rate 1G; }", proto))
			p.connect()
			p.connected()
			if err := p.alpha.Primary(true); err != nil {
				t.Fatal(err)
			}
			p.inSync()
			buf := make([]byte, 256<<10)
			rand.Read(buf)
			for _, w := range []func() error{
				func() error { return p.alpha.WriteAt(buf, 1<<20, false) },
				func() error { return p.alpha.WriteAt(buf[:4096], 9<<20, true) },
				func() error { return p.alpha.WriteZeroes(1<<20, 8192, true, false) },
				func() error { return p.alpha.Trim(2<<20, 65536, false) },
				p.alpha.Flush,
			} {
				if err := w(); err != nil {
					t.Fatal(err)
				}
			}
			// Protocols B and C: the flush returned after the barrier ack, so nothing
			// is pending; protocol A: pending writes are acked soon.
			if proto != "A" {
				if pe := p.alpha.Snapshot().Counters.PE; pe != 0 {
					t.Fatalf("protocol %s: %d writes not barrier-acked after a flush", proto, pe)
				}
			}
			p.wait(p.alpha, "every write barrier-acked", func(s Snapshot) bool { return s.Counters.PE == 0 })
			if err := p.beta.Disconnect(); err != nil {
				t.Fatal(err)
			}
			p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
			if err := p.alpha.WriteAt(buf, 20<<20, false); err != nil {
				t.Fatal(err)
			}
			if got := p.alpha.Snapshot().OutOfSyncBytes; got != uint64(len(buf)) {
				t.Fatalf("out of sync after a disconnected write: %d bytes, want %d", got, len(buf))
			}
			if err := p.beta.Connect(false); err != nil {
				t.Fatal(err)
			}
			p.inSync()
			if err := p.alpha.Secondary(); err != nil {
				t.Fatal(err)
			}
			// The demotion is seen by beta before Secondary returns.
			if err := p.beta.Primary(false); err != nil {
				t.Fatal(err)
			}
			p.same()
			if !strings.Contains(p.logs[1].String(), "resync starting as SyncTarget") {
				t.Errorf("beta never was SyncTarget")
			}
		})
	}
}

// TestPair_Refusals: the admin refusals that need a peer.
func TestPair_Refusals(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	p.connect()
	stateErr(t, p.alpha.Connect(false), codeHasNetConfig, "(125) Device has a net-config (use disconnect first)")
	p.connected()
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	stateErr(t, p.beta.Primary(false), codeTwoPrimaries, "(-1) Multiple primaries not allowed by config")
	stateErr(t, p.beta.NewCurrentUUID(false), codeNeedStandAloneF, "(151) Need to be StandAlone")
	stateErr(t, p.alpha.Verify(VerifyRange{}), codeNoVerifyAlg, "(-14) Need a verify algorithm")
	stateErr(t, p.alpha.Invalidate(true), codeNeedConnection, "(-15)")
	stateErr(t, p.beta.InvalidateRemote(true), codeNeedConnection, "the peer is Primary")
	if err := p.beta.PauseSync(); err != nil {
		t.Fatal(err)
	}
	stateErr(t, p.beta.PauseSync(), codePauseSet, "(134) Sync-pause flag is already set")
	if err := p.beta.ResumeSync(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Disconnect(); err != nil {
		t.Fatal(err)
	}
	stateErr(t, p.alpha.Disconnect(), codeStandAlone, "(-9) Can not disconnect a StandAlone device")
	stateErr(t, p.alpha.Connect(true), codeDiscardPrimary, "(123) --discard-my-data not allowed when primary.")
}

// fakePeer is beta spoken by the test itself over the real transport: it
// completes the handshake with the given state and generations, then
// sends whatever the test wants.
type fakePeer struct {
	tr *transport.Transport
	s  *transport.Session
}

// newFakePeer handshakes as beta with alpha's size and the net settings
// the two must agree on (protocol, verify-alg, csums-alg).
func newFakePeer(t *testing.T, p *pair, st wire.State, tweak ...func(*transport.Config)) *fakePeer {
	t.Helper()
	size := uint64(p.alpha.Size())
	n := p.alpha.cfg.Net
	return handshakeFake(t, p, wire.Params{DiskSize: size, Size: size, Protocol: byte(n.Protocol), MaxEpoch: 2048,
		VerifyAlg: n.VerifyAlg, CsumsAlg: n.CsumsAlg}, st, tweak...)
}

// handshakeFake is beta's side of a session with alpha, which has begun to
// connect, up to the handshake's messages: params, st and alpha's UUIDs;
// tweak changes its transport's configuration (dialFake).
func handshakeFake(t *testing.T, p *pair, params wire.Params, st wire.State, tweak ...func(*transport.Config)) *fakePeer {
	t.Helper()
	f := dialFake(t, p, tweak...)
	sb := p.alpha.md.Superblock()
	for _, m := range []wire.Message{
		params,
		st,
		wire.UUIDs{Current: sb.UUIDs.Current &^ 1, Bitmap: sb.UUIDs.Bitmap, History: sb.UUIDs.History},
	} {
		f.send(t, m)
	}
	return f
}

// dialFake is beta's side of a session with alpha, which has begun to
// connect, before any message: beta's transport, its configuration
// changed by each tweak (frame types to send that no node knows, another
// address to dial).
func dialFake(t *testing.T, p *pair, tweak ...func(*transport.Config)) *fakePeer {
	t.Helper()
	cfg, err := p.beta.transportConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tweak {
		f(&cfg)
	}
	tr, err := transport.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := tr.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &fakePeer{tr: tr, s: s}
}

// recv returns the next message the fake peer receives on stream st.
func (f *fakePeer) recv(t *testing.T, st transport.Stream) wire.Message {
	t.Helper()
	m, err := f.s.Recv(st)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := wire.Decode(m.Type, m.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

func (f *fakePeer) send(t *testing.T, m wire.Message) {
	t.Helper()
	if err := f.s.Send(transport.Data, m.Type(), wire.Encode(m)); err != nil {
		t.Fatal(err)
	}
}

// connectFake returns a pair whose alpha, UpToDate with a generation of
// its own, is Connected to a fake beta in state st, speaking protocol C.
func connectFake(t *testing.T, st wire.State) (*pair, *fakePeer) {
	t.Helper()
	return connectFakeWith(t, st, nil)
}

// connectFakeWith is connectFake with setup run on the pair before alpha
// connects.
func connectFakeWith(t *testing.T, st wire.State, setup func(*pair)) (*pair, *fakePeer) {
	t.Helper()
	return connectFakeOpts(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }", st, setup)
}

// connectFakeOpts is connectFakeWith with the pair's configuration opts
// (newPair's), whose net settings the fake peer takes, and tweaks of the
// fake peer's transport configuration (dialFake).
func connectFakeOpts(t *testing.T, opts string, st wire.State, setup func(*pair), tweak ...func(*transport.Config)) (*pair, *fakePeer) {
	t.Helper()
	p := newPair(t, opts)
	if setup != nil {
		setup(p)
	}
	if err := p.alpha.NewCurrentUUID(true); err != nil { // a generation of its own
		t.Fatal(err)
	}
	p.alpha.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		sb.Flags |= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
	})
	// Attached again, the disk is UpToDate: the handshake then finds the
	// fake peer's equal generation and goes Connected.
	if err := p.alpha.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Attach(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	f := newFakePeer(t, p, st, tweak...)
	p.wait(p.alpha, "Connected", func(s Snapshot) bool { return s.Conn == Connected })
	return p, f
}

// TestPair_BarrierAcks: the Secondary acks every epoch, in order, with its
// count of writes, once its writes are on the disk; an empty epoch closed
// by a flush is acked too; and ep counts the epochs not yet acked.
func TestPair_BarrierAcks(t *testing.T) {
	p, f := connectFake(t, wire.State{Role: uint8(RolePrimary), Disk: uint8(UpToDate)})
	block := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
	msgs := []wire.Message{
		wire.Write{Seq: 1, Epoch: 1, Offset: 0, Length: 4096, Data: block(1)},
		wire.Write{Seq: 2, Epoch: 1, Offset: 8192, Length: 4096, Data: block(2)},
		wire.Barrier{Epoch: 1, Writes: 2},
		wire.Write{Seq: 3, Epoch: 2, Offset: 0, Length: 4096, Data: block(3)}, // overwrites seq 1
		wire.Barrier{Epoch: 2, Writes: 1},
		wire.Barrier{Epoch: 3, Writes: 0, Flags: wire.BarrierFlush},
		wire.Write{Seq: 4, Epoch: 4, Offset: 4096, Length: 4096, Data: block(4), Flags: wire.WriteFUA},
		wire.Barrier{Epoch: 4, Writes: 1, Flags: wire.BarrierFlush},
	}
	for _, m := range msgs {
		f.send(t, m)
	}
	want := []wire.BarrierAck{{Epoch: 1, Writes: 2}, {Epoch: 2, Writes: 1}, {Epoch: 3, Writes: 0}, {Epoch: 4, Writes: 1}}
	var got []wire.BarrierAck
	for len(got) < len(want) {
		m, err := f.s.Recv(transport.Control)
		if err != nil {
			t.Fatalf("after barrier acks %v: %v", got, err)
		}
		msg, err := wire.Decode(m.Type, m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		switch msg := msg.(type) {
		case wire.BarrierAck:
			got = append(got, msg)
		case wire.WriteAck: // protocol C: before its epoch's barrier ack
		default:
			t.Fatalf("unexpected %T on the control stream", msg)
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("barrier acks %v, want %v", got, want)
	}
	b, err := os.ReadFile(p.disks[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:12288], slices.Concat(block(3), block(4), block(2))) {
		t.Errorf("the disk does not hold the epochs' writes in order")
	}
	if ep := p.alpha.Snapshot().Counters.EP; ep != 1 {
		t.Errorf("ep %d once every epoch is acked, want 1", ep)
	}
}

// TestPair_DirectWrites: on the Secondary, replicated writes of whole 4
// KiB blocks go from the transport's buffer to the disk around the page
// cache (the whole chain: the Write header's length is the transport's
// AlignAt, the pooled buffer puts the data on a page, Decode aliases it,
// the device takes it with O_DIRECT, asynchronously below directApply);
// others go through the cache; all land, and the barrier is acked only
// once they have.
func TestPair_DirectWrites(t *testing.T) {
	p, f := connectFake(t, wire.State{Role: uint8(RolePrimary), Disk: uint8(UpToDate)})
	tests := []struct {
		off    uint64
		n      uint32
		direct bool
	}{
		{1 << 20, 1 << 20, true},
		{4 << 20, directApply, true},
		{6 << 20, 2 << 20, true},
		{0, 4096, true},
		{9 << 20, directApply - 4096, true},
		{10 << 20, 512, false},
		{11<<20 + 512, 8192, false},
		{12 << 20, 4096 + 512, false},
	}
	want := map[uint64][]byte{}
	for i, tc := range tests {
		data := make([]byte, tc.n)
		rand.Read(data)
		want[tc.off] = data
		f.send(t, wire.Write{Seq: uint64(i + 1), Epoch: 1, Offset: tc.off, Length: tc.n, Data: data})
	}
	f.send(t, wire.Barrier{Epoch: 1, Writes: uint32(len(tests))})
	for {
		m, err := f.s.Recv(transport.Control)
		if err != nil {
			t.Fatal(err)
		}
		if msg, err := wire.Decode(m.Type, m.Payload); err != nil {
			t.Fatal(err)
		} else if _, ok := msg.(wire.BarrierAck); ok {
			break
		}
	}
	disk, err := os.Open(p.disks[0])
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	for _, tc := range tests {
		cached, err := pagecache.Resident(disk, int64(tc.off), int64(tc.n))
		if err != nil {
			t.Fatal(err)
		}
		if tc.direct && cached != 0 {
			t.Errorf("%d bytes at %d: %d pages in the Secondary's page cache, want none (O_DIRECT)", tc.n, tc.off, cached)
		}
		if !tc.direct && cached == 0 {
			t.Errorf("%d bytes at %d: not in the Secondary's page cache, want it written through", tc.n, tc.off)
		}
		got := make([]byte, tc.n)
		if _, err := disk.ReadAt(got, int64(tc.off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[tc.off]) {
			t.Errorf("%d bytes at %d: the disk does not hold the write", tc.n, tc.off)
		}
	}
}

// TestPair_FlushGap: the flusher lets flushGap pass between two flushes,
// holding barrier acks back, except for an epoch closed by a FLUSH, which
// is flushed and acked at once, with those waiting before it.
func TestPair_FlushGap(t *testing.T) {
	p, f := connectFakeWith(t, wire.State{Role: uint8(RolePrimary), Disk: uint8(UpToDate)},
		func(p *pair) { p.alpha.flushGap = time.Hour })
	acks := make(chan wire.BarrierAck, 8)
	go func() {
		for {
			m, err := f.s.Recv(transport.Control)
			if err != nil {
				return
			}
			if msg, err := wire.Decode(m.Type, m.Payload); err == nil {
				if a, ok := msg.(wire.BarrierAck); ok {
					acks <- a
				}
			}
		}
	}()
	next := func(what string) wire.BarrierAck {
		t.Helper()
		select {
		case a := <-acks:
			return a
		case <-time.After(30 * time.Second):
			t.Fatalf("no barrier ack for %s within 30 s", what)
			return wire.BarrierAck{}
		}
	}
	block := bytes.Repeat([]byte{7}, 4096)
	// The first flush does not wait.
	f.send(t, wire.Write{Seq: 1, Epoch: 1, Offset: 0, Length: 4096, Data: block})
	f.send(t, wire.Barrier{Epoch: 1, Writes: 1})
	if a := next("epoch 1"); a != (wire.BarrierAck{Epoch: 1, Writes: 1}) {
		t.Fatalf("ack %v, want epoch 1", a)
	}
	// The next waits for the gap: drained, not acked.
	f.send(t, wire.Write{Seq: 2, Epoch: 2, Offset: 4096, Length: 4096, Data: block})
	f.send(t, wire.Barrier{Epoch: 2, Writes: 1})
	p.wait(p.alpha, "epoch 2 drained", func(s Snapshot) bool { return s.Counters.EP == 2 })
	select {
	case a := <-acks:
		t.Fatalf("ack %v within the flush gap", a)
	case <-time.After(300 * time.Millisecond):
	}
	// A FLUSH epoch goes at once, and takes epoch 2 with it.
	f.send(t, wire.Barrier{Epoch: 3, Writes: 0, Flags: wire.BarrierFlush})
	if a := next("epoch 2"); a != (wire.BarrierAck{Epoch: 2, Writes: 1}) {
		t.Fatalf("ack %v, want epoch 2", a)
	}
	if a := next("the flush epoch 3"); a != (wire.BarrierAck{Epoch: 3}) {
		t.Fatalf("ack %v, want epoch 3", a)
	}
	p.wait(p.alpha, "every epoch acked", func(s Snapshot) bool { return s.Counters.EP == 1 })
}

// TestPair_Controller: with the dynamic controller (c-plan-ahead 2 s, as
// DRBD's default; c-fill-target 2 MiB instead of 50 KiB, which ramps up
// too slowly for a unit test) a full sync completes and shows the
// controller's rate as want.
func TestPair_Controller(t *testing.T) {
	p := newPair(t, "net { protocol A; } disk { c-fill-target 2M; }")
	p.connect()
	p.connected()
	start := time.Now()
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	var want int64
	p.wait(p.beta, "a controller rate", func(s Snapshot) bool {
		if s.Resync != nil {
			want = max(want, s.Resync.Want)
		}
		return want > 0 || s.Conn == Connected && s.Disk == UpToDate
	})
	p.inSync()
	t.Logf("full sync of %d bytes in %v; want seen %d B/s", p.alpha.Size(), time.Since(start), want)
	if want == 0 {
		t.Errorf("the SyncTarget never showed the controller's rate")
	}
	p.same()
}

// TestPair_Csums: with csums-alg, a resync moves only the blocks whose
// digests differ, block by block within each request.
func TestPair_Csums(t *testing.T) {
	for _, alg := range []string{"sha256", "xxh64", "md5", "sha1", "crc32c"} {
		t.Run(alg, func(t *testing.T) {
			p := newPair(t, fmt.Sprintf("net { protocol C; csums-alg %s; } disk { c-plan-ahead 0; resync-rate 1G; }", alg))
			p.connect()
			p.connected()
			if err := p.alpha.NewCurrentUUID(true); err != nil {
				t.Fatal(err)
			}
			p.inSync()
			if err := p.alpha.Primary(false); err != nil {
				t.Fatal(err)
			}
			if err := p.beta.Disconnect(); err != nil {
				t.Fatal(err)
			}
			p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
			// 4 MiB rewritten: zeros over zeros, except blocks 3, 4 and 700.
			buf := make([]byte, 4<<20)
			for _, b := range []int{3, 4, 700} {
				rand.Read(buf[b*4096 : (b+1)*4096])
			}
			if err := p.alpha.WriteAt(buf, 8<<20, false); err != nil {
				t.Fatal(err)
			}
			before := p.beta.Snapshot().Counters.DW
			if err := p.beta.Connect(false); err != nil {
				t.Fatal(err)
			}
			p.inSync()
			if got := (p.beta.Snapshot().Counters.DW - before) * 1024; got != 3*4096 {
				t.Errorf("the csums resync wrote %d bytes on beta, want the 3 differing blocks (12288)", got)
			}
			p.same()
		})
	}
}

// TestPair_AfterSBPolicies: a split brain after both nodes were Primary
// apart (then demoted) is resolved by after-sb-0pri without an operator;
// with the default it is not.
func TestPair_AfterSBPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy string
		// alphaWrites and betaWrites: 4 KiB blocks each writes apart
		alphaWrites, betaWrites int
		survivor                string // "alpha", "beta", or "" when refused
	}{
		{"disconnect", 2, 1, ""},
		{"discard-zero-changes", 3, 0, "alpha"},
		{"discard-zero-changes", 0, 2, "beta"},
		{"discard-least-changes", 1, 5, "beta"},
		{"discard-least-changes", 6, 2, "alpha"},
	} {
		t.Run(fmt.Sprintf("%s %d/%d", tc.policy, tc.alphaWrites, tc.betaWrites), func(t *testing.T) {
			p := newPair(t, fmt.Sprintf("net { protocol C; after-sb-0pri %s; } disk { c-plan-ahead 0; resync-rate 1G; }", tc.policy))
			p.connect()
			p.connected()
			if err := p.alpha.NewCurrentUUID(true); err != nil {
				t.Fatal(err)
			}
			p.inSync()
			for _, r := range []*Resource{p.alpha, p.beta} {
				if err := r.Disconnect(); err != nil {
					t.Fatal(err)
				}
			}
			for i, r := range []*Resource{p.alpha, p.beta} {
				if err := r.Primary(false); err != nil {
					t.Fatal(err)
				}
				n := []int{tc.alphaWrites, tc.betaWrites}[i]
				for b := range n {
					blk := bytes.Repeat([]byte{byte(i + 1)}, 4096)
					if err := r.WriteAt(blk, int64(i*64+b)*4096, false); err != nil {
						t.Fatal(err)
					}
				}
				if err := r.Secondary(); err != nil {
					t.Fatal(err)
				}
			}
			var before [2][]byte
			for i, d := range p.disks {
				b, err := os.ReadFile(d)
				if err != nil {
					t.Fatal(err)
				}
				before[i] = b[:p.alpha.Size()]
			}
			p.connect()
			if tc.survivor == "" {
				for i, r := range []*Resource{p.alpha, p.beta} {
					p.wait(r, "StandAlone", func(s Snapshot) bool { return s.Conn == StandAlone })
					b, _ := os.ReadFile(p.disks[i])
					if !bytes.Equal(b[:p.alpha.Size()], before[i]) {
						t.Errorf("node %d's data changed after an unresolved split brain", i)
					}
					if !strings.Contains(p.logs[i].String(), "Split-Brain detected but unresolved, dropping connection!") {
						t.Errorf("node %d did not log the unresolved split brain", i)
					}
				}
				return
			}
			p.inSync()
			p.same()
			got, _ := os.ReadFile(p.disks[0])
			if want := before[map[string]int{"alpha": 0, "beta": 1}[tc.survivor]]; !bytes.Equal(got[:p.alpha.Size()], want) {
				t.Errorf("the disks agree, but not on %s's data from before the connect", tc.survivor)
			}
		})
	}
}

// TestPeerRefusal: a handshake the peer ended with a refusal both nodes
// reach ends as that refusal here too; any other end stays an error that
// redials.
func TestPeerRefusal(t *testing.T) {
	sb := &transport.PeerClosedError{Reason: ErrSplitBrain.Error()}
	for _, tc := range []struct {
		name    string
		err     error
		refused string // "" when not a refusal
	}{
		{"split brain", sb, ErrSplitBrain.Error()},
		{"split brain, wrapped", fmt.Errorf("recv: %w", sb), ErrSplitBrain.Error()},
		{"unrelated data", &transport.PeerClosedError{Reason: ErrUnrelatedData.Error()}, ErrUnrelatedData.Error()},
		{"settings", &transport.PeerClosedError{Reason: incompatibleSettings + "protocol A here, C on the peer"},
			incompatibleSettings + "protocol A here, C on the peer"},
		{"disk too small (the Primary's refusal alone)", &transport.PeerClosedError{Reason: "The peer's disk size is too small! (1 bytes, this Primary exports 2): dropping connection"}, ""},
		{"disconnect", &transport.PeerClosedError{Reason: "disconnect requested"}, ""},
		{"network", transport.ErrClosed, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := peerRefusal(tc.err)
			var refused *errRefused
			switch {
			case tc.refused == "" && errors.As(err, &refused):
				t.Errorf("refused: %v", err)
			case tc.refused == "" && err != tc.err:
				t.Errorf("got %v, want the error unchanged", err)
			case tc.refused != "" && (!errors.As(err, &refused) || refused.reason != tc.refused):
				t.Errorf("got %v, want the refusal %q", err, tc.refused)
			}
		})
	}
}

// TestPair_CMinRate: with application writes going on during a resync,
// c-min-rate holds resync requests back on both sides once the resync
// runs above it; with c-min-rate 0 nothing waits. Either way the resync
// finishes once the writes stop, and the disks end equal.
func TestPair_CMinRate(t *testing.T) {
	for _, minRate := range []string{"0", "1"} {
		t.Run("c-min-rate="+minRate, func(t *testing.T) {
			// 32 MiB at 4 MiB/s: about 8 s of resync without throttling.
			p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 4M; c-min-rate "+minRate+"; }")
			p.connect()
			p.connected()
			if err := p.alpha.Primary(true); err != nil {
				t.Fatal(err)
			}
			p.wait(p.beta, "SyncTarget", func(s Snapshot) bool { return s.Conn == SyncTarget })
			stopWrites := p.writeLoad(5 * time.Millisecond)
			if minRate == "0" {
				// A quarter of the resync with writes going on.
				p.wait(p.beta, "a quarter of the resync", func(s Snapshot) bool {
					return s.Resync == nil || s.Resync.LeftBytes <= s.Resync.TotalBytes*3/4
				})
			} else {
				deadline := time.Now().Add(30 * time.Second)
				for p.alpha.throttled.Load() == 0 || p.beta.throttled.Load() == 0 {
					if time.Now().After(deadline) {
						t.Fatalf("resync requests held back: %d on alpha (source), %d on beta (target)",
							p.alpha.throttled.Load(), p.beta.throttled.Load())
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
			stopWrites()
			p.inSync()
			a, b := p.alpha.throttled.Load(), p.beta.throttled.Load()
			t.Logf("resync requests held back: %d on alpha (source), %d on beta (target)", a, b)
			if minRate == "0" && a+b != 0 {
				t.Errorf("c-min-rate 0 held %d+%d resync requests back", a, b)
			}
			p.same()
		})
	}
}

// TestPair_Backlog: a Primary's snapshot shows the replicated writes not
// yet on the peer's stable storage (pending bytes) and how long the oldest
// has waited (lag, growing), through the write ack, until the barrier ack
// of its epoch; then none. The peer is a fake Secondary that answers only
// when the test says.
func TestPair_Backlog(t *testing.T) {
	p, f := connectFake(t, wire.State{Role: uint8(RoleSecondary), Disk: uint8(UpToDate)})
	if err := p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	if s := p.alpha.Snapshot(); s.PendingBytes != 0 || s.Lag != 0 {
		t.Fatalf("before any write: pending %d, lag %v", s.PendingBytes, s.Lag)
	}
	written := make(chan error, 1)
	go func() { written <- p.alpha.WriteAt(bytes.Repeat([]byte{7}, 8192), 0, false) }()
	// The write as the peer receives it (after the handshake's messages).
	var w wire.Write
	for {
		if mw, ok := f.recv(t, transport.Data).(wire.Write); ok {
			w = mw
			break
		}
	}
	first := p.alpha.Snapshot()
	if first.PendingBytes != 8192 || first.Lag <= 0 {
		t.Fatalf("a write sent, not acked: pending %d, lag %v; want 8192 and > 0", first.PendingBytes, first.Lag)
	}
	p.wait(p.alpha, "the lag to grow", func(s Snapshot) bool { return s.Lag >= first.Lag+20*time.Millisecond })
	if err := f.s.Send(transport.Control, wire.TypeWriteAck, wire.Encode(wire.WriteAck{Seq: w.Seq, Status: wire.AckOK})); err != nil {
		t.Fatal(err)
	}
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	if s := p.alpha.Snapshot(); s.PendingBytes != 8192 || s.Lag < first.Lag {
		t.Fatalf("written and acked, not barrier-acked: pending %d, lag %v; want 8192 and ≥ %v", s.PendingBytes, s.Lag, first.Lag)
	}
	// The flush closes the epoch (or an empty one after it, if the
	// barrier went out first): every barrier is acked until it returns.
	flushed := make(chan error, 1)
	go func() { flushed <- p.alpha.Flush() }()
	barriers, stop := make(chan wire.Barrier), make(chan struct{})
	reader := make(chan struct{})
	defer func() { close(stop); f.s.Close("test over"); <-reader }()
	go func() {
		defer close(reader)
		for {
			m, err := f.s.Recv(transport.Data)
			if err != nil {
				return // the session ends with the test
			}
			if msg, err := wire.Decode(m.Type, m.Payload); err == nil {
				if b, ok := msg.(wire.Barrier); ok {
					select {
					case barriers <- b:
					case <-stop:
						return
					}
				}
			}
		}
	}()
	for done := false; !done; {
		select {
		case b := <-barriers:
			if err := f.s.Send(transport.Control, wire.TypeBarrierAck, wire.Encode(wire.BarrierAck{Epoch: b.Epoch, Writes: b.Writes})); err != nil {
				t.Fatal(err)
			}
		case err := <-flushed:
			if err != nil {
				t.Fatal(err)
			}
			done = true
		case <-time.After(30 * time.Second):
			t.Fatal("the flush did not return within 30 s")
		}
	}
	if s := p.alpha.Snapshot(); s.PendingBytes != 0 || s.Lag != 0 {
		t.Fatalf("after the barrier ack: pending %d, lag %v; want none", s.PendingBytes, s.Lag)
	}
}

// TestPair_AuthFailures: a peer with another shared secret is refused, and
// each node counts the refusals in its snapshot; the count survives a
// disconnect (the transport it came from is gone) and does not grow from
// it.
func TestPair_AuthFailures(t *testing.T) {
	p := newPair(t, `net { protocol C; shared-secret "one"; }`)
	other := *p.beta.cfg // the pair shares one configuration: beta gets its own
	other.Net.SharedSecret = "two"
	p.beta.cfg = &other
	p.beta.live.Store(&other) // the configuration in effect (adjust.go)
	p.connect()
	p.wait(p.alpha, "an authentication failure", func(s Snapshot) bool { return s.AuthFailures > 0 })
	if err := p.alpha.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	after := p.alpha.Snapshot()
	if after.AuthFailures == 0 || after.Conn != StandAlone {
		t.Fatalf("after disconnect: %d auth failures, %s; want them kept, StandAlone", after.AuthFailures, after.Conn)
	}
	if again := p.alpha.Snapshot().AuthFailures; again != after.AuthFailures {
		t.Fatalf("auth failures went from %d to %d while StandAlone", after.AuthFailures, again)
	}
}
