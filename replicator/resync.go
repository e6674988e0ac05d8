package replicator

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// Resync (reference/drbd.md §6): after the bitmaps are exchanged and ORed
// (WFBitMapS/T), the source hands over a sync UUID and the SyncTarget
// drives: it walks the bitmap in ascending order, coalescing dirty runs
// into requests of up to resyncMaxReq, with a bounded number in flight,
// paced by the rate limit. The source reads each range under the same
// range lock as application writes, so an application write and resync
// data of the same blocks reach the target in the order they happened on
// the source, and the newer data wins on both sides. The target writes
// what arrives, and at each commit (every resyncCommit, and at the end)
// flushes its disk, clears the bits, writes the bitmap and acknowledges
// the ranges, on which the source clears its bits: a bit is cleared only
// once the data is durable, so an interrupted resync resumes where the
// last commit left it.

const (
	resyncMaxReq    = 1 << 20 // largest request, bytes
	resyncMaxFlight = 8       // requests in flight at once (fixed rate)
	resyncCommit    = 500 * time.Millisecond
)

// resync is a running resync or verify, seen from this node.
type resync struct {
	source   bool
	verify   bool
	full     bool
	start    time.Time
	total    uint64 // blocks to do when it started
	finished bool   // the target sent (or the source received) the end

	// progress samples for the speed lines: (time, blocks left)
	samples    []rsSample
	lastLeft   uint64    // blocks left at the last change
	lastChange time.Time // when the blocks left last changed (stalled after 3 minutes)
	done       uint64    // verify: blocks checked
	// verify: the first block, the block it stops before (VerifyS may
	// move it while running; under mu) and the blocks asked for so far
	from, stop, sentBlocks uint64
	walked                 bool // VerifyS asked for its last block: the stop is final
	// VerifyS: the run of differing blocks being found, in bytes, logged
	// once it ends (endOutOfSyncRun)
	oosStart, oosLen int64

	// target side
	mu      sync.Mutex
	ids     uint64
	pending map[uint64][2]int64 // request id → [off, len]
	landed  [][2]int64          // written, not yet committed
	failed  uint64              // blocks the source could not read
	same    uint64              // blocks with equal checksums (csums)
	sent    uint64              // bytes of data received
	arrived int64               // bytes of replies received (the controller's input)
	want    int64               // the controller's rate, bytes/s (0: fixed rate)
	slots   chan struct{}
	found   uint64 // verify: differing blocks

	served   int64       // source side: bytes of requests answered
	throttle *rsThrottle // c-min-rate, made on first use
}

// newResync returns a resync starting now with total blocks to do and
// room for slots requests in flight.
func newResync(source, verify bool, total uint64, slots int) *resync {
	return &resync{source: source, verify: verify, start: time.Now(), total: total,
		pending: map[uint64][2]int64{}, slots: make(chan struct{}, max(slots, 1))}
}

type rsSample struct {
	at   time.Time
	left uint64
}

// rsRunning returns the resync of session p; call with mu held.
func (r *Resource) rsRunning(p *peer) *resync {
	if r.p != p || p == nil {
		return nil
	}
	return p.rs
}

// running returns the resync of session p, if it is the current session.
func (p *peer) running() *resync {
	p.r.mu.Lock()
	defer p.r.mu.Unlock()
	return p.r.rsRunning(p)
}

