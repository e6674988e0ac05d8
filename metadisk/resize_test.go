package metadisk

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// setSize grows or shrinks the device, as a truncate of a file does.
func (d *memDev) setSize(n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.size = n
}

// write covers one write with the activity log, as the replicator does.
func write(t *testing.T, m *Meta, off, n int64) {
	t.Helper()
	s, err := m.BeginWrite(off, n)
	if err != nil {
		t.Fatal(err)
	}
	m.EndWrite(s)
}

// TestMeta_ResizeExternal grows and shrinks external metadata in place:
// the bits kept, the new ones marked or clear, the size persisted, and the
// activity log carried over (an unclean stop after the resize still
// applies it).
func TestMeta_ResizeExternal(t *testing.T) {
	const md = 3 * mib // room for a bitmap of far more than 64 MiB
	tests := []struct {
		name     string
		to       int64
		markNew  bool
		wantBits uint64 // bits set after the resize, besides the kept ones
	}{
		{"grow, new area marked", 512 * mib, true, (512 - 64) * mib / BlockSize},
		{"grow, assume clean", 512 * mib, false, 0},
		{"shrink", 32 * mib, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := ExternalLayout(64*mib, md)
			if err != nil {
				t.Fatal(err)
			}
			dev := newMemDev(md)
			if err := Create(dev, l, "alpha", "r0", false, Options{}); err != nil {
				t.Fatal(err)
			}
			m, err := Open(dev, l, Options{Logger: testLog(t)})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Activate(); err != nil {
				t.Fatal(err)
			}
			m.MarkOutOfSync(8*mib, 3*BlockSize) // kept by every case
			write(t, m, 60*mib, BlockSize)      // its extent stays in the activity log
			target, err := ExternalCapacity(1<<30, md)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Resize(target, tc.to, tc.markNew); err != nil {
				t.Fatal(err)
			}
			if got, want := m.Layout().DataSize, tc.to; got != want {
				t.Fatalf("data size %d, want %d", got, want)
			}
			if got, want := m.OutOfSync(), 3+tc.wantBits; tc.to > 64*mib && got != want {
				t.Fatalf("%d bits set, want %d", got, want)
			}
			if tc.to > 60*mib {
				// A write past the old end is covered now.
				write(t, m, tc.to-BlockSize, BlockSize)
			}
			bits := m.OutOfSync()
			m.Abandon() // a crash: the activity log must be found again
			m2, err := Open(dev, target, Options{Logger: testLog(t)})
			if err != nil {
				t.Fatal(err)
			}
			if got := m2.Layout(); got.DataSize != tc.to || got.Size != AreaSize(tc.to) {
				t.Fatalf("reopened layout %+v, want %d bytes of data", got, tc.to)
			}
			if _, err := m2.ApplyAL(); err != nil {
				t.Fatal(err)
			}
			if !m2.Test(8 * mib / BlockSize) {
				t.Error("a bit set before the resize was lost")
			}
			if tc.to > 60*mib && !m2.Test(60*mib/BlockSize) {
				t.Error("the activity log's extent from before the resize was not applied")
			}
			if m2.OutOfSync() < bits {
				t.Errorf("%d bits after reopening, %d before", m2.OutOfSync(), bits)
			}
			m2.Close()
		})
	}
}

func TestMeta_ResizeRefusals(t *testing.T) {
	const md = 3 * mib
	dev, l, m := newMeta(t, 64*mib, Options{})
	_ = dev
	max := MaxDataIn(l.Size) // the area newMeta made holds one page
	target := l
	target.DataSize = max
	tests := []struct {
		name   string
		target Layout
		size   int64
	}{
		{"past what the area describes", target, max + BlockSize},
		{"not a block multiple", target, 64*mib + 512},
		{"zero", target, 0},
		{"other placement", Layout{Kind: Internal, Size: l.Size, DataSize: max}, 64 * mib},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := m.Resize(tc.target, tc.size, true); !errors.Is(err, ErrResize) {
				t.Fatalf("Resize: %v, want ErrResize", err)
			}
		})
	}
	t.Run("writes in flight", func(t *testing.T) {
		s, err := m.BeginWrite(0, BlockSize)
		if err != nil {
			t.Fatal(err)
		}
		defer m.EndWrite(s)
		if err := m.Resize(target, max, true); !errors.Is(err, ErrResize) {
			t.Fatalf("Resize: %v, want ErrResize", err)
		}
	})
	if got := m.Layout().DataSize; got != 64*mib {
		t.Fatalf("a refused resize changed the size to %d", got)
	}
	if MaxDataIn(md) < 512*mib {
		t.Fatalf("MaxDataIn(%d) = %d", md, MaxDataIn(md))
	}
}

