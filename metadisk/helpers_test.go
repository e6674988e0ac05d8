package metadisk

import (
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"sync"
	"testing"
)

// memDev is an in-memory Device that models a disk with a volatile write
// cache: writes are visible at once but durable only after Sync. Crash
// returns what a power loss could leave: every synced write, and each
// unsynced 4 KiB block dropped, landed, or torn at 512-byte granularity.
// Blocks are immutable once stored, so images share them (copy on write)
// and a crash image costs a map copy, not a copy of the device.
type memDev struct {
	mu      sync.Mutex
	size    int64
	cur     map[int64][]byte // what reads see, by 4 KiB block
	durable map[int64][]byte // what survives a crash for sure
	pending []pendingBlock
	ops     int
	// onOp, if set, is called after every write and before every sync
	// with the running operation count.
	onOp func(n int)
	// failWrites makes WriteAt fail once ops reaches it (0: never).
	failWrites int
}

type pendingBlock struct {
	idx  int64
	data []byte
}

func newMemDev(size int) *memDev {
	return &memDev{size: int64(size), cur: map[int64][]byte{}, durable: map[int64][]byte{}}
}

// clone returns an independent device with the same durable contents.
func (d *memDev) clone() *memDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	return &memDev{size: d.size, cur: maps.Clone(d.durable), durable: maps.Clone(d.durable)}
}

func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, io.ErrUnexpectedEOF
	}
	for i := 0; i < len(p); {
		idx, in := (off+int64(i))/BlockSize, int((off+int64(i))%BlockSize)
		n := min(len(p)-i, BlockSize-in)
		if b := d.cur[idx]; b != nil {
			copy(p[i:i+n], b[in:])
		} else {
			clear(p[i : i+n])
		}
		i += n
	}
	return len(p), nil
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.ops++
	if d.failWrites > 0 && d.ops >= d.failWrites || off < 0 || off+int64(len(p)) > d.size {
		d.mu.Unlock()
		return 0, io.ErrShortWrite
	}
	for i := 0; i < len(p); {
		idx, in := (off+int64(i))/BlockSize, int((off+int64(i))%BlockSize)
		n := min(len(p)-i, BlockSize-in)
		b := make([]byte, BlockSize)
		if old := d.cur[idx]; old != nil {
			copy(b, old)
		}
		copy(b[in:], p[i:i+n])
		d.cur[idx] = b
		d.pending = append(d.pending, pendingBlock{idx, b})
		i += n
	}
	n, hook := d.ops, d.onOp
	d.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	return len(p), nil
}

func (d *memDev) Sync() error {
	d.mu.Lock()
	d.ops++
	n, hook := d.ops, d.onOp
	d.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.pending {
		d.durable[w.idx] = w.data
	}
	d.pending = nil
	return nil
}

// Crash returns a device holding what a power loss at this instant could
// leave behind.
func (d *memDev) Crash(r *rand.Rand) *memDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	img := maps.Clone(d.durable)
	for _, w := range d.pending {
		switch r.IntN(5) {
		case 0, 1: // lost
		case 2, 3: // landed
			img[w.idx] = w.data
		default: // torn: some of its sectors landed
			b := make([]byte, BlockSize)
			if old := img[w.idx]; old != nil {
				copy(b, old)
			}
			for s := 0; s < BlockSize; s += 512 {
				if r.IntN(2) == 0 {
					copy(b[s:s+512], w.data[s:s+512])
				}
			}
			img[w.idx] = b
		}
	}
	return &memDev{size: d.size, cur: img, durable: maps.Clone(img)}
}

// corrupt flips bits of the current contents (not a write: no pending).
func (d *memDev) corrupt(off int64, mask byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	idx := off / BlockSize
	b := make([]byte, BlockSize)
	if old := d.cur[idx]; old != nil {
		copy(b, old)
	}
	b[off%BlockSize] ^= mask
	d.cur[idx] = b
}

// zero zeroes [off, off+n) of the current contents.
func (d *memDev) zero(off, n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := off / BlockSize; i < (off+n)/BlockSize; i++ {
		delete(d.cur, i)
	}
}

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// newMeta creates metadata for dataSize bytes on an external memDev and
// opens it activated.
func newMeta(t testing.TB, dataSize int64, o Options) (*memDev, Layout, *Meta) {
	t.Helper()
	l, err := ExternalLayout(dataSize, areaSize(dataSize))
	if err != nil {
		t.Fatal(err)
	}
	dev := newMemDev(int(l.Size))
	if err := Create(dev, l, "alpha", "r0", false, o); err != nil {
		t.Fatal(err)
	}
	m, err := Open(dev, l, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	return dev, l, m
}