// startSync enters WFBitMapS (source) or WFBitMapT (target). With full
// every block is marked first. The source sends its bitmap now (after
// cmd, if any, which makes the peer start too); the target sends its
// own when the source's has arrived.
func (p *peer) startSync(source, full bool, cmd *wire.Command) error {
	r := p.r
	if !source {
		// before-resync-target (e.g. an LVM snapshot of the data about
		// to be overwritten) may veto the resync, before anything of the
		// source's lands here (beforeResync).
		if err := p.beforeResync("before-resync-target"); err != nil {
			return err
		}
		// Durably Inconsistent before anything of the source's lands
		// here (its writes are replicated from now on): if the source is
		// lost midway, this disk is not promoted as it is.
		if err := p.markInconsistent(); err != nil {
			return err
		}
	}
	if full {
		p.md.MarkOutOfSync(0, p.size.Load())
	}
	r.mu.Lock()
	if !p.current() {
		r.mu.Unlock()
		return fmt.Errorf("%w: the session ended", transport.ErrClosed)
	}
	p.bmNext = 0
	st := WFBitMapT
	if source {
		st = WFBitMapS
	}
	r.setConn(st)
	r.mu.Unlock()
	r.change()
	if cmd != nil {
		if err := p.send(transport.Data, *cmd); err != nil {
			return err
		}
	}
	if source {
		return p.sendBitmap()
	}
	return nil
}

// beforeResync runs before-resync-target or -source; a non-zero exit code
// (but the source's 3, ignored as DRBD's: old userland tools) vetoes the
// resync: the session ends refused (StandAlone), as DRBD drops the
// connection. Failing the session also ends it when an admin verb
// (invalidate) started the resync.
func (p *peer) beforeResync(name string) error {
	st := p.r.runHandler(p.r.handlerEnv(name))
	if st == 0 || name == "before-resync-source" && st == 3 {
		return nil
	}
	err := &errRefused{reason: fmt.Sprintf("%s handler returned %d, dropping connection", name, st)}
	p.fail(err)
	return err
}

// sendBitmap sends this node's bitmap, run-length encoded, in order with
// the writes on the data stream.
func (p *peer) sendBitmap() error {
	p.tl.send.Lock()
	defer p.tl.send.Unlock()
	blocks := bitmap.Blocks(p.size.Load())
	for _, c := range wire.BitmapChunks(0, blocks, bitmapChunk, p.md.NextRun) {
		if err := p.send(transport.Data, c); err != nil {
			return err
		}
	}
	return nil
}

// receiveBitmap ORs a chunk of the peer's bitmap into this node's.
func (p *peer) receiveBitmap(m wire.Bitmap) error {
	r := p.r
	r.mu.Lock()
	conn := r.conn
	r.mu.Unlock()
	blocks := bitmap.Blocks(p.size.Load())
	switch {
	case conn != WFBitMapS && conn != WFBitMapT:
		return protoErr("bitmap while %s", conn)
	case m.Start != p.bmNext || m.Start+m.Count > blocks:
		return protoErr("bitmap chunk of blocks [%d, +%d), expected from %d of %d", m.Start, m.Count, p.bmNext, blocks)
	case m.Last && m.Start+m.Count != blocks: // refused before its bits are taken
		return protoErr("bitmap ended at block %d of %d", m.Start+m.Count, blocks)
	}
	m.Each(func(s, n uint64) { p.md.MarkOutOfSync(int64(s)*bitmap.BlockSize, int64(n)*bitmap.BlockSize) })
	p.bmNext += m.Count
	if !m.Last {
		return nil
	}
	if conn == WFBitMapT {
		if err := p.sendBitmap(); err != nil {
			return err
		}
		r.mu.Lock()
		r.setConn(WFSyncUUID)
		r.mu.Unlock()
		r.change()
		return nil
	}
	// Source: before-resync-source may veto, now that both bitmaps are
	// here (where DRBD's drbd_start_resync runs it; not during the
	// handshake, which holds application I/O back).
	if err := p.beforeResync("before-resync-source"); err != nil {
		return err
	}
	// A new bitmap UUID marks the start of this resync; the target takes
	// it as its current UUID (reference/drbd.md §4.2).
	var uuid uint64
	err := p.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		u := &sb.UUIDs
		old := u.Bitmap
		if old != 0 && old&^1 != metadisk.UUIDJustCreated {
			uuid = old + 1<<48
		} else {
			uuid = randomUUID()
		}
		if old != 0 {
			u.History[1], u.History[0] = u.History[0], old
		}
		u.Bitmap = uuid
	})
	if err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	if err := p.send(transport.Data, wire.SyncUUID{UUID: uuid}); err != nil {
		return err
	}
	r.log.Info("resync starting as SyncSource", "out_of_sync_bytes", p.md.OutOfSync()*bitmap.BlockSize)
	r.mu.Lock()
	p.rs = newResync(true, false, p.md.OutOfSync(), 0)
	r.setConn(SyncSource)
	if r.peerDisk > Inconsistent {
		r.setPeerState(r.peerRole, Inconsistent)
	}
	r.mu.Unlock()
	r.change()
	return nil
}

