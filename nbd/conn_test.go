package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestTransmission_ReadWrite(t *testing.T) {
	be := newMem(1 << 20)
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	data := bytes.Repeat([]byte("nbdmirror"), 1000)
	if errno, _ := c.do(Request{Type: CmdWrite, Cookie: 1, Offset: 4096, Length: uint32(len(data))}, data); errno != 0 {
		t.Fatalf("write: %v", errno)
	}
	errno, got := c.do(Request{Type: CmdRead, Cookie: 2, Offset: 4096, Length: uint32(len(data))}, nil)
	if errno != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v, equal=%v", errno, bytes.Equal(got, data))
	}
	if errno, _ := c.do(Request{Type: CmdWrite, Flags: CmdFlagFUA, Cookie: 3, Length: 1}, []byte{9}); errno != 0 || be.fuaWrites.Load() != 1 {
		t.Fatalf("FUA write: %v, fua writes %d", errno, be.fuaWrites.Load())
	}
	if errno, _ := c.do(Request{Type: CmdFlush, Cookie: 4}, nil); errno != 0 || be.flushes.Load() != 1 {
		t.Fatalf("flush: %v, flushes %d", errno, be.flushes.Load())
	}
	if errno, _ := c.do(Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole, Cookie: 5, Offset: 4096, Length: 100}, nil); errno != 0 || be.noHoles.Load() != 1 {
		t.Fatalf("write zeroes: %v", errno)
	}
	if errno, _ := c.do(Request{Type: CmdTrim, Cookie: 6, Offset: 4196, Length: 100}, nil); errno != 0 || be.trims.Load() != 1 {
		t.Fatalf("trim: %v", errno)
	}
	if got := be.bytes(4096, 300); !bytes.Equal(got[:200], make([]byte, 200)) || !bytes.Equal(got[200:], data[200:300]) {
		t.Fatalf("after zero and trim: % x", got)
	}
	if errno, got := c.do(Request{Type: CmdRead, Cookie: 7, Length: 0}, nil); errno != 0 || len(got) != 0 {
		t.Fatalf("zero-length read: %v %d", errno, len(got))
	}
}

