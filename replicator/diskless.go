package replicator

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// The diskless Primary (reference/drbd.md §3.3: "a diskless Primary keeps
// serving I/O through the peer").
//
// With on-io-error detach (or call-local-io-error), an I/O error of a
// Primary's disk or metadata while it is Connected to an UpToDate peer
// whose session speaks wire.ReadVersion does not reach the application:
//
//  1. The disk goes Failed and new application requests wait (a freeze);
//     the request that failed, and any other that fails meanwhile, gives
//     up its hold and waits for the switch, then starts over.
//  2. Once no request is in flight, the transfer log is drained (every
//     write barrier-acked by the peer), so that nothing of the local disk
//     is left in it.
//  3. The disk is detached (Diskless) and the Primary serves from the
//     peer: every write goes to the peer only and completes on its write
//     ack, whatever the protocol (no copy is left here); a FLUSH waits for
//     the peer's barrier ack; reads are ReadRequests the peer answers
//     from its disk. The peer learns of it (State: Diskless), starts a
//     new data generation and marks every write it receives in its
//     bitmap, under its activity log, so that the detached disk is
//     brought up to date by a bitmap resync later.
//
// The detached metadata stays open until the session ends (the session
// still holds it), and is then closed with what the failed requests
// marked. A diskless Primary whose session ends has no data: every
// request fails with EIO until it is demoted. It does not reconnect
// diskless, and it cannot attach while Primary: demoted, it closes its
// session, attaches the repaired disk and becomes SyncTarget.
//
// A disk that stops answering (disk-timeout) is not diverted: requests
// hung on it cannot be drained. The Primary's disk goes Failed and new
// requests fail at once.

// maxRead bounds a ReadRequest: a peer serves at most maxServe at once,
// so that is what one session can make it hold.
const maxRead = 1 << 20

// pendingRead is a read waiting for the peer's reply.
type pendingRead struct {
	ch  chan wire.ReadReply
	off uint64
	n   uint32
}

// errNoData fails application I/O on a diskless Primary without a peer
// that has the data.
var errNoData = fmt.Errorf("replicator: no data accessible: the disk is detached and the peer is not connected with UpToDate data: %w", syscall.EIO)

// errDiverted tells a request that failed on the local disk that the
// resource is switching to its peer's disk: start over once it has.
var errDiverted = errors.New("replicator: the disk failed: the request goes to the peer")

// canDivertLocked reports whether a failure of the local disk should make
// this Primary diskless rather than pass its errors on; call with mu held.
// The peer's copy must be whole: nothing marked here (a block marked
// here may be older there).
func (r *Resource) canDivertLocked(policy string, timedOut bool) bool {
	return r.role == RolePrimary && policy != "pass_on" && !timedOut && !r.remote && r.p != nil && !r.p.ending &&
		r.conn == Connected && r.peerDisk == UpToDate && r.p.s.Version() >= wire.ReadVersion &&
		r.md != nil && r.md.OutOfSync() == 0
}

// startDivertLocked starts the switch of a Primary whose disk just went
// Failed to its peer's disk; call with mu held.
func (r *Resource) startDivertLocked() {
	if r.divert {
		return
	}
	p := r.p
	r.divert = true
	r.divertDone = make(chan struct{})
	r.frozen++                                     // new requests wait for the switch
	if !r.goBackground(func() { r.divertTo(p) }) { // the resource stops
		r.divert = false
		close(r.divertDone)
		r.frozen--
		r.idle.Broadcast()
	}
}

