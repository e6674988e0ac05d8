package metadisk

import (
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// gate, once armed, holds the first metadata write into [lo, hi) until
// release is closed, reporting on entered that it is there; the held write
// then succeeds, or fails if fail is set.
type gate struct {
	*memDev
	lo, hi  int64
	fail    bool
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newGate(dev *memDev, lo, hi int64, fail bool) *gate {
	return &gate{memDev: dev, lo: lo, hi: hi, fail: fail, entered: make(chan struct{}), release: make(chan struct{})}
}

func (g *gate) WriteAt(p []byte, off int64) (int, error) {
	held := false
	if g.armed.Load() && off >= g.lo && off < g.hi {
		g.once.Do(func() {
			held = true
			close(g.entered)
			<-g.release
		})
	}
	if held && g.fail {
		return 0, io.ErrShortWrite
	}
	return g.memDev.WriteAt(p, off)
}

// within waits for ch or fails the test after a deadline.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// waitUntil polls cond (under m.mu) until it holds or a deadline passes.
func waitUntil(t *testing.T, m *Meta, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m.mu.Lock()
		ok := cond()
		m.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// openGated opens the metadata on dev through a gate, activated.
func openGated(t *testing.T, g *gate, l Layout, o Options) *Meta {
	t.Helper()
	m, err := Open(g, l, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	return m
}

// A bitmap write fails while a writer waits to commit a transaction that
// evicts the extent whose page failed: the commit must not go ahead (its
// eviction would drop the only record of the extent's writes), and the
// writer gets the error.
func TestMeta_FailedFlushStopsWaitingCommit(t *testing.T) {
	const x = bitmap.ExtentSize
	o := Options{ALExtents: 7}
	dev, l, m := newMeta(t, 256*mib, o)
	m.Close()
	g := newGate(dev, l.Offset+offBitmap, l.Offset+l.Size, true)
	m = openGated(t, g, l, o)
	for e := range 7 {
		s, err := m.BeginWrite(int64(e)*x, 4096)
		if err != nil {
			t.Fatal(err)
		}
		m.MarkOutOfSync(int64(e)*x, 4096)
		m.EndWrite(s)
	}
	g.armed.Store(true)
	flushed := make(chan error, 1)
	go func() { flushed <- m.FlushBitmap() }()
	within(t, g.entered, "the bitmap write")
	begun := make(chan error, 1)
	go func() {
		s, err := m.BeginWrite(7*x, 4096) // needs a transaction evicting extent 0
		m.EndWrite(s)
		begun <- err
	}()
	waitUntil(t, m, "the writer to start its commit", func() bool { return m.committing })
	close(g.release)
	if err := within(t, flushed, "FlushBitmap"); !errors.Is(err, ErrFailed) {
		t.Fatalf("FlushBitmap: %v, want ErrFailed", err)
	}
	if err := within(t, begun, "BeginWrite"); !errors.Is(err, ErrFailed) {
		t.Fatalf("BeginWrite after the metadata failed: %v, want ErrFailed", err)
	}
	m2, err := Open(dev.Crash(rand.New(rand.NewPCG(1, 1))), l, o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m2.ApplyAL(); err != nil {
		t.Fatal(err)
	}
	for e := range 7 {
		if !m2.Test(uint64(e) * bitmap.ExtentBlocks) {
			t.Errorf("I1: extent %d's write is in neither the bitmap nor the activity log", e)
		}
	}
}

// While Close writes the clean state no write may begin: not on an extent
// already in the log (it would be left uncovered), nor on a new one (its
// transaction would follow the clean superblock).
func TestMeta_CloseStopsNewWrites(t *testing.T) {
	const x = bitmap.ExtentSize
	o := Options{ALExtents: 7}
	dev, l, m := newMeta(t, 256*mib, o)
	m.Close()
	g := newGate(dev, l.Offset+offALRing, l.Offset+offBitmap, false)
	m = openGated(t, g, l, o)
	s, err := m.BeginWrite(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	m.EndWrite(s)
	g.armed.Store(true)
	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	within(t, g.entered, "Close's activity-log write")
	for _, off := range []int64{4096, 20 * x} {
		if _, err := m.BeginWrite(off, 4096); !errors.Is(err, ErrClosed) {
			t.Errorf("BeginWrite at %d during Close: %v, want ErrClosed", off, err)
		}
	}
	close(g.release)
	if err := within(t, closed, "Close"); err != nil {
		t.Fatal(err)
	}
	m2, err := Open(dev, l, o)
	if err != nil || !m2.Recovery().Clean || len(m2.Recovery().ALActive) != 0 {
		t.Fatalf("after close: %v, %+v", err, m2.Recovery())
	}
}

func TestMeta_BeginWriteRefuses(t *testing.T) {
	const x = bitmap.ExtentSize
	o := Options{ALExtents: 7}
	dev, l, m := newMeta(t, 256*mib, o)
	tests := []struct {
		name      string
		off, size int64
		want      error
	}{
		{"negative offset", -4096, 4096, ErrWriteRange},
		{"past the end", l.DataSize, 4096, ErrWriteRange},
		{"across the end", l.DataSize - 4096, 8192, ErrWriteRange},
		{"overflowing length", 4096, 1<<63 - 1, ErrWriteRange},
		{"more extents than al-extents", 4096, 7 * x, ErrWriteRange},
		{"as many extents as al-extents", 0, 7 * x, nil},
		{"last block", l.DataSize - 4096, 4096, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				s, err := m.BeginWrite(tc.off, tc.size)
				m.EndWrite(s)
				done <- err
			}()
			if err := within(t, done, "BeginWrite"); !errors.Is(err, tc.want) {
				t.Fatalf("BeginWrite(%d, %d): %v, want %v", tc.off, tc.size, err, tc.want)
			}
		})
	}
	// A bad write leaves metadata that opens.
	m.Abandon()
	if _, err := Open(dev, l, o); err != nil {
		t.Fatal(err)
	}
}

// After a crash, writes wait for Activate: replacing the crashed activity
// log before it is applied would forget the extents it names.
func TestMeta_WritesNeedActivate(t *testing.T) {
	dev, l, m := newMeta(t, 64*mib, Options{})
	s, err := m.BeginWrite(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	m.EndWrite(s)
	m.Abandon()
	m, err = Open(dev, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.BeginWrite(bitmap.ExtentSize, 4096); !errors.Is(err, ErrNotActive) {
		t.Fatalf("BeginWrite before Activate: %v, want ErrNotActive", err)
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	if !m.Test(0) {
		t.Fatal("Activate did not apply the crashed activity log")
	}
	if s, err := m.BeginWrite(bitmap.ExtentSize, 4096); err != nil {
		t.Fatal(err)
	} else {
		m.EndWrite(s)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.BeginWrite(0, 4096); !errors.Is(err, ErrClosed) {
		t.Fatalf("BeginWrite after Close: %v, want ErrClosed", err)
	}
}

func TestOpen_ALExtentsBounds(t *testing.T) {
	dev, l, m := newMeta(t, 64*mib, Options{})
	m.Close()
	for _, n := range []int{-1, 6, 65535} {
		if _, err := Open(dev, l, Options{ALExtents: n}); err == nil {
			t.Errorf("al-extents %d accepted", n)
		}
	}
	for _, n := range []int{0, 7, 65534} {
		if _, err := Open(dev, l, Options{ALExtents: n}); err != nil {
			t.Errorf("al-extents %d: %v", n, err)
		}
	}
}