// TestTransmission_Errors sends every kind of bad request and checks the
// errno and that the connection stays usable afterwards.
func TestTransmission_Errors(t *testing.T) {
	const size = 1 << 20
	cat := &Exports{}
	good := newMem(size)
	failing := newMem(size)
	failing.failRead = errors.New("disk on fire")
	failing.failWrite = syscall.ENOSPC
	for _, e := range []*Export{
		{Name: "rw", Backend: good},
		{Name: "ro", Backend: newMem(size), ReadOnly: true},
		{Name: "failing", Backend: failing},
	} {
		if err := cat.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	_, path := startServer(t, cat, nil)
	big := DefaultMaxPayload + 1
	tests := []struct {
		export  string
		name    string
		req     Request
		payload int // bytes of WRITE payload actually sent
		want    Errno
	}{
		{"rw", "read straddling the end", Request{Type: CmdRead, Offset: size - 512, Length: 1024}, 0, EINVAL},
		{"rw", "read at 2^63-512", Request{Type: CmdRead, Offset: 1<<63 - 512, Length: 512}, 0, EINVAL},
		{"rw", "write straddling the end", Request{Type: CmdWrite, Offset: size - 512, Length: 1024}, 1024, ENOSPC},
		{"rw", "write zeroes past the end", Request{Type: CmdWriteZeroes, Offset: size, Length: 512}, 0, ENOSPC},
		{"rw", "trim past the end", Request{Type: CmdTrim, Offset: size, Length: 512}, 0, EINVAL},
		{"rw", "unknown command with a length", Request{Type: 42, Length: 4096}, 0, EINVAL},
		{"rw", "cache", Request{Type: CmdCache, Length: 4096}, 0, EINVAL},
		{"rw", "unknown flag", Request{Type: CmdRead, Flags: 0x8000, Length: 512}, 0, EINVAL},
		{"rw", "NO_HOLE on write", Request{Type: CmdWrite, Flags: CmdFlagNoHole, Length: 512}, 512, EINVAL},
		{"rw", "flush with a length", Request{Type: CmdFlush, Length: 512}, 0, EINVAL},
		{"rw", "33 MiB read", Request{Type: CmdRead, Length: uint32(big)}, 0, EINVAL},
		{"rw", "33 MiB write is drained", Request{Type: CmdWrite, Length: uint32(big)}, big, EINVAL},
		{"ro", "write", Request{Type: CmdWrite, Length: 512}, 512, EPERM},
		{"ro", "trim", Request{Type: CmdTrim, Length: 512}, 0, EPERM},
		{"ro", "write zeroes", Request{Type: CmdWriteZeroes, Length: 512}, 0, EPERM},
		{"failing", "backend read error", Request{Type: CmdRead, Length: 512}, 0, EIO},
		{"failing", "backend ENOSPC", Request{Type: CmdWrite, Length: 512}, 512, ENOSPC},
	}
	conns := map[string]*client{}
	for _, name := range []string{"rw", "ro", "failing"} {
		conns[name] = open(t, path, name)
	}
	for i, tc := range tests {
		t.Run(tc.export+"/"+tc.name, func(t *testing.T) {
			c := conns[tc.export]
			c.t = t
			tc.req.Cookie = uint64(1000 + i)
			errno, _ := c.do(tc.req, make([]byte, tc.payload))
			if errno != tc.want {
				t.Fatalf("errno %d (%v), want %d (%v)", errno, errno, tc.want, tc.want)
			}
			// The connection is still in sync: a valid read works and
			// returns data, not a stale reply.
			if errno, _ := c.do(Request{Type: CmdRead, Cookie: 1, Length: 16}, nil); errno != 0 && tc.export != "failing" {
				t.Fatalf("read after the error: %v", errno)
			}
		})
	}
	// An oversized write that is too big to drain ends the connection.
	c := open(t, path, "rw")
	c.request(Request{Type: CmdWrite, Cookie: 9, Length: maxDrain + 1}, nil)
	c.expectClosed()
	// A request with a bad magic ends the connection.
	c = open(t, path, "rw")
	c.write(bytes.Repeat([]byte{0x55}, requestSize))
	c.expectClosed()
}

func TestTransmission_ReadErrorSendsNoData(t *testing.T) {
	be := newMem(1 << 20)
	be.failRead = errors.New("media error")
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	c.request(Request{Type: CmdRead, Cookie: 1, Length: 4096}, nil)
	c.request(Request{Type: CmdFlush, Cookie: 2}, nil)
	// Two reply headers, in either order, and nothing else: no data was
	// sent for the failed read (reply() checks each header's magic).
	got := map[uint64]Errno{}
	for range 2 {
		errno, cookie := c.reply()
		got[cookie] = errno
	}
	if got[1] != EIO || got[2] != 0 || len(got) != 2 {
		t.Fatalf("replies %v, want cookie 1 EIO and cookie 2 success", got)
	}
	c.nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, _ := c.br.Read(make([]byte, 1)); n != 0 {
		t.Fatal("data followed the error reply")
	}
}

func TestTransmission_OutOfOrderReplies(t *testing.T) {
	be := newMem(1 << 20)
	// Lower offsets take longer, so 64 queued reads complete in reverse.
	be.readDelay = func(off int64) time.Duration { return time.Duration(64-off/4096) * time.Millisecond }
	for i := range be.data {
		be.data[i] = byte(i / 4096)
	}
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	var reqs []byte
	for i := range 64 {
		reqs, _ = Request{Type: CmdRead, Cookie: uint64(i), Offset: uint64(i) * 4096, Length: 4096}.AppendBinary(reqs)
	}
	c.write(reqs)
	seen := map[uint64]bool{}
	var order []uint64
	for range 64 {
		errno, cookie := c.reply()
		if errno != 0 || seen[cookie] || cookie >= 64 {
			t.Fatalf("reply errno %v cookie %d", errno, cookie)
		}
		seen[cookie] = true
		order = append(order, cookie)
		if d := c.read(4096); !bytes.Equal(d, bytes.Repeat([]byte{byte(cookie)}, 4096)) {
			t.Fatalf("data of read %d is wrong", cookie)
		}
	}
	inOrder := true
	for i, ck := range order {
		inOrder = inOrder && ck == uint64(i)
	}
	if inOrder {
		t.Error("64 queued reads completed strictly in order: requests are not handled concurrently")
	}
	if be.maxActive.Load() < 8 {
		t.Errorf("at most %d reads ran at once", be.maxActive.Load())
	}
}

func TestTransmission_Backpressure(t *testing.T) {
	tests := []struct {
		name        string
		maxInFlight int
		maxBytes    int64
		reqLen      uint32
		wantMax     int64
	}{
		{"requests", 4, 1 << 30, 512, 4},
		{"bytes", 128, 64 << 10, 16 << 10, 4},
		{"one oversized request still runs", 128, 8 << 10, 16 << 10, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			be := newMem(4 << 20)
			be.gate = make(chan struct{})
			srv, path := startServer(t, oneExport(t, &Export{Backend: be}), func(s *Server) {
				s.MaxInFlight, s.MaxInFlightBytes = tc.maxInFlight, tc.maxBytes
			})
			c := open(t, path, "disk")
			go func() {
				// The client floods 32 writes without reading replies.
				for i := range 32 {
					b, _ := Request{Type: CmdWrite, Cookie: uint64(i), Length: tc.reqLen}.AppendBinary(nil)
					if _, err := c.nc.Write(append(b, make([]byte, tc.reqLen)...)); err != nil {
						return
					}
				}
			}()
			waitFor(t, func() bool { return be.active.Load() == tc.wantMax })
			// Nothing more gets in while the backend is stuck.
			time.Sleep(50 * time.Millisecond)
			if n := be.active.Load(); n != tc.wantMax {
				t.Fatalf("%d writes in flight, want the limit %d", n, tc.wantMax)
			}
			if _, b := srv.total.inUse(); b > int64(tc.wantMax)*int64(tc.reqLen) {
				t.Errorf("%d bytes charged in flight", b)
			}
			close(be.gate)
			for range 32 {
				if errno, _ := c.reply(); errno != 0 {
					t.Fatalf("write: %v", errno)
				}
			}
			if be.maxActive.Load() != tc.wantMax {
				t.Errorf("max %d in flight, want %d", be.maxActive.Load(), tc.wantMax)
			}
		})
	}
}