// divertTo switches to p's disk (see the top of this file).
func (r *Resource) divertTo(p *peer) {
	r.admin.Lock()
	defer r.admin.Unlock()
	// The requests in flight end (a failed one gives up its hold); one
	// that hangs on the disk calls the switch off.
	wait := max(r.cfg.Disk.DiskTimeout, divertWait)
	timer := time.AfterFunc(wait, func() {
		r.mu.Lock()
		r.idle.Broadcast()
		r.mu.Unlock()
	})
	deadline := time.Now().Add(wait)
	r.mu.Lock()
	for r.inflight > 0 && time.Now().Before(deadline) {
		r.idle.Wait()
	}
	drained := r.inflight == 0
	r.mu.Unlock()
	timer.Stop()
	if !drained {
		r.divertOff(p, fmt.Sprintf("requests on the disk did not end within %v", wait))
		return
	}
	// Every write of the local disk's time acked: the log holds none.
	// The peer answers within the same bound, or the switch is off.
	if done := p.tl.barrierNow(true, false); done != nil {
		t := time.NewTimer(wait)
		select {
		case <-done:
			t.Stop()
		case <-p.ctx.Done():
			t.Stop()
			r.divertOff(p, "the session ended before the peer confirmed the writes")
			return
		case <-t.C:
			r.divertOff(p, fmt.Sprintf("the peer did not confirm the writes within %v", wait))
			return
		}
	}
	var md *metadisk.Meta
	var dev *blockdev.Device
	var mdev *MetaDevice
	r.mu.Lock()
	ok := r.p == p && !p.ending && !p.tl.isLost() && r.role == RolePrimary && r.disk == Failed &&
		r.conn == Connected && r.peerDisk == UpToDate
	if ok {
		md, dev, mdev = r.md, r.dev, r.mdev
		r.md, r.dev, r.mdev = nil, nil, nil
		r.detachedMD, r.detachedMdev, r.detachedBy = md, mdev, p
		p.tl.goRemote()
		r.remote = true
		r.setState(RolePrimary, Diskless)
		r.mu.Unlock()
		// Before any write of the new kind (requests are still held):
		// the peer marks those.
		p.sendState()
		r.mu.Lock()
	}
	if !ok {
		r.mu.Unlock()
		r.divertOff(p, "the peer's disk is no longer available")
		return
	}
	r.divert = false
	close(r.divertDone)
	r.frozen--
	r.idle.Broadcast()
	r.mu.Unlock()
	r.stopWatch()
	if err := dev.Close(); err != nil {
		r.log.Warn("closing the failed disk", "err", err)
	}
	r.log.Warn("the disk is detached: this Primary serves reads and writes from the peer's disk")
	r.change()
}

// divertWait bounds the wait for the requests in flight at a switch when
// disk-timeout is shorter (or none).
const divertWait = 30 * time.Second

// divertOff calls a switch off: the disk stays Failed under the Primary,
// whose requests fail until it is demoted; the peer learns of it.
func (r *Resource) divertOff(p *peer, why string) {
	r.mu.Lock()
	r.divert = false
	close(r.divertDone)
	r.frozen--
	r.idle.Broadcast()
	r.mu.Unlock()
	r.log.Error("the Primary cannot serve from the peer's disk: its requests fail until it is demoted", "why", why)
	p.sendState()
	r.change()
}

// retryDiverted runs a request, and once more if it failed on the local
// disk while the resource switched to its peer's disk (after the switch).
func (r *Resource) retryDiverted(f func() error) error {
	err := f()
	if !errors.Is(err, errDiverted) {
		return err
	}
	r.mu.Lock()
	done := r.divertDone
	r.mu.Unlock()
	if done != nil {
		<-done
	}
	if err := f(); !errors.Is(err, errDiverted) {
		return err
	}
	return errNoData
}

// diverting reports whether a request that just failed on the local disk
// is to start over on the peer's.
func (r *Resource) diverting() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.divert || r.remote
}

// closeDetached closes the metadata a diskless Primary kept for session
// p, once p has ended (or at the stop, p nil).
func (r *Resource) closeDetached(p *peer) {
	r.mu.Lock()
	md, mdev := r.detachedMD, r.detachedMdev
	if md == nil || p != nil && r.detachedBy != p {
		r.mu.Unlock()
		return
	}
	r.detachedMD = nil // claimed
	r.mu.Unlock()
	// Left unclean, as a crash leaves it: the failed disk may have lost
	// writes it had acknowledged (a failed flush), and the next attach
	// marks the activity log's extents, which cover them (I1).
	md.Abandon()
	mdev.Close()
	r.mu.Lock()
	r.detachedMdev, r.detachedBy = nil, nil
	r.idle.Broadcast() // secondary waits for the metadata's lock to go
	r.mu.Unlock()
}

// readRemote reads len(buf) bytes at off from the peer's disk.
func (p *peer) readRemote(buf []byte, off int64) error {
	for len(buf) > 0 {
		n := min(len(buf), maxRead)
		if err := p.readRemoteOnce(buf[:n], off); err != nil {
			return err
		}
		buf, off = buf[n:], off+int64(n)
	}
	return nil
}

