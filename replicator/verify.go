package replicator

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// Online verify (reference/drbd.md §6.5): the node where it is started is
// VerifyS and walks the blocks of its range (VerifyRange), paced by the
// resync rate limit and yielding to application I/O (c-min-rate), sending
// the digest (verify-alg) of its own copy; VerifyT compares it with its
// copy's and answers; both mark a differing block out of sync. Verify
// only marks: a resync (after a Primary's reconnect, or invalidate
// --reset-bitmap=no) repairs.

const verifyFlight = 64 // blocks being compared at once

// sectorsPerBlock is how many 512-byte sectors (the unit of --start and
// --stop, as DRBD's) a 4 KiB block holds.
const sectorsPerBlock = bitmap.BlockSize / 512

// ErrVerifyRange is a verify range outside the device, or empty.
var ErrVerifyRange = errors.New("replicator: verify range")

// VerifyRange is where an online verify runs, in 512-byte sectors, as
// drbdsetup verify's --start and --stop. Without Start a verify resumes
// where the last one on this node stopped: at its stop sector, where a
// lost connection interrupted it, or at the start of the device after one
// that reached the end (and after a restart of the daemon). Start is
// rounded down to a 4 KiB block; without Stop the verify runs to the end
// of the device, with it it ends before the first block that starts at or
// after Stop.
type VerifyRange struct {
	Start, Stop *uint64
}

// Verify starts an online verify from this node (VerifyS). On a running
// VerifyS, with a Stop, it only moves the stop sector (DRBD's behaviour).
func (r *Resource) Verify(vr VerifyRange) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	conn, p, resume, disk, peerDisk := r.conn, r.p, r.ovStart, r.disk, r.peerDisk
	r.mu.Unlock()
	switch {
	case disk == Diskless || disk == Failed:
		return r.refuse(codeDiskless, "")
	case conn == Connected && peerDisk != UpToDate:
		return r.refuse(codeNoUpToDate, "verify needs the peer's disk UpToDate")
	case r.cfg.Net.VerifyAlg == "":
		return r.refuse(codeNoVerifyAlg, "set verify-alg in the net section on both nodes")
	case conn == VerifyS && vr.Stop != nil && p != nil:
		return r.moveVerifyStop(p, *vr.Stop)
	case conn.Syncing():
		return r.refuse(codeAlreadyActive, "")
	case conn != Connected || p == nil:
		return r.refuse(codeNeedConnection, "")
	}
	blocks := bitmap.Blocks(p.size.Load())
	from, stop := resume, blocks
	if from >= blocks {
		from = 0 // the last one reached the end (of a device since shrunk)
	}
	if vr.Start != nil {
		from = *vr.Start / sectorsPerBlock
	}
	if vr.Stop != nil {
		stop = min(stop, stopBlock(*vr.Stop))
	}
	if err := r.checkVerifyRange(vr, from, stop, blocks); err != nil {
		return err
	}
	rs := newResync(true, true, stop-from, verifyFlight)
	rs.from, rs.stop = from, stop
	r.mu.Lock()
	if !p.current() || r.conn != Connected {
		r.mu.Unlock()
		return r.refuse(codeNeedConnection, "")
	}
	p.rs = rs
	r.setConn(VerifyS)
	p.goSession(func() {
		if err := p.driveVerify(rs); err != nil && p.ctx.Err() == nil {
			p.fail(err)
		}
	})
	r.mu.Unlock()
	r.change()
	r.log.Info(fmt.Sprintf("Starting Online Verify from sector %d", from*sectorsPerBlock))
	return nil
}

// checkVerifyRange refuses a range outside the device or an empty one.
func (r *Resource) checkVerifyRange(vr VerifyRange, from, stop, blocks uint64) error {
	sectors := blocks * sectorsPerBlock
	switch {
	case vr.Start != nil && from >= blocks:
		return fmt.Errorf("%s: %w: --start %d is at or past the end of the device (%d sectors)", r.name, ErrVerifyRange, *vr.Start, sectors)
	case vr.Stop != nil && stop <= from:
		return fmt.Errorf("%s: %w: --stop %d leaves nothing to verify from sector %d (give a --stop past --start, or none)",
			r.name, ErrVerifyRange, *vr.Stop, from*sectorsPerBlock)
	}
	return nil
}

// moveVerifyStop sets a running VerifyS's stop sector.
func (r *Resource) moveVerifyStop(p *peer, stopSector uint64) error {
	r.mu.Lock()
	rs := r.rsRunning(p)
	r.mu.Unlock()
	if rs == nil || !rs.verify || !rs.source {
		return r.refuse(codeAlreadyActive, "")
	}
	stop := min(bitmap.Blocks(p.size.Load()), stopBlock(stopSector))
	rs.mu.Lock()
	if rs.walked {
		rs.mu.Unlock()
		return r.refuse(codeAlreadyActive, "the verify has asked for its last block; start another once it ends")
	}
	at := rs.from + rs.sentBlocks
	if stop < at {
		stop = at // the blocks already asked for are compared anyway
	}
	rs.stop, rs.total = stop, stop-rs.from
	rs.mu.Unlock()
	r.log.Info(fmt.Sprintf("Online Verify stop sector set to %d", stop*sectorsPerBlock))
	return nil
}