// waitFor polls cond until it holds or ten seconds pass.
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestTransmission_DiscFinishesInFlightThenFlushes(t *testing.T) {
	be := newMem(1 << 20)
	be.gate = make(chan struct{})
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	c.request(Request{Type: CmdWrite, Cookie: 1, Length: 4}, []byte("abcd"))
	waitFor(t, func() bool { return be.active.Load() == 1 })
	c.request(Request{Type: CmdDisc}, nil)
	time.Sleep(20 * time.Millisecond)
	if be.flushes.Load() != 0 {
		t.Fatal("flushed before the in-flight write finished")
	}
	close(be.gate)
	if errno, cookie := c.reply(); errno != 0 || cookie != 1 {
		t.Fatalf("in-flight write after DISC: %v %d", errno, cookie)
	}
	c.expectClosed()
	if be.flushes.Load() != 1 {
		t.Errorf("%d flushes after DISC, want 1", be.flushes.Load())
	}
	if string(be.bytes(0, 4)) != "abcd" {
		t.Error("write lost")
	}
}

// A failed FLUSH leaves the writes unflushed, so DISC still flushes.
func TestTransmission_FailedFlushFlushedAgainAtDisc(t *testing.T) {
	be := newMem(1 << 20)
	be.failFlushes = 1
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	if errno, _ := c.do(Request{Type: CmdWrite, Cookie: 1, Length: 4}, []byte("abcd")); errno != 0 {
		t.Fatalf("write: %v", errno)
	}
	if errno, _ := c.do(Request{Type: CmdFlush, Cookie: 2}, nil); errno != EIO {
		t.Fatalf("failing flush: %v, want EIO", errno)
	}
	c.request(Request{Type: CmdDisc}, nil)
	c.expectClosed()
	if n := be.flushes.Load(); n != 2 {
		t.Errorf("%d flushes, want the failed one and one at DISC", n)
	}
}