// receiveSyncUUID starts SyncTarget: the disk is Inconsistent (durably)
// before the first block is replaced.
func (p *peer) receiveSyncUUID(m wire.SyncUUID) error {
	r := p.r
	r.mu.Lock()
	conn := r.conn
	r.mu.Unlock()
	if conn != WFSyncUUID {
		return protoErr("sync UUID while %s", conn)
	}
	err := p.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		sb.UUIDs.Current = m.UUID&^1 | sb.UUIDs.Current&1
		sb.UUIDs.Bitmap = 0
		sb.Flags &^= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
	})
	if err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	total := p.md.OutOfSync()
	r.log.Info("resync starting as SyncTarget", "out_of_sync_bytes", total*bitmap.BlockSize)
	_, flight := r.limits()
	rs := newResync(false, false, total, int(flight/resyncMaxReq))
	r.mu.Lock()
	p.rs = rs
	r.setState(r.role, Inconsistent)
	r.setConn(SyncTarget)
	r.mu.Unlock()
	p.sendState()
	r.change()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := p.driveResync(rs); err != nil && p.ctx.Err() == nil {
			p.fail(err)
		}
	}()
	return nil
}

// limits returns the fixed resync rate limit (bytes/s; 0 = the dynamic
// controller decides, c-plan-ahead > 0) and the bytes that may be
// requested and not arrived.
func (r *Resource) limits() (rate, flight int64) {
	d := r.conf().Disk
	if d.CPlanAhead == 0 {
		return d.ResyncRate, resyncMaxFlight * resyncMaxReq
	}
	return 0, resyncMaxFlight * resyncMaxReq
}

// pacer paces the SyncTarget's requests: a token bucket at resync-rate,
// or the dynamic controller's budget, recomputed every step.
type pacer struct {
	lim       *transport.Limiter
	ctl       *rsController
	rs        *resync
	next      time.Time
	budget    int64
	requested int64
	seen      int64 // rs.arrived at the last step
	r         *Resource
}

func (p *peer) newPacer(rs *resync) *pacer {
	d := p.r.conf().Disk
	if d.CPlanAhead == 0 {
		return &pacer{lim: transport.NewLimiter(d.ResyncRate), rs: rs, r: p.r}
	}
	return &pacer{ctl: newRSController(d), rs: rs, next: time.Now(), r: p.r}
}

// grant waits until up to length bytes may be requested and returns how
// many (a multiple of 4 KiB, at least one block).
func (pc *pacer) grant(ctx context.Context, length int64) (int64, error) {
	if pc.ctl == nil {
		pc.refresh() // adjust.go
		return length, pc.lim.Wait(ctx, int(length))
	}
	for pc.budget < bitmap.BlockSize {
		if d := time.Until(pc.next); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return 0, ctx.Err()
			}
		}
		pc.next = pc.next.Add(controllerStep)
		if time.Since(pc.next) > controllerStep { // fell behind (a pause): restart the clock
			pc.next = time.Now().Add(controllerStep)
		}
		pc.rs.mu.Lock()
		arrived := pc.rs.arrived
		pc.rs.mu.Unlock()
		step := pc.ctl.step(arrived-pc.seen, pc.requested-arrived)
		pc.seen = arrived
		pc.budget += step
		pc.rs.mu.Lock()
		pc.rs.want = step * int64(time.Second/controllerStep)
		pc.rs.mu.Unlock()
	}
	n := min(length, pc.budget-pc.budget%bitmap.BlockSize)
	pc.budget -= n
	pc.requested += n
	return n, nil
}