// stopBlock is the block a verify stops before for a --stop sector: the
// first that starts at or after it.
func stopBlock(sector uint64) uint64 {
	b := sector / sectorsPerBlock
	if sector%sectorsPerBlock != 0 {
		b++
	}
	return b
}

// driveVerify is VerifyS's walk.
func (p *peer) driveVerify(rs *resync) error {
	r := p.r
	pace := p.newPacer(rs)
	digest := newDigest(r.cfg.Net.VerifyAlg)
	buf := make([]byte, bitmap.BlockSize)
	if err := p.send(transport.Data, wire.Command{Code: wire.CmdVerifyStart, Arg: rs.from}); err != nil {
		return err
	}
	for b := rs.from; ; b++ {
		rs.mu.Lock()
		stop := rs.stop
		if b >= stop {
			// Under rs.mu, as moveVerifyStop reads it: the stop can no
			// longer move.
			rs.walked = true
		}
		rs.mu.Unlock()
		if b >= stop {
			break
		}
		if err := p.waitUnpaused(); err != nil {
			return err
		}
		// Application I/O first, as for a resync: with it present and
		// the verify above c-min-rate, the next request waits.
		for p.slowDown(rs, &rs.arrived) {
			select {
			case <-p.ctx.Done():
				return p.ctx.Err()
			case <-time.After(throttleWait):
			}
		}
		if _, err := pace.grant(p.ctx, bitmap.BlockSize); err != nil {
			return err
		}
		select {
		case rs.slots <- struct{}{}:
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
		sent, err := p.verifyBlock(rs, b, buf, digest)
		if err != nil {
			return err
		}
		if !sent {
			// The stop moved to b or below while the walk waited: the
			// next turn ends it.
			<-rs.slots
			continue
		}
	}
	for range cap(rs.slots) {
		select {
		case rs.slots <- struct{}{}:
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
	}
	rs.mu.Lock()
	found := rs.found
	logRun := rs.endOutOfSyncRun()
	rs.mu.Unlock()
	logRun(r)
	if err := p.send(transport.Data, wire.Command{Code: wire.CmdVerifyDone, Arg: found}); err != nil {
		return err
	}
	p.verifyEnded(rs, found)
	return nil
}

// verifyBlock reads block b and sends its digest to VerifyT. The range
// stays locked until the request is queued: an application write to the
// block goes to the peer wholly before or wholly after it, so VerifyT
// compares the digest with the same data (on a Primary; a Secondary's
// replicated writes do not take this lock, and one racing the read can
// make a block differ that a resync then copies again).
//
// It reports false, sending nothing, if the stop moved to b or below while
// the walk waited for its turn.
func (p *peer) verifyBlock(rs *resync, b uint64, buf []byte, digest func([]byte) []byte) (bool, error) {
	off := int64(b) * bitmap.BlockSize
	unlock := p.r.ranges.lock(off, bitmap.BlockSize)
	defer unlock()
	p.r.localBegin()
	_, err := p.dev.ReadAt(buf, off)
	p.r.localEnd()
	if err != nil {
		p.r.diskFailed("verify read", err)
		return false, fmt.Errorf("verify: reading block %d: %w", b, err)
	}
	rs.mu.Lock()
	if b >= rs.stop {
		rs.mu.Unlock()
		return false, nil
	}
	rs.pending[b+1] = [2]int64{off, bitmap.BlockSize}
	rs.sentBlocks++
	rs.mu.Unlock()
	return true, p.send(transport.Data, wire.VerifyRequest{ID: b + 1, Offset: uint64(off), Length: bitmap.BlockSize, Digest: digest(buf)})
}

// endOutOfSyncRun ends the run of differing blocks VerifyS found last and
// returns the function that logs it, as DRBD does once the run ends
// (ov_out_of_sync_print): "Out of sync: start=800, size=16 (sectors)" for
// two adjacent blocks. Call with rs.mu held, the returned function
// without.
func (rs *resync) endOutOfSyncRun() (log func(r *Resource)) {
	start, n := rs.oosStart, rs.oosLen
	rs.oosLen = 0
	return func(r *Resource) {
		if n > 0 {
			r.log.Warn(fmt.Sprintf("Out of sync: start=%d, size=%d (sectors)", start/512, n/512))
		}
	}
}

// verifyEnded logs the result DRBD's way and returns to Connected.
func (p *peer) verifyEnded(rs *resync, found uint64) {
	r := p.r
	secs := time.Since(rs.start).Seconds()
	rs.mu.Lock()
	checked := rs.done
	rs.mu.Unlock()
	r.log.Info(fmt.Sprintf("Online verify done (total %.0f sec; paused 0 sec; %.0f K/sec)", secs,
		float64(checked*bitmap.BlockSize/1024)/max(secs, 0.001)))
	if found > 0 {
		r.log.Warn(fmt.Sprintf("Online verify found %d 4k block out of sync!", found))
	}
	if err := p.md.FlushBitmap(); err != nil {
		r.log.Error("writing the bitmap after verify failed", "err", err)
	}
	next := rs.from + checked
	r.mu.Lock()
	if p.rs == rs {
		p.rs = nil
	}
	r.lastVerify = found
	// The next verify without --start goes on from here: from the start
	// once this one reached the end of the device.
	r.ovStart = next
	if next >= bitmap.Blocks(p.size.Load()) {
		r.ovStart = 0
	}
	r.setConn(Connected)
	var oos handlerEnv
	if found > 0 {
		oos = r.handlerEnvLocked("out-of-sync", fmt.Sprintf("NBDMIRROR_OUT_OF_SYNC_BYTES=%d", found*bitmap.BlockSize))
	}
	r.mu.Unlock()
	r.change()
	r.spawnHandler(oos)
}

// startVerifyTarget enters VerifyT at the peer's request.
func (p *peer) startVerifyTarget(from uint64) error {
	r := p.r
	defer r.change()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != Connected {
		return protoErr("verify start while %s", r.conn)
	}
	if r.md == nil {
		return protoErr("verify start on a node whose disk is %s", r.disk)
	}
	if r.cfg.Net.VerifyAlg == "" {
		return protoErr("verify start while %s without a verify-alg", r.conn)
	}
	blocks := bitmap.Blocks(p.size.Load())
	if from >= blocks {
		return protoErr("verify from block %d of %d", from, blocks)
	}
	// VerifyT learns where it starts, not where VerifyS will stop (as
	// DRBD's): its progress counts to the end of the device.
	p.rs = newResync(false, true, blocks-from, 0)
	p.rs.from, p.rs.stop = from, blocks
	r.setConn(VerifyT)
	return nil
}

// serveVerify compares one block with VerifyS's digest (VerifyT).
func (p *peer) serveVerify(m wire.VerifyRequest) error {
	r := p.r
	rs := p.running()
	if rs == nil || !rs.verify || rs.source {
		return protoErr("verify request while not VerifyT")
	}
	if err := p.checkRange("verify request", m.Offset, m.Length); err != nil {
		return err
	}
	// A digest of another size is no digest of verify-alg: comparing it
	// would mark the range as differing.
	digest := newDigest(r.cfg.Net.VerifyAlg)
	if n := len(digest(nil)); len(m.Digest) != n {
		return protoErr("VerifyRequest with a %d-byte digest, verify-alg %s makes %d", len(m.Digest), r.cfg.Net.VerifyAlg, n)
	}
	buf := make([]byte, m.Length)
	off := int64(m.Offset)
	unlock := p.recvLock.lock(off, int64(m.Length))
	r.localBegin()
	_, err := p.dev.ReadAt(buf, off)
	r.localEnd()
	unlock()
	r.diskFailed("verify read", err)
	st := uint8(wire.VerifyEqual)
	switch {
	case err != nil:
		r.log.Error("verify: reading failed", "offset", off, "err", err)
		st = wire.VerifyError
	case !bytes.Equal(digest(buf), m.Digest):
		st = wire.VerifyDiffers
		p.md.MarkOutOfSync(off, int64(m.Length))
		rs.mu.Lock()
		rs.found += uint64(m.Length) / bitmap.BlockSize
		rs.mu.Unlock()
	}
	rs.mu.Lock()
	rs.done += uint64(m.Length) / bitmap.BlockSize
	rs.mu.Unlock()
	return p.send(transport.Control, wire.VerifyReply{ID: m.ID, Offset: m.Offset, Length: m.Length, Status: st})
}

// verifyReply is VerifyT's answer for one block (VerifyS, control stream).
func (p *peer) verifyReply(m wire.VerifyReply) error {
	r := p.r
	rs := p.running()
	if rs == nil || !rs.verify || !rs.source {
		return protoErr("verify reply while not VerifyS")
	}
	rs.mu.Lock()
	want, ok := rs.pending[m.ID]
	delete(rs.pending, m.ID)
	rs.mu.Unlock()
	if !ok || want != [2]int64{int64(m.Offset), int64(m.Length)} {
		return protoErr("verify reply %d was not asked for", m.ID)
	}
	if m.Status != wire.VerifyEqual {
		p.md.MarkOutOfSync(want[0], want[1])
	}
	logRun := func(*Resource) {}
	rs.mu.Lock()
	if m.Status != wire.VerifyEqual {
		rs.found += uint64(want[1]) / bitmap.BlockSize
		if rs.oosLen == 0 || rs.oosStart+rs.oosLen != want[0] {
			logRun = rs.endOutOfSyncRun()
			rs.oosStart = want[0]
		}
		rs.oosLen += want[1]
	} else {
		logRun = rs.endOutOfSyncRun()
	}
	rs.done += uint64(want[1]) / bitmap.BlockSize
	rs.arrived += want[1]
	rs.mu.Unlock()
	logRun(r)
	<-rs.slots
	return nil
}

// verifyTargetDone ends VerifyT.
func (p *peer) verifyTargetDone(found uint64) error {
	rs := p.running()
	if rs == nil || !rs.verify || rs.source {
		return protoErr("verify end while not VerifyT")
	}
	p.verifyEnded(rs, found)
	return nil
}