func TestServer_ShutdownGraceful(t *testing.T) {
	be := newMem(1 << 20)
	be.gate = make(chan struct{})
	srv, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	idle := dial(t, path) // still negotiating
	idle.read(greetingSize)
	c.request(Request{Type: CmdWrite, Cookie: 1, Length: 4}, []byte("wxyz"))
	waitFor(t, func() bool { return be.active.Load() == 1 })
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(context.Background()) }()
	idle.expectClosed()
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(be.gate)
	if errno, _ := c.reply(); errno != 0 {
		t.Fatalf("in-flight write: %v", errno)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	c.expectClosed()
	if be.flushes.Load() != 1 {
		t.Errorf("%d flushes, want 1", be.flushes.Load())
	}
	if nc, err := net.Dial("unix", path); err == nil {
		nc.Close()
		t.Error("server still accepts after Shutdown")
	}
}

func TestServer_ShutdownDeadline(t *testing.T) {
	be := newMem(1 << 20)
	be.gate = make(chan struct{})
	srv, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	c.request(Request{Type: CmdRead, Cookie: 1, Length: 4}, nil)
	waitFor(t, func() bool { return be.active.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	time.Sleep(100 * time.Millisecond)
	close(be.gate) // Close waits for the stuck backend call
	if err := <-done; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
	}
	c.expectClosed()
}

func TestServer_MaxConnsAndConns(t *testing.T) {
	srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(4096)}), func(s *Server) { s.MaxConns = 2 })
	a := open(t, path, "disk")
	b := dial(t, path)
	b.read(greetingSize)
	waitFor(t, func() bool { return len(srv.Conns()) == 2 })
	var exports []string
	for _, ci := range srv.Conns() {
		exports = append(exports, ci.Export)
	}
	if !(exports[0] == "disk" && exports[1] == "") && !(exports[0] == "" && exports[1] == "disk") {
		t.Errorf("Conns exports %q", exports)
	}
	c := dial(t, path)
	if _, err := io.ReadFull(c.br, make([]byte, 1)); err == nil {
		t.Fatal("third connection was served with MaxConns 2")
	}
	if errno, _ := a.do(Request{Type: CmdRead, Cookie: 1, Length: 1}, nil); errno != 0 {
		t.Errorf("existing connection broken: %v", errno)
	}
}

func TestServer_CloseIsImmediate(t *testing.T) {
	be := newMem(1 << 20)
	srv, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	if errno, _ := c.do(Request{Type: CmdWrite, Cookie: 1, Length: 1}, []byte{1}); errno != 0 {
		t.Fatal(errno)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()
	if be.flushes.Load() != 0 {
		t.Errorf("Close flushed %d times; it must not", be.flushes.Load())
	}
	l, err := net.Listen("unix", path+"2")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Close: %v", err)
	}
}

func TestMultiConnFlushCoversOtherConnections(t *testing.T) {
	be := newMem(1 << 20)
	_, path := startServer(t, oneExport(t, &Export{Backend: be, MultiConn: true}), nil)
	w, r := open(t, path, "disk"), open(t, path, "disk")
	if errno, _ := w.do(Request{Type: CmdWrite, Cookie: 1, Offset: 100, Length: 3}, []byte("xyz")); errno != 0 {
		t.Fatal(errno)
	}
	if errno, _ := r.do(Request{Type: CmdFlush, Cookie: 2}, nil); errno != 0 || be.flushes.Load() != 1 {
		t.Fatalf("flush on the other connection: %v, %d backend flushes", errno, be.flushes.Load())
	}
	if errno, d := r.do(Request{Type: CmdRead, Cookie: 3, Offset: 100, Length: 3}, nil); errno != 0 || string(d) != "xyz" {
		t.Fatalf("read on the other connection: %v %q", errno, d)
	}
}