// TestMeta_ResizeInternalMove grows a disk with internal metadata: the area
// moves to the new end, the old one is wiped and its blocks, now data, are
// marked.
func TestMeta_ResizeInternalMove(t *testing.T) {
	oldSize, newSize := int64(64*mib), int64(200*mib)
	dev := newMemDev(int(oldSize))
	l, err := InternalLayout(oldSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(dev, l, "alpha", "r0", false, Options{}); err != nil {
		t.Fatal(err)
	}
	m, err := Open(dev, l, Options{Logger: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	m.MarkOutOfSync(4096, 4096)
	write(t, m, 0, BlockSize)
	dev.setSize(newSize)
	target, err := InternalLayout(newSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Resize(target, target.DataSize, false); err != nil {
		t.Fatal(err)
	}
	first, n := bitmap.BlockRange(l.Offset, l.Size)
	for b := first; b < first+n; b++ {
		if !m.Test(b) {
			t.Fatalf("block %d of the old metadata area is not marked", b)
		}
	}
	if got := m.OutOfSync(); got != n+1 {
		t.Fatalf("%d bits set, want the old area's %d and 1", got, n)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m2, err := Open(dev, target, Options{Logger: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	if m2.Layout().DataSize != target.DataSize || m2.OutOfSync() != n+1 {
		t.Fatalf("reopened: %d bytes, %d bits", m2.Layout().DataSize, m2.OutOfSync())
	}
	m2.Close()
	// The old superblocks are gone: a disk cut back to its old size does
	// not open a stale bitmap.
	dev.setSize(oldSize)
	if _, err := Open(dev, l, Options{}); !errors.Is(err, ErrNoMetadata) {
		t.Fatalf("old place: %v, want ErrNoMetadata", err)
	}
}

// TestMeta_ResizeInternalSmallerPeer: internal metadata may describe less
// than its area holds (the size agreed with a smaller peer), and opens so.
func TestMeta_ResizeInternalSmallerPeer(t *testing.T) {
	dev := newMemDev(200 * mib)
	l, _ := InternalLayout(200 * mib)
	if err := Create(dev, l, "alpha", "r0", false, Options{}); err != nil {
		t.Fatal(err)
	}
	m, err := Open(dev, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Resize(l, 100*mib, false); err != nil {
		t.Fatal(err)
	}
	if err := m.Resize(l, 150*mib, true); err != nil {
		t.Fatal(err)
	}
	m.Close()
	m2, err := Open(dev, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if got := m2.Layout(); got.DataSize != 150*mib || got.Offset != l.Offset || got.Size != l.Size {
		t.Fatalf("layout %+v", got)
	}
	if got, want := m2.OutOfSync(), uint64(50*mib/BlockSize); got != want {
		t.Fatalf("%d bits, want %d (the grown part)", got, want)
	}
}

// TestMeta_ResizeCrash crashes at every write and flush of a resize (in
// place and moving, growing and shrinking): the metadata opens at the old
// or the new size, and every block marked before, or covered by the
// activity log, is still marked once the log is applied (I1).
func TestMeta_ResizeCrash(t *testing.T) {
	for _, tc := range []struct {
		name     string
		internal bool
		shrink   bool
	}{{"external grow", false, false}, {"internal grow", true, false}, {"external shrink", false, true}} {
		internal := tc.internal
		t.Run(tc.name, func(t *testing.T) {
			oldData := int64(64 * mib)
			var dev *memDev
			var l, target Layout
			if internal {
				dev = newMemDev(int(oldData))
				l, _ = InternalLayout(oldData)
			} else {
				dev = newMemDev(3 * mib)
				l, _ = ExternalLayout(oldData, 3*mib)
			}
			oldData = l.DataSize
			if err := Create(dev, l, "alpha", "r0", false, Options{}); err != nil {
				t.Fatal(err)
			}
			m, err := Open(dev, l, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Activate(); err != nil {
				t.Fatal(err)
			}
			m.MarkOutOfSync(mib, 5*BlockSize)
			write(t, m, 40*mib, BlockSize)
			if err := m.FlushBitmap(); err != nil {
				t.Fatal(err)
			}
			if internal {
				dev.setSize(300 * mib)
				target, _ = InternalLayout(300 * mib)
			} else {
				target, _ = ExternalCapacity(300*mib, 3*mib)
			}
			newSize := target.DataSize
			if tc.shrink {
				target, newSize = l, 16*mib
			}
			var images []*memDev
			rng := rand.New(rand.NewPCG(7, 7))
			dev.onOp = func(int) { images = append(images, dev.Crash(rng)) }
			if err := m.Resize(target, newSize, true); err != nil {
				t.Fatal(err)
			}
			dev.onOp = nil
			images = append(images, dev.Crash(rng))
			opened := map[int64]int{}
			for i, img := range images {
				m2, err := Open(img, target, Options{})
				if errors.Is(err, ErrNoMetadata) && internal {
					// Not yet moved: the old place still holds it.
					img.setSize(64 * mib)
					m2, err = Open(img, l, Options{})
				}
				if err != nil {
					t.Fatalf("crash image %d: %v", i, err)
				}
				if _, err := m2.ApplyAL(); err != nil {
					t.Fatalf("crash image %d: %v", i, err)
				}
				for _, b := range []uint64{mib / BlockSize, mib/BlockSize + 4, 40 * mib / BlockSize} {
					if b < m2.Blocks() && !m2.Test(b) {
						t.Fatalf("crash image %d (%d bytes): block %d lost its mark", i, m2.Layout().DataSize, b)
					}
				}
				if size := m2.Layout().DataSize; !tc.shrink && size == newSize && m2.OutOfSync() < uint64((newSize-oldData)/BlockSize) {
					t.Fatalf("crash image %d: grown, but the new area is not marked (%d bits)", i, m2.OutOfSync())
				}
				opened[m2.Layout().DataSize]++
				m2.Abandon()
			}
			if opened[oldData] == 0 || opened[newSize] == 0 {
				t.Fatalf("sizes opened across %d crash points: %v; want both the old and the new", len(images), opened)
			}
		})
	}
}

// TestMeta_ResizeInternalOverlap: a disk with internal metadata that grew
// by less than the area's size would move the area over itself: refused,
// naming the smallest disk that works and warning against a restart
// before; at that size the move works, one block less is refused.
func TestMeta_ResizeInternalOverlap(t *testing.T) {
	oldSize := int64(64 * mib)
	dev := newMemDev(int(oldSize))
	l, err := InternalLayout(oldSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(dev, l, "alpha", "r0", false, Options{}); err != nil {
		t.Fatal(err)
	}
	m, err := Open(dev, l, Options{Logger: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	need := minInternalDisk(oldSize)
	if need <= oldSize || need > oldSize+2*l.Size {
		t.Fatalf("minimum disk %d for an area of %d at the end of %d", need, l.Size, oldSize)
	}
	for _, size := range []int64{oldSize + BlockSize, need - BlockSize} {
		dev.setSize(size)
		target, err := InternalLayout(size)
		if err != nil {
			t.Fatal(err)
		}
		err = m.Resize(target, target.DataSize, true)
		if !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), fmt.Sprintf("grow the disk to at least %d bytes", need)) ||
			!strings.Contains(err.Error(), "do not restart") || strings.Contains(err.Error(), "\n") {
			t.Fatalf("disk of %d bytes: %v", size, err)
		}
		if m.CheckResize(target, target.DataSize) == nil {
			t.Fatalf("CheckResize accepts a disk of %d bytes", size)
		}
	}
	dev.setSize(need)
	target, err := InternalLayout(need)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.CheckResize(target, target.DataSize); err != nil {
		t.Fatal(err)
	}
	if err := m.Resize(target, target.DataSize, true); err != nil {
		t.Fatalf("disk of the minimum %d bytes: %v", need, err)
	}
}