// slowDown asks the c-min-rate throttle whether the next resync request
// waits; done is the resync's counter of bytes done on this side (under
// rs.mu).
func (p *peer) slowDown(rs *resync, done *int64) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.throttle == nil {
		rs.throttle = newRSThrottle(p.r.conf().Disk.CMinRate, p.r.appIO.Load(), rs.start)
	}
	if !rs.throttle.slowDown(p.r.appIO.Load(), *done, time.Now()) {
		return false
	}
	p.r.throttled.Add(1)
	return true
}

// throttleWaits returns how many requests the throttle held back; call
// with rs.mu held.
func (rs *resync) throttleWaits() uint64 {
	if rs.throttle == nil {
		return 0
	}
	return rs.throttle.waits
}

// driveResync is the SyncTarget's walk over the bitmap.
func (p *peer) driveResync(rs *resync) error {
	r := p.r
	pace := p.newPacer(rs)
	digest := newDigest(r.cfg.Net.CsumsAlg)
	blocks := bitmap.Blocks(p.size.Load())
	lastCommit := time.Now()
	for pos := uint64(0); pos < blocks; {
		if err := p.waitUnpaused(); err != nil {
			return err
		}
		// Application I/O first: with it present and the resync above
		// c-min-rate, the next request waits (DRBD requeues it).
		for p.slowDown(rs, &rs.arrived) {
			select {
			case <-p.ctx.Done():
				return p.ctx.Err()
			case <-time.After(throttleWait):
			}
		}
		start, n, ok := p.md.NextRun(pos)
		if !ok || start >= blocks {
			break
		}
		n = min(n, resyncMaxReq/bitmap.BlockSize, blocks-start)
		off, length := int64(start)*bitmap.BlockSize, int64(n)*bitmap.BlockSize
		length, err := pace.grant(p.ctx, length)
		if err != nil {
			return err
		}
		n = uint64(length / bitmap.BlockSize)
		select {
		case rs.slots <- struct{}{}:
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
		req := wire.ResyncRequest{Offset: uint64(off), Length: uint32(length)}
		if digest != nil {
			// One digest per block: the source sends only the blocks
			// that differ.
			buf := make([]byte, length)
			if _, err := p.dev.ReadAt(buf, off); err == nil {
				for b := int64(0); b < length; b += bitmap.BlockSize {
					req.Digests = append(req.Digests, digest(buf[b:b+bitmap.BlockSize])...)
				}
			}
		}
		rs.mu.Lock()
		rs.ids++
		req.ID = rs.ids
		rs.pending[req.ID] = [2]int64{off, length}
		rs.mu.Unlock()
		if err := p.send(transport.Data, req); err != nil {
			return err
		}
		pos = start + n
		if time.Since(lastCommit) >= resyncCommit {
			if err := p.commitResync(rs, false); err != nil {
				return err
			}
			lastCommit = time.Now()
		}
	}
	// Wait for every reply, then commit the rest.
	for range cap(rs.slots) {
		select {
		case rs.slots <- struct{}{}:
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
	}
	if err := p.commitResync(rs, true); err != nil {
		return err
	}
	rs.mu.Lock()
	failed := rs.failed
	rs.mu.Unlock()
	left := p.md.OutOfSync()
	if failed == 0 && left != 0 {
		failed = left
	}
	r.mu.Lock()
	rs.finished = true
	r.mu.Unlock()
	rs.mu.Lock()
	same, sent, waits := rs.same, rs.sent, rs.throttleWaits()
	rs.mu.Unlock()
	r.log.Info("resync done on the SyncTarget side", "seconds", time.Since(rs.start).Seconds(),
		"equal_checksum_bytes", same*bitmap.BlockSize, "transferred_bytes", sent, "failed_blocks", failed,
		"throttled_requests", waits)
	return p.send(transport.Data, wire.Command{Code: wire.CmdResyncDone, Arg: failed})
}

// waitUnpaused waits while pause-sync holds the resync on either side.
func (p *peer) waitUnpaused() error {
	r := p.r
	for {
		r.mu.Lock()
		paused := r.userPaused || r.peerPaused
		r.mu.Unlock()
		if !paused {
			return nil
		}
		select {
		case <-p.ctx.Done():
			return p.ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// commitResync makes the landed resync data durable, clears its bits,
// persists the bitmap (at the end, or when asked) and acknowledges the
// ranges to the source.
func (p *peer) commitResync(rs *resync, final bool) error {
	rs.mu.Lock()
	landed := rs.landed
	rs.landed = nil
	rs.mu.Unlock()
	if len(landed) == 0 && !final {
		return nil
	}
	p.r.localBegin()
	err := p.dev.Flush()
	p.r.localEnd()
	if err != nil {
		p.r.diskFailed("flush", err)
		return fmt.Errorf("flushing resync data: %w", err)
	}
	for _, l := range landed {
		p.md.MarkInSync(l[0], l[1])
	}
	if err := p.md.FlushBitmap(); err != nil {
		return fmt.Errorf("writing the bitmap: %w", err)
	}
	for _, l := range landed {
		if err := p.send(transport.Data, wire.ResyncAck{Offset: uint64(l[0]), Length: uint32(l[1]), Status: wire.AckOK}); err != nil {
			return err
		}
	}
	p.r.change()
	return nil
}

// serveResync answers a SyncTarget's request (source side), in a
// goroutine of its own: the range lock orders it with application writes.
func (p *peer) serveResync(m wire.ResyncRequest) error {
	r := p.r
	r.mu.Lock()
	conn := r.conn
	r.mu.Unlock()
	if conn != SyncSource && conn != PausedSyncS {
		return protoErr("resync request while %s", conn)
	}
	if err := p.checkRange("resync request", m.Offset, m.Length); err != nil {
		return err
	}
	if m.Length > resyncMaxReq {
		return protoErr("resync request of %d bytes, above the %d a SyncTarget asks for", m.Length, resyncMaxReq)
	}
	if len(m.Digests) > 0 {
		if d := newDigest(r.cfg.Net.CsumsAlg); d == nil || len(d(nil)) != m.DigestSize() {
			return protoErr("resync request with %d-byte digests, csums-alg here is %q", m.DigestSize(), r.cfg.Net.CsumsAlg)
		}
	}
	// The peer's writes that came before this request on the data stream
	// and overlap it are written before it is read (they may still be in
	// flight: small ones asynchronously, large ones in parallel).
	p.recvLock.lock(int64(m.Offset), int64(m.Length))()
	select {
	case p.serve <- struct{}{}:
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
	if p.served == nil {
		p.served = map[[2]int64]int{}
	}
	p.served[[2]int64{int64(m.Offset), int64(m.Length)}]++
	digest := newDigest(r.cfg.Net.CsumsAlg)
	rs := p.running()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer func() { <-p.serve }()
		off, n := int64(m.Offset), int64(m.Length)
		// Unless the target is Primary (its application waits for this
		// data), a throttled request is served a moment later (DRBD:
		// HZ/10).
		r.mu.Lock()
		peerPrimary := r.peerRole == RolePrimary
		r.mu.Unlock()
		if rs != nil && !peerPrimary && p.slowDown(rs, &rs.served) {
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(throttleWait):
			}
		}
		if rs != nil {
			defer func() {
				rs.mu.Lock()
				rs.served += n
				rs.mu.Unlock()
			}()
		}
		unlock := r.ranges.lock(off, n)
		defer unlock()
		buf := make([]byte, n)
		reply := wire.ResyncReply{ID: m.ID, Offset: m.Offset, Length: m.Length}
		r.localBegin()
		_, err := p.dev.ReadAt(buf, off)
		r.localEnd()
		switch {
		case err != nil:
			r.log.Error("reading for the resync failed", "offset", off, "length", n, "err", err)
			r.diskFailed("resync read", err)
			reply.Status = wire.ReplyError
		case digest != nil && len(m.Digests) > 0:
			reply = csumsReply(reply, buf, m.Digests, m.DigestSize(), digest)
			r.read.Add(uint64(len(reply.Data)))
		default:
			reply.Status, reply.Data = wire.ReplyData, buf
			r.read.Add(uint64(n))
		}
		// The data goes into the frame from buf (not copied again), which
		// stays untouched until SendMany returns.
		if err := p.s.SendMany(transport.Data, encodeAll([]wire.Message{reply}, &p.r.netSent)); err != nil {
			p.fail(err)
			return
		}
		r.resyncBytes.Add(uint64(len(reply.Data)))
	}()
	return nil
}

// csumsReply answers a request with per-block digests: the blocks of buf
// whose digest differs, all of them (ReplyData), or none (ReplyInSync).
func csumsReply(reply wire.ResyncReply, buf, digests []byte, size int, digest func([]byte) []byte) wire.ResyncReply {
	blocks := len(buf) / bitmap.BlockSize
	present := make([]byte, (blocks+7)/8)
	var data []byte
	differ := 0
	for i := range blocks {
		block := buf[i*bitmap.BlockSize : (i+1)*bitmap.BlockSize]
		if !bytes.Equal(digest(block), digests[i*size:(i+1)*size]) {
			present[i/8] |= 1 << (i % 8)
			data = append(data, block...)
			differ++
		}
	}
	switch differ {
	case 0:
		reply.Status = wire.ReplyInSync
	case blocks:
		reply.Status, reply.Data = wire.ReplyData, buf
	default:
		reply.Status, reply.Present, reply.Data = wire.ReplyPartial, present, data
	}
	return reply
}

// receiveResyncReply writes resync data (target side). The range lock is
// taken in stream order, so a write of the same blocks that arrived
// earlier lands first and one that arrives later lands after.
//
// buf, if not nil, is the frame payload m was decoded from: it goes back
// to the transport once the data is written.
func (p *peer) receiveResyncReply(m wire.ResyncReply, buf []byte) error {
	r := p.r
	rs := p.running()
	if rs == nil || rs.source || rs.verify {
		return protoErr("resync data while not SyncTarget")
	}
	rs.mu.Lock()
	want, ok := rs.pending[m.ID]
	delete(rs.pending, m.ID)
	rs.mu.Unlock()
	if !ok || want != [2]int64{int64(m.Offset), int64(m.Length)} {
		return protoErr("resync reply %d for [%d, +%d) was not requested", m.ID, m.Offset, m.Length)
	}
	off, n := want[0], want[1]
	unlock := p.recvLock.lock(off, n)
	p.wg.Add(1)
	rs.mu.Lock()
	rs.arrived += n
	rs.mu.Unlock()
	go func() {
		defer p.wg.Done()
		defer func() { <-rs.slots }()
		defer unlock()
		if buf != nil {
			defer p.s.Recycle(buf) // last: nothing uses m.Data after the write
		}
		switch m.Status {
		case wire.ReplyError:
			rs.mu.Lock()
			rs.failed += uint64(n / bitmap.BlockSize)
			rs.mu.Unlock()
			return
		case wire.ReplyInSync:
			rs.mu.Lock()
			rs.same += uint64(n / bitmap.BlockSize)
			rs.landed = append(rs.landed, want)
			rs.mu.Unlock()
			return
		}
		r.localBegin()
		var err error
		if m.Status == wire.ReplyPartial {
			err = p.writePresent(m)
			rs.mu.Lock()
			rs.same += uint64(n/bitmap.BlockSize) - uint64(m.PresentBlocks())
			rs.mu.Unlock()
		} else {
			err = p.dev.WriteAt(m.Data, off, false)
		}
		r.localEnd()
		if err != nil {
			r.log.Error("writing resync data failed", "offset", off, "length", n, "err", err)
			r.diskFailed("resync write", err)
			rs.mu.Lock()
			rs.failed += uint64(n / bitmap.BlockSize)
			rs.mu.Unlock()
			return
		}
		r.written.Add(uint64(len(m.Data)))
		r.resyncBytes.Add(uint64(len(m.Data)))
		rs.mu.Lock()
		rs.sent += uint64(len(m.Data))
		rs.landed = append(rs.landed, want)
		rs.mu.Unlock()
	}()
	return nil
}

// writePresent writes the blocks a partial reply carries, each run of
// consecutive blocks at once.
func (p *peer) writePresent(m wire.ResyncReply) error {
	blocks := int(m.Length / bitmap.BlockSize)
	data := m.Data
	for i := 0; i < blocks; {
		if m.Present[i/8]&(1<<(i%8)) == 0 {
			i++
			continue
		}
		j := i
		for j < blocks && m.Present[j/8]&(1<<(j%8)) != 0 {
			j++
		}
		n := (j - i) * bitmap.BlockSize
		if err := p.dev.WriteAt(data[:n], int64(m.Offset)+int64(i)*bitmap.BlockSize, false); err != nil {
			return err
		}
		data = data[n:]
		i = j
	}
	return nil
}

// receiveResyncAck clears the source's bits of a range the target holds
// durably.
func (p *peer) receiveResyncAck(m wire.ResyncAck) error {
	rs := p.running()
	if rs == nil || !rs.source {
		return protoErr("resync ack while not SyncSource")
	}
	// Only ranges this node served are acknowledged.
	key := [2]int64{int64(m.Offset), int64(m.Length)}
	if p.served[key] == 0 {
		return protoErr("resync ack for [%d, +%d), which was not served", m.Offset, m.Length)
	}
	if p.served[key]--; p.served[key] == 0 {
		delete(p.served, key)
	}
	if m.Status == wire.AckOK {
		p.md.MarkInSync(int64(m.Offset), int64(m.Length))
	}
	return nil
}

// finishSource ends the resync on the source: unless blocks failed, the
// bitmap UUID goes to the history and the source's generations are sent
// for the target to adopt (reference/drbd.md §4.2).
func (p *peer) finishSource(failed uint64) error {
	r := p.r
	rs := p.running()
	if rs == nil || !rs.source {
		return protoErr("resync end while not SyncSource")
	}
	if left := p.md.OutOfSync(); left != 0 && failed == 0 {
		// Blocks the target never acknowledged: not a finished resync.
		r.log.Error("resync ended with blocks still marked on the SyncSource", "blocks", left)
		failed = left
	}
	if failed == 0 {
		err := p.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
			u := &sb.UUIDs
			if u.Bitmap != 0 {
				u.History[1], u.History[0] = u.History[0], u.Bitmap
			}
			u.Bitmap = 0
			sb.Flags &^= metadisk.FlagCrashedPrimary
		})
		if err != nil {
			return fmt.Errorf("metadata: %w", err)
		}
	}
	if err := p.md.FlushBitmap(); err != nil {
		return fmt.Errorf("writing the bitmap: %w", err)
	}
	_, uuids := p.generation()
	r.mu.Lock()
	rs.finished = true
	p.rs = nil
	r.setConn(Connected)
	if failed == 0 {
		r.setPeerState(r.peerRole, UpToDate)
	}
	r.mu.Unlock()
	if failed == 0 {
		r.log.Info("Resync done", "seconds", time.Since(rs.start).Seconds(), "bytes", rs.total*bitmap.BlockSize)
	} else {
		r.log.Error("resync done, but blocks failed: the SyncTarget stays Inconsistent", "failed_blocks", failed)
	}
	r.change()
	if failed != 0 {
		// The target stays Inconsistent; it learns the count.
		return p.send(transport.Data, wire.Command{Code: wire.CmdResyncDone, Arg: failed})
	}
	return p.send(transport.Data, uuids)
}

// resyncFailedAtSource ends a SyncTarget's resync that did not complete
// (blocks failed on either side): the disk stays Inconsistent, the
// connection goes back to Connected; another resync (invalidate, or a
// reconnect) may complete it.
func (p *peer) resyncFailedAtSource(failed uint64) error {
	r := p.r
	r.mu.Lock()
	rs := r.rsRunning(p)
	if rs == nil || !rs.finished {
		r.mu.Unlock()
		return protoErr("resync end from the source before this target finished")
	}
	p.rs = nil
	r.setConn(Connected)
	r.mu.Unlock()
	r.log.Error("resync failed: the disk stays Inconsistent", "failed_blocks", failed)
	r.change()
	return nil
}

// finishTarget adopts the source's generations and becomes UpToDate.
func (p *peer) finishTarget(u wire.UUIDs) error {
	r := p.r
	p.becomeUpToDate(&u)
	r.mu.Lock()
	p.rs = nil
	r.setConn(Connected)
	r.mu.Unlock()
	r.log.Info("resync done: the disk is UpToDate")
	r.change()
	r.spawnHandler(r.handlerEnv("after-resync-target"))
	return nil
}

// newDigest returns the checksum of csums-alg/verify-alg, nil for "".
func newDigest(alg string) func([]byte) []byte {
	var h func() hash.Hash
	switch alg {
	case "":
		return nil
	case "sha256":
		h = sha256.New
	case "sha1":
		h = sha1.New
	case "md5":
		h = md5.New
	case "crc32c":
		tab := crc32.MakeTable(crc32.Castagnoli)
		return func(b []byte) []byte { return binary.BigEndian.AppendUint32(nil, crc32.Checksum(b, tab)) }
	case "xxh64":
		return func(b []byte) []byte { return binary.BigEndian.AppendUint64(nil, xxhash.Sum64(b)) }
	default:
		h = sha256.New // the configuration parser accepts only the names above
	}
	return func(b []byte) []byte {
		d := h()
		d.Write(b)
		return d.Sum(nil)
	}
}

// progress computes the status lines' figures from the blocks left now,
// keeping a sample a second for the recent speed (over ~18 s, as
// /proc/drbd's).
func (rs *resync) progress(left uint64, now time.Time) *Resync {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if n := len(rs.samples); n == 0 || now.Sub(rs.samples[n-1].at) >= time.Second {
		rs.samples = append(rs.samples, rsSample{at: now, left: left})
		for len(rs.samples) > 1 && now.Sub(rs.samples[0].at) > 18*time.Second {
			rs.samples = rs.samples[1:]
		}
	}
	total := max(rs.total, left)
	p := &Resync{Verify: rs.verify, TotalBytes: total * bitmap.BlockSize, LeftBytes: left * bitmap.BlockSize, Want: rs.want}
	if el := now.Sub(rs.start).Seconds(); el > 0 {
		p.SpeedAverage = int64(float64((total-left)*bitmap.BlockSize) / el)
	}
	p.SpeedRecent = p.SpeedAverage
	if first := rs.samples[0]; now.Sub(first.at) >= time.Second && first.left >= left {
		p.SpeedRecent = int64(float64((first.left-left)*bitmap.BlockSize) / now.Sub(first.at).Seconds())
	}
	switch {
	case p.SpeedRecent > 0:
		p.ETA = time.Duration(float64(left*bitmap.BlockSize) / float64(p.SpeedRecent) * float64(time.Second))
	case left > 0:
		p.ETA = -1 // not shrinking: no finish time ("finish: ∞")
	}
	if rs.lastChange.IsZero() || left != rs.lastLeft {
		rs.lastLeft, rs.lastChange = left, now
	}
	p.Stalled = left > 0 && now.Sub(rs.lastChange) >= 3*time.Minute
	return p
}
