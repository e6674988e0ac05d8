package replicator

import (
	"fmt"
	"syscall"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/metadisk"
)

// ErrNotPrimary refuses application I/O on a node that is not Primary
// (the NBD client gets EPERM).
var ErrNotPrimary = fmt.Errorf("replicator: the resource is not Primary here: %w", syscall.EPERM)

// hold is one application request's hold on the disk and the metadata.
type hold struct {
	md  *metadisk.Meta
	dev *blockdev.Device
}

// beginIO admits an application request: only on a Primary with a disk.
// The disk and the metadata stay open until endIO.
func (r *Resource) beginIO() (hold, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.frozen {
		r.idle.Wait()
	}
	if r.role != RolePrimary || r.md == nil {
		return hold{}, ErrNotPrimary
	}
	r.inflight++
	return hold{md: r.md, dev: r.dev}, nil
}

func (r *Resource) endIO() {
	r.mu.Lock()
	if r.inflight--; r.inflight == 0 {
		r.idle.Broadcast()
	}
	r.mu.Unlock()
}

// Size returns the size of the data in bytes (0 while Diskless).
func (r *Resource) Size() int64 { return r.size.Load() }

// ReadAt reads from the local disk.
func (r *Resource) ReadAt(p []byte, off int64) (int, error) {
	x, err := r.beginIO()
	if err != nil {
		return 0, err
	}
	defer r.endIO()
	r.local.Add(1)
	n, err := x.dev.ReadAt(p, off)
	r.local.Add(-1)
	r.read.Add(uint64(n))
	return n, err
}

// WriteAt is the write path (DESIGN.md §4) without a peer: each piece of
// the write is covered by the activity log before it reaches the disk,
// and its blocks are marked out of sync with the absent peer. With fua
// the data is durable when WriteAt returns.
func (r *Resource) WriteAt(p []byte, off int64, fua bool) error {
	return r.modify(off, int64(len(p)), func(dev *blockdev.Device, o, n int64) error {
		return dev.WriteAt(p[o-off:o-off+n], o, fua)
	})
}

// Trim discards a range on the local disk; the blocks are marked.
func (r *Resource) Trim(off, length int64, fua bool) error {
	return r.modify(off, length, func(dev *blockdev.Device, o, n int64) error {
		return dev.Trim(o, n, fua)
	})
}

// WriteZeroes zeroes a range on the local disk; the blocks are marked.
func (r *Resource) WriteZeroes(off, length int64, noHole, fua bool) error {
	return r.modify(off, length, func(dev *blockdev.Device, o, n int64) error {
		return dev.WriteZeroes(o, n, noHole, fua)
	})
}

// modify runs a change of length bytes at off in pieces that the activity
// log can cover (at most al-extents extents each): for each piece the
// extents are made durable in the activity log, the blocks are marked,
// and then do changes the disk.
func (r *Resource) modify(off, length int64, do func(dev *blockdev.Device, off, n int64) error) error {
	x, err := r.beginIO()
	if err != nil {
		return err
	}
	defer r.endIO()
	maxSpan := int64(x.md.ALCapacity()) * bitmap.ExtentSize
	for length > 0 {
		n := min(length, off-off%bitmap.ExtentSize+maxSpan-off)
		span, err := x.md.BeginWrite(off, n)
		if err != nil {
			return fmt.Errorf("%s: activity log: %w", r.name, err) // EIO to the client
		}
		x.md.MarkOutOfSync(off, n)
		r.local.Add(1)
		err = do(x.dev, off, n)
		r.local.Add(-1)
		x.md.EndWrite(span)
		if err != nil {
			return err
		}
		r.written.Add(uint64(n))
		off, length = off+n, length-n
	}
	return nil
}

// Flush makes every completed write durable on the local disk. The
// activity log is durable already; bitmap bits are covered by it until
// their extent leaves it, when they are written.
func (r *Resource) Flush() error {
	x, err := r.beginIO()
	if err != nil {
		return err
	}
	defer r.endIO()
	return x.dev.Flush()
}
