package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// memBackend is a Backend over a byte slice, with hooks to delay, fail and
// count calls.
type memBackend struct {
	mu   sync.Mutex
	data []byte

	flushes   atomic.Int64
	fuaWrites atomic.Int64
	trims     atomic.Int64
	zeroes    atomic.Int64
	noHoles   atomic.Int64
	active    atomic.Int64 // calls in progress
	calls     atomic.Int64 // ReadAt and WriteAt calls begun
	maxActive atomic.Int64
	// outside counts calls that reached past the end of data: the server
	// must never make one.
	outside atomic.Int64

	// gate, when set, blocks every ReadAt and WriteAt until it is closed.
	gate chan struct{}
	// failRead / failWrite make every ReadAt / WriteAt fail with this error.
	failRead, failWrite error
	// failFlushes makes the first failFlushes flushes fail with EIO.
	failFlushes int64
	// hold, when set, makes a read at a listed offset wait until that
	// offset's channel is closed.
	hold map[int64]chan struct{}
	// readDelay delays reads by offset: reads at lower offsets wait longer,
	// so replies come back in reverse order.
	readDelay func(off int64) time.Duration
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) enter() func() {
	m.calls.Add(1)
	n := m.active.Add(1)
	for {
		cur := m.maxActive.Load()
		if n <= cur || m.maxActive.CompareAndSwap(cur, n) {
			break
		}
	}
	if m.gate != nil {
		<-m.gate
	}
	return func() { m.active.Add(-1) }
}

func (m *memBackend) Size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data))
}

// inside reports whether [off, off+n) lies within the data, counting the
// calls that do not.
func (m *memBackend) inside(off, n int64) bool {
	if off < 0 || n < 0 || off > int64(len(m.data))-n {
		m.outside.Add(1)
		return false
	}
	return true
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	defer m.enter()()
	if ch := m.hold[off]; ch != nil {
		<-ch
	}
	if !m.inside(off, int64(len(p))) {
		return 0, io.ErrUnexpectedEOF
	}
	if m.readDelay != nil {
		time.Sleep(m.readDelay(off))
	}
	if m.failRead != nil {
		return 0, m.failRead
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64, fua bool) error {
	defer m.enter()()
	if m.failWrite != nil {
		return m.failWrite
	}
	if !m.inside(off, int64(len(p))) {
		return io.ErrShortWrite
	}
	if fua {
		m.fuaWrites.Add(1)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush() error {
	n := m.flushes.Add(1)
	if m.failFlushes >= n {
		return syscall.EIO
	}
	return nil
}

func (m *memBackend) Trim(off, length int64, fua bool) error {
	m.trims.Add(1)
	return m.WriteZeroes(off, length, true, fua)
}

func (m *memBackend) WriteZeroes(off, length int64, noHole, fua bool) error {
	m.zeroes.Add(1)
	if noHole {
		m.noHoles.Add(1)
	}
	if !m.inside(off, length) {
		return io.ErrShortWrite
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) bytes(off, n int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

// testLogger writes the server's log to the test output.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startServer serves cat on a Unix socket and returns its path. The server
// is closed when the test ends.
func startServer(t testing.TB, cat Catalog, tune func(*Server)) (*Server, string) {
	t.Helper()
	srv := &Server{Catalog: cat, Logger: testLogger(t)}
	if tune != nil {
		tune(srv)
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, path
}

// oneExport is a catalog with a single export "disk" (also the default).
func oneExport(t testing.TB, e *Export) *Exports {
	t.Helper()
	if e.Name == "" {
		e.Name = "disk"
	}
	cat := &Exports{Default: e.Name}
	if err := cat.Add(e); err != nil {
		t.Fatal(err)
	}
	return cat
}

// client is a raw NBD client for tests: it sends exactly the bytes a test
// asks for, so it can also misbehave.
type client struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func dial(t testing.TB, path string) *client {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the greeting and sends the client flags.
func (c *client) greet(flags uint32) {
	c.t.Helper()
	g := c.read(greetingSize)
	if binary.BigEndian.Uint64(g[0:8]) != magicNBD || binary.BigEndian.Uint64(g[8:16]) != magicIHaveOpt {
		c.t.Fatalf("bad greeting % x", g)
	}
	if f := binary.BigEndian.Uint16(g[16:18]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (c *client) option(opt uint32, payload []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	c.write(append(b, payload...))
}

type optReply struct {
	opt, typ uint32
	payload  []byte
}

func (c *client) optReply() optReply {
	c.t.Helper()
	h := c.read(20)
	if m := binary.BigEndian.Uint64(h[0:8]); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	n := binary.BigEndian.Uint32(h[16:20])
	if n > 1<<20 {
		c.t.Fatalf("option reply of %d bytes", n)
	}
	return optReply{binary.BigEndian.Uint32(h[8:12]), binary.BigEndian.Uint32(h[12:16]), c.read(int(n))}
}

func infoRequest(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

// goExport negotiates with NBD_OPT_GO and returns the size and flags.
func (c *client) goExport(name string) (uint64, uint16) {
	c.t.Helper()
	c.option(optGo, infoRequest(name))
	var size uint64
	var flags uint16
	for {
		r := c.optReply()
		switch r.typ {
		case repInfo:
			if binary.BigEndian.Uint16(r.payload[0:2]) == infoExport {
				size = binary.BigEndian.Uint64(r.payload[2:10])
				flags = binary.BigEndian.Uint16(r.payload[10:12])
			}
		case repAck:
			return size, flags
		default:
			c.t.Fatalf("NBD_OPT_GO: reply type %#x: %s", r.typ, r.payload)
		}
	}
}

// open connects, negotiates with GO and returns a client in transmission.
func open(t testing.TB, path, name string) *client {
	t.Helper()
	c := dial(t, path)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.goExport(name)
	return c
}

func (c *client) request(r Request, payload []byte) {
	c.t.Helper()
	b, _ := r.AppendBinary(nil)
	c.write(append(b, payload...))
}

// reply reads one simple reply header.
func (c *client) reply() (Errno, uint64) {
	c.t.Helper()
	h := c.read(replySize)
	if m := binary.BigEndian.Uint32(h[0:4]); m != magicReply {
		c.t.Fatalf("reply magic %#x", m)
	}
	return Errno(binary.BigEndian.Uint32(h[4:8])), binary.BigEndian.Uint64(h[8:16])
}

// do sends one request and waits for its reply; for a successful READ it
// returns the data.
func (c *client) do(r Request, payload []byte) (Errno, []byte) {
	c.t.Helper()
	c.request(r, payload)
	errno, cookie := c.reply()
	if cookie != r.Cookie {
		c.t.Fatalf("reply for cookie %d, want %d", cookie, r.Cookie)
	}
	if r.Type == CmdRead && errno == 0 {
		return 0, c.read(int(r.Length))
	}
	return errno, nil
}

// expectClosed asserts that the server closes the connection without
// sending anything more.
func (c *client) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := c.br.ReadByte()
	if err == nil {
		c.t.Fatalf("server sent %#x, want the connection closed", b)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("read: %v, want the connection closed", err)
	}
}
