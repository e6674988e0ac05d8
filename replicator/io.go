package replicator

import (
	"fmt"
	"syscall"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// ErrNotPrimary refuses application I/O on a node that is not Primary
// (the NBD client gets EPERM).
var ErrNotPrimary = fmt.Errorf("replicator: the resource is not Primary here: %w", syscall.EPERM)

// hold is one application request's hold on the disk and the metadata.
type hold struct {
	md    *metadisk.Meta
	dev   *blockdev.Device
	tl    *tlog // the transfer log while replicating, else nil
	c     bool  // protocol B or C: complete on the peer's ack
	p     *peer // the session, if any
	ahead bool  // Ahead: mark and announce, do not replicate
	conn  ConnState
	// remote: a diskless Primary's request, served by the peer's disk
	// (diskless.go); md and dev are nil.
	remote bool
}

// beginIO admits an application request: only on a Primary with a disk.
// The disk and the metadata stay open until endIO.
func (r *Resource) beginIO() (hold, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.frozen > 0 {
		r.waitingIO++
		r.idle.Wait()
		r.waitingIO--
	}
	if r.role != RolePrimary {
		return hold{}, ErrNotPrimary
	}
	if r.remote {
		if r.p == nil || r.p.ending || r.conn != Connected || r.peerDisk != UpToDate {
			return hold{}, errNoData
		}
		r.inflight++
		return hold{p: r.p, tl: r.p.tl, c: true, conn: r.conn, remote: true}, nil
	}
	if r.md == nil {
		return hold{}, ErrNotPrimary
	}
	if r.disk == Failed {
		return hold{}, errDiskFailed
	}
	r.inflight++
	h := hold{md: r.md, dev: r.dev, p: r.p, conn: r.conn}
	switch {
	case r.p == nil:
	case r.conn == Ahead:
		h.ahead = true
	case r.conn >= Connected:
		h.tl, h.c = r.p.tl, r.p.tl.ackC
	}
	return h, nil
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

// inside checks a request of n bytes at off against the size, once the
// request is admitted (the size does not change while one runs; a request
// held across a resize sees the new size): past the end, a read gets
// EINVAL and a write ENOSPC, as the NBD server answers them before.
func (r *Resource) inside(off, n int64, write bool) error {
	size := r.size.Load()
	if off >= 0 && n >= 0 && off <= size && n <= size-off {
		return nil
	}
	errno := syscall.EINVAL
	if write {
		errno = syscall.ENOSPC
	}
	return fmt.Errorf("replicator: %s: %d bytes at %d reach past the end of the device (%d bytes): %w", r.name, n, off, size, errno)
}

// ReadAt reads from the local disk, or from the peer's on a diskless
// Primary.
func (r *Resource) ReadAt(p []byte, off int64) (int, error) {
	var n int
	err := r.retryDiverted(func() (err error) {
		n, err = r.readAt(p, off)
		return err
	})
	return n, err
}

func (r *Resource) readAt(p []byte, off int64) (int, error) {
	x, err := r.beginIO()
	if err != nil {
		return 0, err
	}
	defer r.endIO()
	if err := r.inside(off, int64(len(p)), false); err != nil {
		return 0, err
	}
	if x.remote {
		if err := x.p.readRemote(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	r.localBegin()
	n, err := x.dev.ReadAt(p, off)
	r.localEnd()
	r.read.Add(uint64(n))
	r.appIO.Add(uint64(n))
	if err != nil {
		r.diskFailed("read", err)
		if r.diverting() {
			return 0, errDiverted
		}
	}
	return n, err
}

// WriteAt is the write path (DESIGN.md §4): each piece of the write is
// covered by the activity log before it reaches the disk; while
// replicating it joins the transfer log and goes to the peer, else its
// blocks are marked out of sync. With fua the data is durable here when
// WriteAt returns; under protocol C it is also on the peer.
func (r *Resource) WriteAt(p []byte, off int64, fua bool) error {
	return r.retryDiverted(func() error {
		return r.modify(off, int64(len(p)), wire.WriteData, p, fua, func(dev *blockdev.Device, o, n int64) error {
			return dev.WriteAt(p[o-off:o-off+n], o, fua)
		})
	})
}

// Trim discards a range on the local disk and the peer's.
func (r *Resource) Trim(off, length int64, fua bool) error {
	return r.retryDiverted(func() error {
		return r.modify(off, length, wire.WriteTrim, nil, fua, func(dev *blockdev.Device, o, n int64) error {
			return dev.Trim(o, n, fua)
		})
	})
}

// WriteZeroes zeroes a range on the local disk and the peer's.
func (r *Resource) WriteZeroes(off, length int64, noHole, fua bool) error {
	return r.retryDiverted(func() error {
		return r.modify(off, length, wire.WriteZeroes, nil, fua, func(dev *blockdev.Device, o, n int64) error {
			return dev.WriteZeroes(o, n, noHole, fua)
		})
	})
}

// modify runs a change of length bytes at off in pieces that the activity
// log can cover (at most al-extents extents each): for each piece the
// extents are made durable in the activity log, the piece is sent to the
// peer (or its blocks marked), and then do changes the disk. Overlapping
// changes and resync reads of the same blocks wait for each other, so the
// peer sees them in the order this disk does.
func (r *Resource) modify(off, length int64, kind uint8, data []byte, fua bool, do func(dev *blockdev.Device, off, n int64) error) error {
	x, err := r.beginIO()
	if err != nil {
		return err
	}
	defer r.endIO()
	if err := r.inside(off, length, true); err != nil {
		return err
	}
	unlock := r.ranges.lock(off, length)
	defer unlock()
	if x.remote {
		return r.modifyRemote(x, off, length, kind, data, fua)
	}
	if x.conn == Connected {
		if congested, why := r.congested(x.p, x.md); congested {
			r.goAhead(x.p, why)
			x.tl, x.c, x.ahead = nil, false, true
		}
	}
	start := off
	maxSpan := int64(x.md.ALCapacity()) * bitmap.ExtentSize
	var sent []*tlEntry
	for length > 0 {
		// A piece fits the activity log and one peer message (a TRIM of
		// the whole device is sent in 32 MiB pieces).
		n := min(length, off-off%bitmap.ExtentSize+maxSpan-off, wire.MaxData)
		span, err := x.md.BeginWrite(off, n) // its metadata I/O is watched (watchedDevice)
		if err != nil {
			r.diskFailed("activity log", err)
			r.complete(x, sent)
			if r.diverting() {
				return errDiverted
			}
			return fmt.Errorf("%s: activity log: %w", r.name, err) // EIO to the client
		}
		var e *tlEntry
		if x.tl != nil {
			var piece []byte
			if data != nil {
				piece = data[off-start : off-start+n]
			}
			e = x.tl.submit(off, n, span, kind, fua, piece)
		}
		if e == nil {
			x.md.MarkOutOfSync(off, n)
			if x.ahead {
				x.p.announce(off, n)
			}
		}
		r.localBegin()
		err = do(x.dev, off, n)
		r.localEnd()
		r.diskFailed("write", err)
		if e != nil {
			if err != nil {
				// The peer may have the data this disk failed to take.
				x.md.MarkOutOfSync(off, n)
			}
			x.tl.localDone(e)
			sent = append(sent, e)
		} else {
			x.md.EndWrite(span)
		}
		if err != nil {
			r.complete(x, sent)
			if r.diverting() {
				return errDiverted
			}
			return err
		}
		r.written.Add(uint64(n))
		r.appIO.Add(uint64(n))
		off, length = off+n, length-n
	}
	r.complete(x, sent)
	return nil
}

// modifyRemote is modify on a diskless Primary: each piece goes to the
// peer only, and the request completes once the peer wrote every piece.
// A piece never crosses an activity-log extent: the peer covers each with
// its own log, whose size this node does not know.
func (r *Resource) modifyRemote(x hold, off, length int64, kind uint8, data []byte, fua bool) error {
	start := off
	var sent []*tlEntry
	var err error
	for length > 0 {
		n := min(length, bitmap.ExtentSize-off%bitmap.ExtentSize, wire.MaxData)
		var piece []byte
		if data != nil {
			piece = data[off-start : off-start+n]
		}
		e := x.tl.submit(off, n, metadisk.Span{}, kind, fua, piece)
		if e == nil {
			err = errNoData
			break
		}
		x.tl.localDone(e)
		sent = append(sent, e)
		off, length = off+n, length-n
	}
	r.complete(x, sent)
	for _, e := range sent {
		switch {
		case e.unacked:
			return errNoData
		case e.ackFailed:
			return fmt.Errorf("%s: the peer failed a write of %d bytes at %d: %w", r.name, e.n, e.off, syscall.EIO)
		}
	}
	return err
}

// complete finishes a replicated request for the application: under
// protocol C only once the peer has written every piece (or the session
// ended, which marked them); then its epoch closes.
func (r *Resource) complete(x hold, sent []*tlEntry) {
	for _, e := range sent {
		if x.c {
			<-e.acked
		}
		x.tl.completed(e)
	}
}

// Flush makes every completed write durable on the local disk and closes
// the epoch; under protocol C it also waits for the peer's barrier ack,
// i.e. until those writes are durable on the peer.
func (r *Resource) Flush() error {
	return r.retryDiverted(r.flush)
}

func (r *Resource) flush() error {
	x, err := r.beginIO()
	if err != nil {
		return err
	}
	defer r.endIO()
	if x.remote {
		// The peer makes every write it acked durable.
		if done := x.tl.barrierNow(false, true); done != nil {
			<-done
		}
		if x.tl.isLost() {
			return errNoData
		}
		return nil
	}
	r.localBegin()
	err = x.dev.Flush()
	r.localEnd()
	if err != nil {
		r.diskFailed("flush", err)
		if r.diverting() {
			return errDiverted
		}
		return err
	}
	if x.tl == nil {
		return nil
	}
	done := x.tl.barrierNow(false, true)
	if x.c && done != nil {
		<-done
	}
	return nil
}

// announce tells the peer, while Ahead, which blocks changed.
func (p *peer) announce(off, n int64) {
	p.tl.send.Lock()
	defer p.tl.send.Unlock()
	if err := p.send(transport.Data, wire.OutOfSync{Offset: uint64(off), Length: uint32(n)}); err != nil {
		p.fail(err)
	}
}