func (p *peer) readRemoteOnce(buf []byte, off int64) error {
	ch := make(chan wire.ReadReply, 1)
	p.readMu.Lock()
	if p.reads == nil {
		p.reads = map[uint64]pendingRead{}
	}
	p.readID++
	id := p.readID
	p.reads[id] = pendingRead{ch: ch, off: uint64(off), n: uint32(len(buf))}
	p.readMu.Unlock()
	defer func() {
		p.readMu.Lock()
		delete(p.reads, id)
		p.readMu.Unlock()
	}()
	p.tl.send.Lock()
	err := p.send(transport.Data, wire.ReadRequest{ID: id, Offset: uint64(off), Length: uint32(len(buf))})
	p.tl.send.Unlock()
	if err != nil {
		p.fail(err)
		return errNoData
	}
	select {
	case m := <-ch:
		if m.Status != wire.ReadOK {
			return fmt.Errorf("replicator: the peer could not read %d bytes at %d: %w", len(buf), off, syscall.EIO)
		}
		copy(buf, m.Data)
		return nil
	case <-p.ctx.Done():
		return errNoData
	}
}

// receiveReadReply hands a ReadReply to the read waiting for it.
func (p *peer) receiveReadReply(m wire.ReadReply) error {
	p.readMu.Lock()
	rd, ok := p.reads[m.ID]
	delete(p.reads, m.ID)
	p.readMu.Unlock()
	switch {
	case !ok:
		return protoErr("a read reply (id %d) for no read asked", m.ID)
	case m.Offset != rd.off || m.Length != rd.n:
		return protoErr("a read reply (id %d) for %d bytes at %d, asked %d at %d", m.ID, m.Length, m.Offset, rd.n, rd.off)
	}
	rd.ch <- m // buffered: the reader may have given up
	return nil
}

// serveRead answers a diskless Primary's read from this disk. The
// Primary's writes that came before it on the data stream and overlap it
// are written first.
func (p *peer) serveRead(m wire.ReadRequest) error {
	r := p.r
	if err := p.checkRange("read request", m.Offset, m.Length); err != nil {
		return err
	}
	if m.Length > maxRead {
		return protoErr("a read request of %d bytes, above the %d a diskless Primary asks for", m.Length, maxRead)
	}
	reply := wire.ReadReply{ID: m.ID, Offset: m.Offset, Length: m.Length, Status: wire.ReadError}
	r.mu.Lock()
	ok := r.role == RoleSecondary && r.disk == UpToDate && r.peerRole == RolePrimary && r.peerDisk == Diskless
	r.mu.Unlock()
	if !ok {
		r.log.Warn("refused a read from the peer: it is not a diskless Primary or this disk is not UpToDate",
			"offset", m.Offset, "length", m.Length)
		return p.sendReply(reply)
	}
	p.recvLock.lock(int64(m.Offset), int64(m.Length))()
	select {
	case p.serve <- struct{}{}:
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer func() { <-p.serve }()
		buf := make([]byte, m.Length)
		r.localBegin()
		_, err := p.dev.ReadAt(buf, int64(m.Offset))
		r.localEnd()
		if err != nil {
			r.log.Error("reading for the diskless Primary failed", "offset", m.Offset, "length", m.Length, "err", err)
			r.diskFailed("read for the peer", err)
		} else {
			reply.Status, reply.Data = wire.ReadOK, buf
			r.read.Add(uint64(len(buf)))
		}
		if err := p.sendReply(reply); err != nil {
			p.fail(err)
		}
	}()
	return nil
}

// sendReply sends a read reply on the data stream (its data is not copied).
func (p *peer) sendReply(m wire.ReadReply) error {
	return p.s.SendMany(transport.Data, encodeAll([]wire.Message{m}, &p.r.netSent))
}

// peerLostDisk is the Secondary's side of the switch: its Primary's disk
// is detached, so this disk holds the only copy. A new data generation
// starts (the detached disk is recognisably older) and from now on every
// write of the Primary is marked here (see receiveWrite).
func (p *peer) peerLostDisk() {
	newUUID, err := newGeneration(p.md)
	switch {
	case err != nil:
		p.r.log.Error("new current UUID after the Primary lost its disk: writing the metadata failed", "err", err)
		p.fail(fmt.Errorf("the metadata failed: %w", err))
	case newUUID:
		p.r.log.Info("the Primary's disk failed: new current UUID; its writes are marked here")
	}
}
