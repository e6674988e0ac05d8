package replicator

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// A hostile peer: beta is played by the test over the real transport and
// the real handshake, brings alpha into a state (a scene), and sends
// frames alpha must refuse. Each refusal ends the session as a protocol
// error, after which alpha reconnects (DRBD: ProtocolError → Unconnected →
// WFConnection), logs one line naming the message and what was wrong,
// and has applied nothing: its disk and its bitmap are exactly as before
// the hostile frames (but for the writes of its own that the lost session
// leaves unconfirmed, which it marks, as for any loss).

// hostileEnv is a scene: alpha connected to the fake beta, in some state.
type hostileEnv struct {
	t    *testing.T
	p    *pair
	f    *fakePeer
	size uint64 // alpha's size in bytes
	// req is the first resync request alpha sent (sceneSyncTarget).
	req wire.ResyncRequest
	// wrote ends when alpha's application write (primaryWrite) returns.
	wrote chan error
	px    *flipProxy // sceneProxied's
}

// hframe is a frame the fake peer sends.
type hframe struct {
	st      transport.Stream
	typ     transport.Type
	payload []byte
}

// streamOf is the stream a message type travels on (wire/doc.go).
func streamOf(t transport.Type) transport.Stream {
	switch t {
	case wire.TypeBarrierAck, wire.TypeWriteAck, wire.TypeVerifyReply:
		return transport.Control
	}
	return transport.Data
}

// msgs encodes messages as frames on their streams.
func msgs(ms ...wire.Message) []hframe {
	fs := make([]hframe, len(ms))
	for i, m := range ms {
		fs[i] = hframe{streamOf(m.Type()), m.Type(), wire.Encode(m)}
	}
	return fs
}

// onStream is m on stream st, whichever its own.
func onStream(st transport.Stream, m wire.Message) hframe {
	return hframe{st, m.Type(), wire.Encode(m)}
}

func (h *hostileEnv) send(fs ...hframe) {
	h.t.Helper()
	for _, f := range fs {
		if err := h.f.s.Send(f.st, f.typ, f.payload); err != nil {
			h.t.Fatalf("sending %s: %v", wire.Name(f.typ), err)
		}
	}
}

// await returns the next message of type typ alpha sends on stream st,
// skipping others.
func (h *hostileEnv) await(st transport.Stream, typ transport.Type) wire.Message {
	h.t.Helper()
	got := make(chan wire.Message, 1)
	fail := make(chan error, 1)
	go func() {
		for {
			m, err := h.f.s.Recv(st)
			if err != nil {
				fail <- err
				return
			}
			if m.Type != typ {
				continue
			}
			msg, err := wire.Decode(m.Type, m.Payload)
			if err != nil {
				fail <- err
				return
			}
			got <- msg
			return
		}
	}()
	select {
	case m := <-got:
		return m
	case err := <-fail:
		h.t.Fatalf("waiting for %s from alpha: %v", wire.Name(typ), err)
	case <-time.After(30 * time.Second):
		h.t.Fatalf("no %s from alpha within 30 s", wire.Name(typ))
	}
	return nil
}

// conn waits until alpha's connection state is c.
func (h *hostileEnv) conn(c ConnState) {
	h.t.Helper()
	h.p.wait(h.p.alpha, c.String(), func(s Snapshot) bool { return s.Conn == c })
}

// data returns the XXH64 of alpha's data area.
func (h *hostileEnv) data() uint64 {
	h.t.Helper()
	f, err := os.Open(h.p.disks[0])
	if err != nil {
		h.t.Fatal(err)
	}
	defer f.Close()
	d := xxhash.New()
	if n, err := io.Copy(d, io.LimitReader(f, int64(h.size))); err != nil || n != int64(h.size) {
		h.t.Fatalf("reading alpha's disk: %d bytes, %v", n, err)
	}
	return d.Sum64()
}

// marked returns alpha's bitmap, a bool per block.
func (h *hostileEnv) marked() []bool {
	bm := make([]bool, bitmap.Blocks(int64(h.size)))
	end := uint64(len(bm))
	for pos := uint64(0); pos < end; {
		s, n, ok := h.p.alpha.md.NextRun(pos)
		if !ok || n == 0 || s >= end {
			break
		}
		for b := s; b < min(s+n, end); b++ {
			bm[b] = true
		}
		pos = s + n
	}
	return bm
}

// newEnv wraps a connected pair.
func newEnv(t *testing.T, p *pair, f *fakePeer) *hostileEnv {
	return &hostileEnv{t: t, p: p, f: f, size: uint64(p.alpha.Size())}
}

var (
	hostilePrimary   = wire.State{Role: uint8(RolePrimary), Disk: uint8(UpToDate)}
	hostileSecondary = wire.State{Role: uint8(RoleSecondary), Disk: uint8(UpToDate)}
)

const (
	hostileOpts       = "net { protocol C; } disk { al-extents 7; c-plan-ahead 0; resync-rate 1G; }"
	hostileVerifyOpts = "net { protocol C; verify-alg sha256; } disk { c-plan-ahead 0; resync-rate 1G; }"
	// hostileType is a frame type no node registers.
	hostileType transport.Type = 40
)

// Scenes. Alpha is UpToDate with a generation of its own, Connected to
// the fake beta, unless the scene says otherwise.

// sceneSecondary: alpha Secondary, the peer Primary; the fake also sends
// hostileType.
func sceneSecondary(t *testing.T) *hostileEnv {
	p, f := connectFakeOpts(t, hostileOpts, hostilePrimary, nil,
		func(c *transport.Config) { c.Types = append(c.Types, hostileType) })
	return newEnv(t, p, f)
}

// sceneProxied: sceneSecondary with the fake peer's connections through
// a flipProxy (it dials alpha through it and does not listen).
func sceneProxied(t *testing.T) *hostileEnv {
	var px *flipProxy
	p, f := connectFakeOpts(t, hostileOpts, hostilePrimary, nil, func(c *transport.Config) {
		px = newFlipProxy(t, c.PeerAddr)
		c.PeerAddr, c.ListenAddr = px.l.Addr().String(), ""
	})
	h := newEnv(t, p, f)
	h.px = px
	return h
}