func TestErrnoOf(t *testing.T) {
	tests := []struct {
		err  error
		want Errno
	}{
		{syscall.ENOSPC, ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EROFS, EPERM},
		{syscall.EINVAL, EINVAL},
		{syscall.EIO, EIO},
		{errors.New("other"), EIO},
		{ESHUTDOWN, ESHUTDOWN},
		{&wrapped{syscall.EDQUOT}, ENOSPC},
	}
	for _, tc := range tests {
		if got := errnoOf(tc.err); got != tc.want {
			t.Errorf("errnoOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

type wrapped struct{ err error }

func (w *wrapped) Error() string { return "wrapped: " + w.err.Error() }
func (w *wrapped) Unwrap() error { return w.err }

// TestReplyBatching checks that pipelined requests share write system calls
// and that every reply still arrives whole.
func TestReplyBatching(t *testing.T) {
	be := newMem(8 << 20)
	srv, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	var reqs []byte
	const n = 500
	for i := range n {
		reqs, _ = Request{Type: CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 512, Length: 512}.AppendBinary(reqs)
		reqs = append(reqs, bytes.Repeat([]byte{byte(i)}, 512)...)
		reqs, _ = Request{Type: CmdRead, Cookie: uint64(n + i), Offset: uint64(i) * 512, Length: 16}.AppendBinary(reqs)
	}
	go c.nc.Write(reqs)
	got := map[uint64]bool{}
	for range 2 * n {
		errno, cookie := c.reply()
		if errno != 0 || got[cookie] {
			t.Fatalf("cookie %d errno %v", cookie, errno)
		}
		got[cookie] = true
		if cookie >= n {
			d := c.read(16)
			// A read may overtake the write of the same block; it
			// returns either the old or the new contents, whole.
			i := byte(cookie - n)
			if !bytes.Equal(d, make([]byte, 16)) && !bytes.Equal(d, bytes.Repeat([]byte{i}, 16)) {
				t.Fatalf("read %d returned % x", cookie-n, d)
			}
		}
	}
	if binary.BigEndian.Uint64(be.bytes(0, 8)) != 0 || be.bytes(499*512, 1)[0] != byte(499%256) {
		t.Error("writes lost")
	}
	// 1000 replies must have been batched into far fewer writes.
	if w := srv.replyWrites.Load(); w > 2*n*8/10 {
		t.Errorf("%d write calls for %d replies: replies are not batched", w, 2*n)
	} else {
		t.Logf("%d write calls for %d replies", w, 2*n)
	}
}

// Handlers that finish together share a write of their replies even when
// no request waits to start (as when a peer's acks release writes under
// protocol C). With one processor, 64 writes wait inside the backend; once
// released, each handler's reply is written by itself without the
// writer's yields, with them by the first writer.
func TestReplyBatching_ReadyHandlers(t *testing.T) {
	be := newMem(1 << 20)
	be.gate = make(chan struct{})
	srv, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	const n = 64
	var reqs []byte
	for i := range n {
		reqs, _ = Request{Type: CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 512, Length: 512}.AppendBinary(reqs)
		reqs = append(reqs, bytes.Repeat([]byte{byte(i)}, 512)...)
	}
	c.write(reqs)
	deadline := time.Now().Add(10 * time.Second)
	for be.active.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d writes reached the backend", be.active.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
	before := srv.replyWrites.Load()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	close(be.gate)
	got := map[uint64]bool{}
	for range n {
		errno, cookie := c.reply()
		if errno != 0 || cookie >= n || got[cookie] {
			t.Fatalf("cookie %d errno %v", cookie, errno)
		}
		got[cookie] = true
	}
	if w := srv.replyWrites.Load() - before; w > n/8 {
		t.Fatalf("%d write calls for %d replies released together, want at most %d", w, n, n/8)
	} else {
		t.Logf("%d write calls for %d replies released together", w, n)
	}
}

// A request that arrives while the only worker is busy with a slow one
// gets a worker of its own: its reply does not wait for the slow request.
func TestTransmission_FastRequestNotBehindSlow(t *testing.T) {
	be := newMem(1 << 20)
	slow := make(chan struct{})
	be.hold = map[int64]chan struct{}{0: slow}
	_, path := startServer(t, oneExport(t, &Export{Backend: be}), nil)
	c := open(t, path, "disk")
	// One request first, so the connection has exactly one idle worker.
	if errno, _ := c.do(Request{Type: CmdRead, Cookie: 1, Offset: 8192, Length: 4096}, nil); errno != 0 {
		t.Fatalf("warm-up read: %v", errno)
	}
	var reqs []byte
	reqs, _ = Request{Type: CmdRead, Cookie: 2, Offset: 0, Length: 4096}.AppendBinary(reqs)
	reqs, _ = Request{Type: CmdRead, Cookie: 3, Offset: 4096, Length: 4096}.AppendBinary(reqs)
	c.write(reqs)
	got := make(chan uint64, 1)
	go func() {
		_, cookie := c.reply()
		got <- cookie
	}()
	select {
	case cookie := <-got:
		if cookie != 3 {
			t.Fatalf("first reply is for cookie %d, want the fast read (3)", cookie)
		}
	case <-time.After(5 * time.Second):
		close(slow)
		t.Fatal("the fast read waited behind the slow one")
	}
	c.read(4096)
	close(slow)
	if errno, cookie := c.reply(); errno != 0 || cookie != 2 {
		t.Fatalf("slow read: %v cookie %d", errno, cookie)
	}
	c.read(4096)
}

// recorder is an Observer that keeps what it was told.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) RequestStarted(export, op string) { r.add("start " + export + " " + op) }

func (r *recorder) RequestDone(export, op string, took time.Duration, failed bool) {
	ev := "done " + export + " " + op
	if failed {
		ev += " failed"
	}
	if took <= 0 {
		ev += " without a duration"
	}
	r.add(ev)
}

func (r *recorder) add(ev string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, ev)
}

// expect waits (10 s at most) until the events since the last expect are
// as many as want, checks them, and forgets them. The reply can reach the
// client before the Observer hears that it was queued.
func (r *recorder) expect(t *testing.T, what string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.Lock()
		got := slices.Clone(r.events)
		if len(got) >= len(want) || time.Now().After(deadline) {
			r.events = nil
			r.mu.Unlock()
			if !slices.Equal(got, want) {
				t.Fatalf("%s: events %q, want %q", what, got, want)
			}
			return
		}
		r.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

// TestTransmission_Observer: the server's Observer hears of every request
// as it is read and again once its reply is queued, by export and command,
// with its duration; refused requests (validation) and backend failures
// are reported failed.
func TestTransmission_Observer(t *testing.T) {
	failing := newMem(1 << 20)
	failing.failWrite = syscall.EIO
	rec := &recorder{}
	cat := &Exports{}
	for _, e := range []*Export{{Name: "disk", Backend: newMem(1 << 20)}, {Name: "bad", Backend: failing}} {
		if err := cat.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	srv, path := startServer(t, cat, func(s *Server) { s.Observer = rec })
	disk, bad := open(t, path, "disk"), open(t, path, "bad")
	for _, st := range []struct {
		c    *client
		req  Request
		data []byte
		want []string
	}{
		{disk, Request{Type: CmdWrite, Cookie: 1, Length: 4096}, make([]byte, 4096), []string{"start disk write", "done disk write"}},
		{disk, Request{Type: CmdRead, Cookie: 2, Length: 512}, nil, []string{"start disk read", "done disk read"}},
		{disk, Request{Type: CmdFlush, Cookie: 3}, nil, []string{"start disk flush", "done disk flush"}},
		{disk, Request{Type: CmdRead, Cookie: 4, Offset: 1 << 20, Length: 512}, nil, []string{"start disk read", "done disk read failed"}},
		{disk, Request{Type: CmdWrite, Cookie: 5, Offset: 1 << 20, Length: 4096}, make([]byte, 4096), []string{"start disk write", "done disk write failed"}},
		{bad, Request{Type: CmdWrite, Cookie: 6, Length: 4096}, make([]byte, 4096), []string{"start bad write", "done bad write failed"}},
	} {
		st.c.do(st.req, st.data)
		rec.expect(t, cmdName(st.req.Type), st.want...)
	}
	// A client that goes away in the middle of a write's payload leaves
	// nothing in flight: the request was never read whole.
	gone := open(t, path, "disk")
	gone.request(Request{Type: CmdWrite, Cookie: 7, Length: 4096}, make([]byte, 1000))
	gone.nc.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(srv.Conns()) > 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := len(srv.Conns()); n != 2 {
		t.Fatalf("%d connections after one of three closed", n)
	}
	rec.expect(t, "a write cut short")
}

// TestServer_ClientCountedAtGo: a client is counted (Conns names its
// export) before it is told it may start, so a demotion that asks who
// holds the export never misses a client whose negotiation just ended.
func TestServer_ClientCountedAtGo(t *testing.T) {
	srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(4096)}), nil)
	for i := range 50 {
		c := open(t, path, "disk")
		counted := false
		for _, ci := range srv.Conns() {
			counted = counted || ci.Export == "disk"
		}
		if !counted {
			t.Fatalf("connection %d: its GO was acknowledged, but Conns does not count it: %+v", i, srv.Conns())
		}
		c.nc.Close()
		waitFor(t, func() bool { return len(srv.Conns()) == 0 })
	}
}