// flipProxy forwards the TCP connections it accepts to an address; once
// armed, it flips one bit in the middle of the next chunk of 4 KiB or
// more it forwards there (a frame's bytes: pings are a few dozen).
type flipProxy struct {
	l       net.Listener
	to      string
	armed   atomic.Bool
	flipped atomic.Bool
	wg      sync.WaitGroup
	mu      sync.Mutex
	closed  bool
	conns   []net.Conn
}

func newFlipProxy(t *testing.T, to string) *flipProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	x := &flipProxy{l: l, to: to}
	x.wg.Add(1)
	go x.accept()
	t.Cleanup(x.close)
	return x
}

func (x *flipProxy) accept() {
	defer x.wg.Done()
	for {
		c, err := x.l.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", x.to)
		if err != nil {
			c.Close()
			continue
		}
		x.mu.Lock()
		if x.closed {
			x.mu.Unlock()
			c.Close()
			up.Close()
			return
		}
		x.conns = append(x.conns, c, up)
		x.wg.Add(2)
		x.mu.Unlock()
		go x.pipe(up, c, true)
		go x.pipe(c, up, false)
	}
}

// pipe copies src to dst, flipping a bit on the way if out and armed.
func (x *flipProxy) pipe(dst, src net.Conn, out bool) {
	defer x.wg.Done()
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 256<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if out && n >= 4096 && x.armed.Load() && x.flipped.CompareAndSwap(false, true) {
				buf[n/2] ^= 0x10
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (x *flipProxy) close() {
	x.l.Close()
	x.mu.Lock()
	x.closed = true
	for _, c := range x.conns {
		c.Close()
	}
	x.mu.Unlock()
	x.wg.Wait()
}

// sceneBothSecondary: both Secondary.
func sceneBothSecondary(t *testing.T) *hostileEnv {
	p, f := connectFakeOpts(t, hostileOpts, hostileSecondary, nil)
	return newEnv(t, p, f)
}

// scenePrimary: alpha Primary, the peer Secondary.
func scenePrimary(t *testing.T) *hostileEnv {
	h := sceneBothSecondary(t)
	if err := h.p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	// The promotion's State, after the handshake's.
	for {
		if st := h.await(transport.Data, wire.TypeState).(wire.State); st.Role == wire.RolePrimary {
			return h
		}
	}
}

// sceneHandshake: alpha connecting, the fake beta's session established,
// no message sent yet (WFReportParams).
func sceneHandshake(t *testing.T) *hostileEnv {
	p := newPair(t, hostileOpts)
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	h := newEnv(t, p, dialFake(t, p))
	h.conn(WFReportParams)
	return h
}

// sceneVerifyT: alpha Secondary with verify-alg, the peer Primary has
// started an online verify: alpha is VerifyT.
func sceneVerifyT(t *testing.T) *hostileEnv {
	p, f := connectFakeOpts(t, hostileVerifyOpts, hostilePrimary, nil)
	h := newEnv(t, p, f)
	h.send(msgs(wire.Command{Code: wire.CmdVerifyStart})...)
	h.conn(VerifyT)
	return h
}

// sceneVerifyS: alpha Secondary with verify-alg runs an online verify
// (VerifyS); the peer has its first request, and answers none.
func sceneVerifyS(t *testing.T) *hostileEnv {
	p, f := connectFakeOpts(t, hostileVerifyOpts, hostileSecondary, nil)
	h := newEnv(t, p, f)
	if err := p.alpha.Verify(VerifyRange{}); err != nil {
		t.Fatal(err)
	}
	h.conn(VerifyS)
	if m := h.await(transport.Data, wire.TypeVerifyRequest).(wire.VerifyRequest); m.ID != 1 || m.Offset != 0 {
		t.Fatalf("first verify request %+v, want ID 1 at 0", m)
	}
	return h
}

// sceneBehind: the peer Primary went Ahead: alpha is Behind.
func sceneBehind(t *testing.T) *hostileEnv {
	h := sceneSecondary(t)
	h.send(msgs(wire.Command{Code: wire.CmdAhead})...)
	h.conn(Behind)
	return h
}

// peerBitmap is the fake peer's bitmap: blocks 16 to 19 marked.
func (h *hostileEnv) peerBitmap() wire.Bitmap {
	blocks := bitmap.Blocks(int64(h.size))
	return wire.Bitmap{Start: 0, Count: blocks, Last: true, Runs: []uint64{16, 4, blocks - 20}}
}

// sceneSyncSource: the peer, Secondary, asked to be resynced from alpha
// (invalidate, its marked blocks: 16 to 19): alpha is SyncSource.
func sceneSyncSource(t *testing.T) *hostileEnv {
	h := sceneBothSecondary(t)
	h.send(msgs(wire.Command{Code: wire.CmdInvalidate, Arg: 1})...)
	h.await(transport.Data, wire.TypeBitmap)
	h.send(msgs(h.peerBitmap())...)
	h.await(transport.Data, wire.TypeSyncUUID)
	h.conn(SyncSource)
	return h
}

// sceneWFBitMapT: the peer, Primary, asked alpha to be resynced from it
// (invalidate-remote, marked blocks only): alpha waits for its bitmap.
func sceneWFBitMapT(t *testing.T) *hostileEnv {
	h := sceneSecondary(t)
	h.send(msgs(wire.Command{Code: wire.CmdInvalidateRemote, Arg: 1})...)
	h.conn(WFBitMapT)
	return h
}

// sceneSyncTarget: sceneWFBitMapT past the bitmaps and the sync UUID:
// alpha is SyncTarget and has asked for blocks 16 to 19 (h.req), which the
// peer does not answer.
func sceneSyncTarget(t *testing.T) *hostileEnv {
	h := sceneWFBitMapT(t)
	h.send(msgs(h.peerBitmap())...)
	h.await(transport.Data, wire.TypeBitmap)
	h.conn(WFSyncUUID)
	h.send(msgs(wire.SyncUUID{UUID: 0x5eed_0000_0000_0000})...)
	h.req = h.await(transport.Data, wire.TypeResyncRequest).(wire.ResyncRequest)
	if h.req.Offset != 16*bitmap.BlockSize || h.req.Length != 4*bitmap.BlockSize {
		t.Fatalf("resync request %+v, want blocks 16 to 19", h.req)
	}
	h.conn(SyncTarget)
	return h
}

// Preludes: legitimate exchanges before the hostile frames.

// primaryWrite starts an application write of 4 KiB at 8 KiB on alpha
// (Primary, protocol C) and returns the Write the peer receives.
func (h *hostileEnv) primaryWrite() wire.Write {
	h.wrote = make(chan error, 1)
	go func() { h.wrote <- h.p.alpha.WriteAt(bytes.Repeat([]byte{0xCD}, 4096), 8192, false) }()
	return h.await(transport.Data, wire.TypeWrite).(wire.Write)
}

// written waits for primaryWrite's write to return.
func (h *hostileEnv) written() {
	h.t.Helper()
	select {
	case err := <-h.wrote:
		h.wrote = nil
		if err != nil {
			h.t.Fatalf("alpha's application write: %v", err)
		}
	case <-time.After(30 * time.Second):
		h.t.Fatal("alpha's application write did not return within 30 s")
	}
}

// ackedWrite: the write is acked (write ack), returned, and its epoch
// closed (the barrier arrived); its barrier ack is not sent.
func (h *hostileEnv) ackedWrite() {
	w := h.primaryWrite()
	h.send(msgs(wire.WriteAck{Seq: w.Seq})...)
	h.written()
	h.await(transport.Data, wire.TypeBarrier)
}

// hostileCase is one (message type, defect).
type hostileCase struct {
	name    string
	scene   func(*testing.T) *hostileEnv
	prelude func(*hostileEnv)
	frames  func(*hostileEnv) []hframe
	want    string   // in the line that logs the loss
	marked  [2]int64 // bytes (offset, length) the loss marks: a write of alpha's left unconfirmed
}

// fixed is frames that do not depend on the scene.
func fixed(fs ...hframe) func(*hostileEnv) []hframe {
	return func(*hostileEnv) []hframe { return fs }
}

// hostileSamples is a valid message of every type, for the rows that cut
// or extend its payload, with what the extended one is refused for.
func hostileSamples() []struct {
	m     wire.Message
	trail string
} {
	block := bytes.Repeat([]byte{0xAB}, 4096)
	return []struct {
		m     wire.Message
		trail string
	}{
		{wire.Params{DiskSize: 1 << 20, Size: 1 << 20, Protocol: 'C', MaxEpoch: 2048}, "1 trailing bytes"},
		{hostilePrimary, "1 trailing bytes"},
		{wire.UUIDs{Current: 4}, "1 trailing bytes"},
		{wire.Bitmap{Count: 8, Last: true, Runs: []uint64{0, 8}}, "run 2 is 0"},
		{wire.SyncUUID{UUID: 8}, "1 trailing bytes"},
		{wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block}, "data of 4097 bytes for length 4096"},
		{wire.Barrier{Epoch: 1}, "1 trailing bytes"},
		{wire.BarrierAck{Epoch: 1}, "1 trailing bytes"},
		{wire.WriteAck{Seq: 1}, "1 trailing bytes"},
		{wire.ResyncRequest{ID: 1, Length: 4096}, "1 trailing bytes"},
		{wire.ResyncReply{ID: 1, Length: 4096, Status: wire.ReplyData, Data: block}, "data of 4097 bytes for length 4096"},
		{wire.ResyncAck{ID: 1, Length: 4096}, "1 trailing bytes"},
		{wire.VerifyRequest{ID: 1, Length: 4096, Digest: make([]byte, 32)}, "1 trailing bytes"},
		{wire.VerifyReply{ID: 1, Length: 4096}, "1 trailing bytes"},
		{wire.OutOfSync{Length: 4096}, "1 trailing bytes"},
		{wire.Command{Code: wire.CmdPauseSync}, "1 trailing bytes"},
		{wire.Sizes{Kind: wire.SizesQuery}, "1 trailing bytes"},
		{wire.ReadRequest{ID: 1, Length: 4096}, "1 trailing bytes"},
		{wire.ReadReply{ID: 1, Length: 4096, Status: wire.ReadOK, Data: block}, "data of 4097 bytes for length 4096"},
	}
}

func hostileCases() []hostileCase {
	block := bytes.Repeat([]byte{0xAB}, 4096)
	zero := make([]byte, 4096)
	var cases []hostileCase
	// Every type, its payload cut short, and with a byte too many.
	for _, s := range hostileSamples() {
		name, p := wire.Name(s.m.Type()), wire.Encode(s.m)
		cut := min(len(p)-1, 8)
		cases = append(cases,
			hostileCase{name: name + "/truncated", scene: sceneSecondary,
				frames: fixed(hframe{streamOf(s.m.Type()), s.m.Type(), p[:cut]}),
				want:   fmt.Sprintf("wire: %s: payload of %d bytes ends inside", name, cut)},
			hostileCase{name: name + "/trailing byte", scene: sceneSecondary,
				frames: fixed(hframe{streamOf(s.m.Type()), s.m.Type(), append(p, 0)}),
				want:   fmt.Sprintf("wire: %s: %s", name, s.trail)})
	}
	return append(cases, []hostileCase{
		// Params
		{name: "Params/again after the handshake", scene: sceneSecondary,
			frames: fixed(msgs(wire.Params{Protocol: 'C', MaxEpoch: 1})...),
			want:   "Params on the data stream"},
		{name: "Params/twice in the handshake", scene: sceneHandshake,
			frames: func(h *hostileEnv) []hframe {
				pa := wire.Params{DiskSize: h.size, Size: h.size, Protocol: 'C', MaxEpoch: 2048}
				return msgs(pa, pa)
			},
			want: "handshake message 2 is Params, expected State"},
		{name: "Params/algorithm name oversized", scene: sceneSecondary,
			frames: fixed(msgs(wire.Params{Protocol: 'C', MaxEpoch: 1, CsumsAlg: strings.Repeat("x", 65)})...),
			want:   "wire: Params: csums-alg of 65 bytes above the 64 maximum"},
		// State
		{name: "State/first in the handshake", scene: sceneHandshake,
			frames: fixed(msgs(hostileSecondary)...),
			want:   "handshake message 1 is State, expected Params"},
		{name: "State/Primary while this node is Primary", scene: scenePrimary,
			frames: fixed(msgs(hostilePrimary)...),
			want:   "State: the peer is Primary while this node is Primary"},
		{name: "State/disk state out of range", scene: sceneSecondary,
			frames: fixed(msgs(wire.State{Role: uint8(RolePrimary), Disk: 9})...),
			want:   "wire: State: disk 9 above 8"},
		// UUIDs
		{name: "UUIDs/skipped initial sync on a node with data", scene: sceneSecondary,
			frames: fixed(msgs(wire.UUIDs{Current: 0x1234 << 8, Flags: wire.UUIDSkipInitialSync})...),
			want:   "the peer skipped the initial sync while this node is Connected/UpToDate with data of its own"},
		{name: "UUIDs/reserved flag", scene: sceneSecondary,
			frames: fixed(msgs(wire.UUIDs{Flags: 1 << 9})...),
			want:   "wire: UUIDs: reserved flags 0x200 set"},
		// Bitmap
		{name: "Bitmap/after the handshake", scene: sceneSecondary,
			frames: fixed(msgs(wire.Bitmap{Start: 0, Count: 1, Last: true, Runs: []uint64{0, 1}})...),
			want:   "bitmap while Connected"},
		{name: "Bitmap/again after the exchange", scene: sceneSyncTarget,
			frames: func(h *hostileEnv) []hframe { return msgs(h.peerBitmap()) },
			want:   "bitmap while SyncTarget"},
		{name: "Bitmap/chunk not where the last ended", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.Bitmap{Start: 8, Count: 8, Runs: []uint64{0, 8}})...),
			want:   "bitmap chunk of blocks [8, +8), expected from 0"},
		{name: "Bitmap/past the end of the device", scene: sceneWFBitMapT,
			frames: func(h *hostileEnv) []hframe {
				n := bitmap.Blocks(int64(h.size)) + 8
				return msgs(wire.Bitmap{Count: n, Last: true, Runs: []uint64{0, n}})
			},
			want: "bitmap chunk of blocks [0, +7941), expected from 0 of 7933"},
		{name: "Bitmap/last chunk ends before the device", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.Bitmap{Count: 64, Last: true, Runs: []uint64{0, 64}})...),
			want:   "bitmap ended at block 64 of 7933"},
		{name: "Bitmap/count oversized", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.Bitmap{Count: 1<<32 + 1, Last: true, Runs: []uint64{1<<32 + 1}})...),
			want:   "wire: Bitmap: count 4294967297 above the 4294967296 maximum"},
		{name: "Bitmap/overflowing 64 bits", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.Bitmap{Start: math.MaxUint64 - 3, Count: 8, Last: true, Runs: []uint64{8}})...),
			want:   "wire: Bitmap: start 18446744073709551612 + count 8 overflows"},
		// SyncUUID
		{name: "SyncUUID/while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.SyncUUID{UUID: 8})...),
			want:   "sync UUID while Connected"},
		{name: "SyncUUID/twice", scene: sceneSyncTarget,
			frames: fixed(msgs(wire.SyncUUID{UUID: 8})...),
			want:   "sync UUID while SyncTarget"},
		{name: "SyncUUID/on the SyncSource", scene: sceneSyncSource,
			frames: fixed(msgs(wire.SyncUUID{UUID: 8})...),
			want:   "sync UUID while SyncSource"},
		// Write
		{name: "Write/while this node is Primary", scene: scenePrimary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block})...),
			want:   "the peer replicates writes to a Primary (two primaries)"},
		{name: "Write/from a Secondary", scene: sceneBothSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block})...),
			want:   "write from a peer that is not Primary"},
		{name: "Write/past the end of the device", scene: sceneSecondary,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.Write{Seq: 1, Epoch: 1, Offset: h.size, Length: 4096, Data: block})
			},
			want: "write of 4096 bytes at 32493568 lies past the end of the device"},
		{name: "Write/across the end of the device", scene: sceneSecondary,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.Write{Seq: 1, Epoch: 1, Offset: h.size - 4096, Length: 8192, Data: append(block, block...)})
			},
			want: "write of 8192 bytes at 32489472 lies past the end of the device"},
		{name: "Write/offset 2^63", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Offset: 1 << 63, Length: 4096, Data: block})...),
			want:   "write of 4096 bytes at 9223372036854775808 lies past the end of the device"},
		{name: "Write/overflowing 64 bits", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Offset: math.MaxUint64 - 511, Length: 1024, Kind: wire.WriteZeroes})...),
			want:   "wire: Write: offset 18446744073709551104 + length 1024 overflows"},
		{name: "Write/length oversized", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Length: wire.MaxData + 512, Kind: wire.WriteZeroes})...),
			want:   "wire: Write: length 33554944 above the 32 MiB maximum"},
		{name: "Write/data cut short", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block[:4000]})...),
			want:   "wire: Write: data of 4000 bytes for length 4096"},
		{name: "Write/same seq twice", scene: sceneSecondary,
			frames: fixed(msgs(
				wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: zero},
				wire.Write{Seq: 1, Epoch: 1, Offset: 4096, Length: 4096, Data: block})...),
			want: "Write seq 1, expected 2"},
		{name: "Write/from a diskless Primary, across more extents than the activity log holds", scene: sceneSecondary,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.State{Role: uint8(RolePrimary), Disk: uint8(Diskless)},
					wire.Write{Seq: 1, Epoch: 1, Length: uint32(h.size), Kind: wire.WriteZeroes})
			},
			want: "a diskless Primary's write of 32493568 bytes at 0"},
		{name: "Write/seq not the next", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 5, Epoch: 1, Length: 4096, Data: block})...),
			want:   "Write seq 5, expected 1"},
		{name: "Write/in a future epoch", scene: sceneSecondary,
			frames: fixed(msgs(wire.Write{Seq: 1, Epoch: 7, Length: 4096, Data: block})...),
			want:   "write in epoch 7, expected 1"},
		{name: "Write/in an epoch already closed", scene: sceneSecondary,
			frames: fixed(msgs(wire.Barrier{Epoch: 1}, wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block})...),
			want:   "write in epoch 1, expected 2"},
		{name: "Write/on the control stream", scene: sceneSecondary,
			frames: fixed(onStream(transport.Control, wire.Write{Seq: 1, Epoch: 1, Length: 4096, Data: block})),
			want:   "Write on the control stream"},
		// Barrier
		{name: "Barrier/with a wrong count", scene: sceneSecondary,
			frames: fixed(msgs(wire.Barrier{Epoch: 1, Writes: 3})...),
			want:   "barrier for epoch 1 counts 3 writes, 0 arrived"},
		{name: "Barrier/twice", scene: sceneSecondary,
			frames: fixed(msgs(wire.Barrier{Epoch: 1}, wire.Barrier{Epoch: 1})...),
			want:   "barrier for epoch 1, expected 2"},
		{name: "Barrier/epoch out of range", scene: sceneSecondary,
			frames: fixed(msgs(wire.Barrier{Epoch: math.MaxUint64})...),
			want:   "barrier for epoch 18446744073709551615, expected 1"},
		{name: "Barrier/on the control stream", scene: sceneSecondary,
			frames: fixed(onStream(transport.Control, wire.Barrier{Epoch: 1})),
			want:   "Barrier on the control stream"},
		// BarrierAck
		{name: "BarrierAck/for no barrier", scene: sceneSecondary,
			frames: fixed(msgs(wire.BarrierAck{Epoch: 1})...),
			want:   "BarrierAck for epoch 1, whose barrier was not sent"},
		{name: "BarrierAck/before the write ack", scene: scenePrimary,
			prelude: func(h *hostileEnv) { h.primaryWrite() },
			frames:  fixed(msgs(wire.BarrierAck{Epoch: 1, Writes: 1})...),
			want:    "BarrierAck for epoch 1, whose barrier was not sent",
			marked:  [2]int64{8192, 4096}},
		{name: "BarrierAck/twice", scene: scenePrimary, prelude: (*hostileEnv).ackedWrite,
			frames: fixed(msgs(wire.BarrierAck{Epoch: 1, Writes: 1}, wire.BarrierAck{Epoch: 1, Writes: 1})...),
			want:   "BarrierAck for epoch 1, acked already"},
		{name: "BarrierAck/for a later epoch", scene: scenePrimary, prelude: (*hostileEnv).ackedWrite,
			frames: fixed(msgs(wire.BarrierAck{Epoch: 2})...),
			want:   "BarrierAck for epoch 2 with 0 writes, expected epoch 1 with 1",
			marked: [2]int64{8192, 4096}},
		{name: "BarrierAck/with a wrong count", scene: scenePrimary, prelude: (*hostileEnv).ackedWrite,
			frames: fixed(msgs(wire.BarrierAck{Epoch: 1, Writes: 2})...),
			want:   "BarrierAck for epoch 1 with 2 writes, expected epoch 1 with 1",
			marked: [2]int64{8192, 4096}},
		{name: "BarrierAck/on the data stream", scene: sceneSecondary,
			frames: fixed(onStream(transport.Data, wire.BarrierAck{Epoch: 1})),
			want:   "BarrierAck on the data stream"},
		// WriteAck
		{name: "WriteAck/for an unknown seq", scene: scenePrimary,
			frames: fixed(msgs(wire.WriteAck{Seq: 99})...),
			want:   "write ack for unknown write 99"},
		{name: "WriteAck/twice", scene: scenePrimary,
			prelude: func(h *hostileEnv) {
				w := h.primaryWrite()
				h.send(msgs(wire.WriteAck{Seq: w.Seq})...)
				h.written()
			},
			frames: fixed(msgs(wire.WriteAck{Seq: 1})...),
			want:   "second write ack for write 1",
			marked: [2]int64{8192, 4096}},
		{name: "WriteAck/after its barrier ack", scene: scenePrimary, prelude: (*hostileEnv).ackedWrite,
			frames: fixed(msgs(wire.BarrierAck{Epoch: 1, Writes: 1}, wire.WriteAck{Seq: 1})...),
			want:   "write ack for unknown write 1"},
		{name: "WriteAck/status out of range", scene: scenePrimary,
			frames: fixed(msgs(wire.WriteAck{Seq: 1, Status: 2})...),
			want:   "wire: WriteAck: status 2 unknown"},
		// ResyncRequest
		{name: "ResyncRequest/while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Length: 4096})...),
			want:   "resync request while Connected"},
		{name: "ResyncRequest/while the bitmaps are exchanged", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Length: 4096})...),
			want:   "resync request while WFBitMapT"},
		{name: "ResyncRequest/past the end of the device", scene: sceneSyncSource,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ResyncRequest{ID: 1, Offset: h.size, Length: 4096})
			},
			want: "resync request of 4096 bytes at 32493568 lies past the end of the device"},
		{name: "ResyncRequest/overflowing 64 bits", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Offset: math.MaxUint64 - 4095, Length: 8192})...),
			want:   "wire: ResyncRequest: offset 18446744073709547520 + length 8192 overflows"},
		{name: "ResyncRequest/length oversized", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Length: 2 << 20})...),
			want:   "resync request of 2097152 bytes, above the 1048576 a SyncTarget asks for"},
		{name: "ResyncRequest/digests without csums-alg", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Length: 4096, Digests: make([]byte, 32)})...),
			want:   "resync request with 32-byte digests, csums-alg here is"},
		{name: "ResyncRequest/digests oversized", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncRequest{ID: 1, Length: 4096, Digests: make([]byte, 65)})...),
			want:   "wire: ResyncRequest: digests of 65 bytes for 1 blocks"},
		// ResyncReply
		{name: "ResyncReply/while not SyncTarget", scene: sceneSecondary,
			frames: fixed(msgs(wire.ResyncReply{ID: 9, Length: 4096, Status: wire.ReplyData, Data: block})...),
			want:   "resync data while not SyncTarget"},
		{name: "ResyncReply/for an id never requested", scene: sceneSyncTarget,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ResyncReply{ID: h.req.ID + 1, Offset: h.req.Offset, Length: 4096, Status: wire.ReplyData, Data: block})
			},
			want: "resync reply 2 for [65536, +4096) was not requested"},
		{name: "ResyncReply/for a block never requested", scene: sceneSyncTarget,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ResyncReply{ID: h.req.ID, Offset: 0, Length: 4096, Status: wire.ReplyData, Data: block})
			},
			want: "resync reply 1 for [0, +4096) was not requested"},
		{name: "ResyncReply/past the end of the device", scene: sceneSyncTarget,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ResyncReply{ID: h.req.ID, Offset: h.size, Length: 4096, Status: wire.ReplyData, Data: block})
			},
			want: "resync reply 1 for [32493568, +4096) was not requested"},
		{name: "ResyncReply/twice", scene: sceneSyncTarget,
			prelude: func(h *hostileEnv) {
				// The requested blocks arrive, are written and committed:
				// the target says it is done.
				h.send(msgs(wire.ResyncReply{ID: h.req.ID, Offset: h.req.Offset, Length: h.req.Length, Status: wire.ReplyData,
					Data: make([]byte, h.req.Length)})...)
				for {
					if c := h.await(transport.Data, wire.TypeCommand).(wire.Command); c.Code == wire.CmdResyncDone {
						break
					}
				}
			},
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ResyncReply{ID: h.req.ID, Offset: h.req.Offset, Length: h.req.Length, Status: wire.ReplyData,
					Data: bytes.Repeat([]byte{0xAB}, int(h.req.Length))})
			},
			want: "resync reply 1 for [65536, +16384) was not requested"},
		{name: "ResyncReply/overflowing 64 bits", scene: sceneSyncTarget,
			frames: fixed(msgs(wire.ResyncReply{ID: 1, Offset: math.MaxUint64 - 4095, Length: 8192, Status: wire.ReplyInSync})...),
			want:   "wire: ResyncReply: offset 18446744073709547520 + length 8192 overflows"},
		{name: "ResyncReply/length oversized", scene: sceneSyncTarget,
			frames: fixed(msgs(wire.ResyncReply{ID: 1, Length: wire.MaxData + 4096, Status: wire.ReplyInSync})...),
			want:   "wire: ResyncReply: length 33558528 above the 32 MiB maximum"},
		// ResyncAck
		{name: "ResyncAck/while not SyncSource", scene: sceneSecondary,
			frames: fixed(msgs(wire.ResyncAck{ID: 1, Length: 4096})...),
			want:   "resync ack while not SyncSource"},
		{name: "ResyncAck/for a range never served", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncAck{ID: 1, Offset: 16 * 4096, Length: 4 * 4096})...),
			want:   "resync ack for [65536, +16384), which was not served"},
		{name: "ResyncAck/twice", scene: sceneSyncSource,
			prelude: func(h *hostileEnv) {
				h.send(msgs(wire.ResyncRequest{ID: 1, Offset: 16 * 4096, Length: 4 * 4096})...)
				h.await(transport.Data, wire.TypeResyncReply)
				h.send(msgs(wire.ResyncAck{ID: 1, Offset: 16 * 4096, Length: 4 * 4096})...)
				h.p.wait(h.p.alpha, "the acked blocks in sync", func(Snapshot) bool { return h.p.alpha.md.OutOfSync() == 0 })
			},
			frames: fixed(msgs(wire.ResyncAck{ID: 1, Offset: 16 * 4096, Length: 4 * 4096})...),
			want:   "resync ack for [65536, +16384), which was not served"},
		{name: "ResyncAck/past the end of the device", scene: sceneSyncSource,
			frames: func(h *hostileEnv) []hframe { return msgs(wire.ResyncAck{ID: 1, Offset: h.size, Length: 4096}) },
			want:   "resync ack for [32493568, +4096), which was not served"},
		{name: "ResyncAck/overflowing 64 bits", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncAck{ID: 1, Offset: math.MaxUint64 - 4095, Length: 8192})...),
			want:   "wire: ResyncAck: offset 18446744073709547520 + length 8192 overflows"},
		{name: "ResyncAck/length oversized", scene: sceneSyncSource,
			frames: fixed(msgs(wire.ResyncAck{ID: 1, Length: wire.MaxData + 4096})...),
			want:   "wire: ResyncAck: length 33558528 above the 32 MiB maximum"},
		// VerifyRequest
		{name: "VerifyRequest/while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.VerifyRequest{ID: 1, Length: 4096, Digest: make([]byte, 32)})...),
			want:   "verify request while not VerifyT"},
		{name: "VerifyRequest/on VerifyS", scene: sceneVerifyS,
			frames: fixed(msgs(wire.VerifyRequest{ID: 1, Length: 4096, Digest: make([]byte, 32)})...),
			want:   "verify request while not VerifyT"},
		{name: "VerifyRequest/past the end of the device", scene: sceneVerifyT,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.VerifyRequest{ID: 1, Offset: h.size, Length: 4096, Digest: make([]byte, 32)})
			},
			want: "verify request of 4096 bytes at 32493568 lies past the end of the device"},
		{name: "VerifyRequest/digest not of verify-alg", scene: sceneVerifyT,
			frames: fixed(msgs(wire.VerifyRequest{ID: 1, Length: 4096, Digest: make([]byte, 7)})...),
			want:   "VerifyRequest with a 7-byte digest, verify-alg sha256 makes 32"},
		{name: "VerifyRequest/digest oversized", scene: sceneVerifyT,
			frames: fixed(msgs(wire.VerifyRequest{ID: 1, Length: 4096, Digest: make([]byte, 65)})...),
			want:   "wire: VerifyRequest: digest of 65 bytes, want 1 to 64"},
		{name: "VerifyRequest/overflowing 64 bits", scene: sceneVerifyT,
			frames: fixed(msgs(wire.VerifyRequest{ID: 1, Offset: math.MaxUint64 - 4095, Length: 8192, Digest: make([]byte, 32)})...),
			want:   "wire: VerifyRequest: offset 18446744073709547520 + length 8192 overflows"},
		// VerifyReply
		{name: "VerifyReply/never asked for", scene: sceneSecondary,
			frames: fixed(msgs(wire.VerifyReply{ID: 1, Length: 4096})...),
			want:   "verify reply while not VerifyS"},
		{name: "VerifyReply/on VerifyT", scene: sceneVerifyT,
			frames: fixed(msgs(wire.VerifyReply{ID: 1, Length: 4096})...),
			want:   "verify reply while not VerifyS"},
		{name: "VerifyReply/for an id never asked", scene: sceneVerifyS,
			frames: fixed(msgs(wire.VerifyReply{ID: 1 << 40, Length: 4096, Status: wire.VerifyDiffers})...),
			want:   "verify reply 1099511627776 was not asked for"},
		{name: "VerifyReply/for another block", scene: sceneVerifyS,
			frames: fixed(msgs(wire.VerifyReply{ID: 1, Offset: 4096, Length: 4096, Status: wire.VerifyDiffers})...),
			want:   "verify reply 1 was not asked for"},
		{name: "VerifyReply/past the end of the device", scene: sceneVerifyS,
			frames: func(h *hostileEnv) []hframe { return msgs(wire.VerifyReply{ID: 1, Offset: h.size, Length: 4096}) },
			want:   "verify reply 1 was not asked for"},
		{name: "VerifyReply/length oversized", scene: sceneVerifyS,
			frames: fixed(msgs(wire.VerifyReply{ID: 1, Length: wire.MaxData + 4096})...),
			want:   "wire: VerifyReply: length 33558528 above the 32 MiB maximum"},
		{name: "VerifyReply/twice", scene: sceneVerifyS,
			frames: fixed(msgs(wire.VerifyReply{ID: 1, Length: 4096}, wire.VerifyReply{ID: 1, Length: 4096, Status: wire.VerifyDiffers})...),
			want:   "verify reply 1 was not asked for"},
		{name: "VerifyReply/on the data stream", scene: sceneVerifyS,
			frames: fixed(onStream(transport.Data, wire.VerifyReply{ID: 1, Length: 4096, Status: wire.VerifyDiffers})),
			want:   "VerifyReply on the data stream"},
		// OutOfSync
		{name: "OutOfSync/while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.OutOfSync{Length: 4096})...),
			want:   "out-of-sync notice while Connected"},
		{name: "OutOfSync/past the end of the device", scene: sceneBehind,
			frames: func(h *hostileEnv) []hframe { return msgs(wire.OutOfSync{Offset: h.size, Length: 4096}) },
			want:   "out-of-sync notice of 4096 bytes at 32493568 lies past the end of the device"},
		{name: "OutOfSync/overflowing 64 bits", scene: sceneBehind,
			frames: fixed(msgs(wire.OutOfSync{Offset: math.MaxUint64 - 4095, Length: 8192})...),
			want:   "wire: OutOfSync: offset 18446744073709547520 + length 8192 overflows"},
		{name: "OutOfSync/length oversized", scene: sceneBehind,
			frames: fixed(msgs(wire.OutOfSync{Length: wire.MaxData + 4096})...),
			want:   "wire: OutOfSync: length 33558528 above the 32 MiB maximum"},
		// Command
		{name: "Command/unknown code", scene: sceneSecondary,
			frames: fixed(msgs(wire.Command{Code: 9})...),
			want:   "wire: Command: code 9 unknown"},
		{name: "Command/resync done while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.Command{Code: wire.CmdResyncDone})...),
			want:   "resync end while not SyncSource"},
		{name: "Command/resync done before the target finished", scene: sceneSyncTarget,
			frames: fixed(msgs(wire.Command{Code: wire.CmdResyncDone})...),
			want:   "resync end from the source before this target finished"},
		{name: "Command/verify done while Connected", scene: sceneSecondary,
			frames: fixed(msgs(wire.Command{Code: wire.CmdVerifyDone})...),
			want:   "verify end while not VerifyT"},
		{name: "Command/verify start without verify-alg", scene: sceneSecondary,
			frames: fixed(msgs(wire.Command{Code: wire.CmdVerifyStart})...),
			want:   "verify start while Connected without a verify-alg"},
		{name: "Command/verify start twice", scene: sceneVerifyT,
			frames: fixed(msgs(wire.Command{Code: wire.CmdVerifyStart})...),
			want:   "verify start while VerifyT"},
		{name: "Command/verify start past the end of the device", scene: sceneVerifyTReady,
			frames: fixed(msgs(wire.Command{Code: wire.CmdVerifyStart, Arg: 1 << 40})...),
			want:   "verify from block 1099511627776 of 7933"},
		{name: "Command/invalidate while Inconsistent", scene: sceneWFBitMapT,
			frames: fixed(msgs(wire.Command{Code: wire.CmdInvalidate})...),
			want:   "asked to be SyncSource while WFBitMapT/Inconsistent"},
		{name: "Command/invalidate-remote while Primary", scene: scenePrimary,
			frames: fixed(msgs(wire.Command{Code: wire.CmdInvalidateRemote})...),
			want:   "asked to be SyncTarget while Primary/Connected"},
		{name: "Command/ahead while Primary", scene: scenePrimary,
			frames: fixed(msgs(wire.Command{Code: wire.CmdAhead})...),
			want:   "the peer went Ahead while this node is Primary/Connected"},
		{name: "Command/ahead twice", scene: sceneBehind,
			frames: fixed(msgs(wire.Command{Code: wire.CmdAhead})...),
			want:   "the peer went Ahead while this node is Secondary/Behind"},
		// Sizes
		{name: "Sizes/in the handshake", scene: sceneHandshake,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.Params{DiskSize: h.size, Size: h.size, Protocol: 'C', MaxEpoch: 2048}, wire.Sizes{Kind: wire.SizesQuery})
			},
			want: "handshake message 2 is Sizes, expected State"},
		{name: "Sizes/reply never asked for", scene: sceneSecondary,
			frames: fixed(msgs(wire.Sizes{Kind: wire.SizesReply, Disk: 1 << 20, Size: 1 << 20})...),
			want:   "resize answer (kind 2) that nobody asked for"},
		{name: "Sizes/done never asked for", scene: sceneSecondary,
			frames: fixed(msgs(wire.Sizes{Kind: wire.SizesDone, Size: 1 << 20})...),
			want:   "resize answer (kind 4) that nobody asked for"},
		{name: "Sizes/set while this node is Primary", scene: scenePrimary,
			frames: fixed(msgs(wire.Sizes{Kind: wire.SizesSet, Size: 1 << 20})...),
			want:   "resize asked while Connected/Primary, peer Secondary"},
		{name: "Sizes/set from a Secondary", scene: sceneBothSecondary,
			frames: fixed(msgs(wire.Sizes{Kind: wire.SizesSet, Size: 1 << 20})...),
			want:   "resize asked while Connected/Secondary, peer Secondary"},
		{name: "Sizes/size out of range", scene: sceneSecondary,
			frames: fixed(msgs(wire.Sizes{Kind: wire.SizesSet, Size: wire.MaxSize + 4096})...),
			want:   "wire: Sizes: size 72057594037932032 above the maximum 72057594037927936"},
		// Reads of a diskless Primary (diskless.go).
		{name: "ReadReply/never asked for", scene: scenePrimary,
			frames: fixed(msgs(wire.ReadReply{ID: 7, Offset: 0, Length: 4096, Status: wire.ReadOK, Data: block})...),
			want:   "a read reply (id 7) for no read asked"},
		{name: "ReadRequest/past the device", scene: sceneSecondary,
			frames: func(h *hostileEnv) []hframe {
				return msgs(wire.ReadRequest{ID: 1, Offset: uint64(h.size), Length: 4096})
			},
			want: "read request of 4096 bytes at"},
		{name: "ReadRequest/above the bound", scene: sceneSecondary,
			frames: fixed(msgs(wire.ReadRequest{ID: 1, Offset: 0, Length: 2 << 20})...),
			want:   "a read request of 2097152 bytes, above the 1048576"},
		// Frames no message type has.
		{name: "frame/checksum mismatch (a bit flipped in a Write)", scene: sceneProxied,
			frames: func(h *hostileEnv) []hframe {
				h.px.armed.Store(true)
				return msgs(wire.Write{Seq: 1, Epoch: 1, Length: 64 << 10, Data: bytes.Repeat(block, 16)})
			},
			want: "frame checksum mismatch"},
		{name: "frame/unknown type", scene: sceneSecondary,
			frames: fixed(hframe{transport.Data, hostileType, []byte{1, 2, 3}}),
			want:   "unknown frame type 40"},
	}...)
}

// sceneVerifyTReady: alpha Secondary with verify-alg, Connected, the
// peer Primary; no verify runs.
func sceneVerifyTReady(t *testing.T) *hostileEnv {
	p, f := connectFakeOpts(t, hostileVerifyOpts, hostilePrimary, nil)
	return newEnv(t, p, f)
}

// TestHostilePeer: every message type, cut short, extended, out of range,
// duplicated and out of place, from a peer that completed the real
// handshake (or is in it), ends the session as a protocol error: alpha
// logs the reason once, naming the message, reconnects, and its disk and
// bitmap are exactly as before (but for its own unconfirmed write, which
// it marks).
func TestHostilePeer(t *testing.T) {
	for _, tc := range hostileCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := tc.scene(t)
			if tc.prelude != nil {
				tc.prelude(h)
			}
			disk, bm, count := h.data(), h.marked(), h.p.alpha.md.OutOfSync()
			logFrom := len(h.p.logs[0].String())
			for _, f := range tc.frames(h) {
				// Alpha may end the session before the last frame.
				if err := h.f.s.Send(f.st, f.typ, f.payload); err != nil {
					break
				}
			}
			log := func() string { return h.p.logs[0].String()[logFrom:] }
			h.p.wait(h.p.alpha, "ProtocolError, then WFConnection and the loss logged", func(Snapshot) bool {
				l := log()
				return strings.Contains(l, " ProtocolError -> WFConnection )") && strings.Contains(l, `msg="connection to the peer lost"`)
			})
			if h.wrote != nil {
				h.written()
			}
			if !strings.Contains(log(), " -> ProtocolError )") {
				t.Errorf("no conn( … -> ProtocolError ) in the log")
			}
			var lost []string
			for _, l := range strings.Split(log(), "\n") {
				if strings.Contains(l, `msg="connection to the peer lost"`) {
					lost = append(lost, l)
				}
			}
			if len(lost) != 1 || !strings.Contains(lost[0], tc.want) {
				t.Errorf("the loss is logged as %q, want one line saying %q", lost, tc.want)
			}
			if h.data() != disk {
				t.Errorf("alpha's disk changed")
			}
			if tc.marked[1] > 0 {
				for b := tc.marked[0] / bitmap.BlockSize; b < (tc.marked[0]+tc.marked[1])/bitmap.BlockSize; b++ {
					if !bm[b] {
						bm[b] = true
						count++
					}
				}
			}
			after := h.p.alpha.md.OutOfSync()
			if got := h.marked(); after != count || !slices.Equal(got, bm) {
				t.Errorf("alpha's bitmap: %d blocks marked (%v), want %d (%v)", after, runsOf(got), count, runsOf(bm))
			}
		})
	}
}

// runsOf lists the runs of set blocks, "start+n".
func runsOf(bm []bool) []string {
	var runs []string
	for i := 0; i < len(bm); {
		if !bm[i] {
			i++
			continue
		}
		j := i
		for j < len(bm) && bm[j] {
			j++
		}
		runs = append(runs, fmt.Sprintf("%d+%d", i, j-i))
		i = j
	}
	return runs
}
