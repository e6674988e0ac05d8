package replicator

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// The transfer log (DESIGN.md §4, reference/drbd.md §5.4): every write a
// Primary sends to its peer stays here, holding its activity-log extents,
// until the peer acknowledges the barrier that closes its epoch, i.e.
// until the write is on the peer's stable storage. If the session ends
// first, its blocks are marked out of sync.

// tlEntry is one replicated write.
type tlEntry struct {
	seq, epoch uint64
	off, n     int64
	span       metadisk.Span
	local      bool          // the local disk write finished
	net        bool          // barrier-acked, or marked out of sync at a loss
	acked      chan struct{} // closed on the peer's write ack, or at a loss (protocol C, or remote)
	ackFailed  bool          // the peer could not write it
	// remote: a diskless Primary's write, on the peer only: no activity
	// log, no marks; it waits for its write ack (unacked: the session
	// ended first).
	remote, unacked bool
}

// tlEpoch is the writes of one epoch, awaiting their barrier ack.
type tlEpoch struct {
	num     uint64
	entries []*tlEntry
	closed  bool          // its barrier was sent
	done    chan struct{} // closed on the barrier ack, or at a loss
	born    time.Time     // when its first write was logged
}

// tlog is the transfer log of one session.
type tlog struct {
	md   *metadisk.Meta
	sess *transport.Session
	ackC bool // protocol B or C: writes want a write ack
	// maxEpoch closes an epoch at max-epoch-size writes.
	maxEpoch int
	sent     *atomic.Uint64 // the resource's bytes-sent counter

	// send orders the data stream: a write's epoch and sequence number are
	// assigned and the frame sent under it, so frames leave in epoch order.
	// It is never taken with mu held the other way round, and mu is never
	// held across a send.
	send sync.Mutex

	mu      sync.Mutex
	lost    bool // the session ended: nothing more is sent or logged
	remote  bool // the Primary's disk is detached: writes go to the peer only (diskless.go)
	seq     uint64
	closing bool       // a write of the open epoch completed: close it before the next
	epochs  []*tlEpoch // oldest first; the last is the open one
	bySeq   map[uint64]*tlEntry
	pending int64 // bytes sent, not yet barrier-acked
	kick    chan struct{}
}

func newTlog(md *metadisk.Meta, s *transport.Session, protocolC bool, maxEpoch int, sent *atomic.Uint64) *tlog {
	if maxEpoch <= 0 {
		maxEpoch = 2048
	}
	t := &tlog{md: md, sess: s, ackC: protocolC, maxEpoch: maxEpoch, bySeq: map[uint64]*tlEntry{}, kick: make(chan struct{}, 1), sent: sent}
	t.epochs = []*tlEpoch{{num: 1, done: make(chan struct{})}}
	return t
}

func (t *tlog) open() *tlEpoch { return t.epochs[len(t.epochs)-1] }

// closeEpoch closes the open epoch if it has writes (or if force) and
// returns the barrier to send, with BarrierFlush if flush; call with mu
// and send held.
func (t *tlog) closeEpoch(force, flush bool) (wire.Barrier, *tlEpoch, bool) {
	ep := t.open()
	if len(ep.entries) == 0 && !force {
		return wire.Barrier{}, nil, false
	}
	ep.closed = true
	t.closing = false
	t.epochs = append(t.epochs, &tlEpoch{num: ep.num + 1, done: make(chan struct{})})
	b := wire.Barrier{Epoch: ep.num, Writes: uint32(len(ep.entries))}
	if flush {
		b.Flags = wire.BarrierFlush
	}
	return b, ep, true
}

// submit logs a write and sends it to the peer. It returns nil if the
// session is already lost (the caller marks the blocks itself). A send
// error is not returned: the session's end marks every logged write.
func (t *tlog) submit(off, n int64, span metadisk.Span, kind uint8, fua bool, data []byte) *tlEntry {
	t.send.Lock()
	t.mu.Lock()
	if t.lost {
		t.mu.Unlock()
		t.send.Unlock()
		return nil
	}
	var barrier wire.Barrier
	var sendBarrier bool
	if t.closing || len(t.open().entries) >= t.maxEpoch {
		barrier, _, sendBarrier = t.closeEpoch(false, false)
	}
	t.seq++
	ep := t.open()
	e := &tlEntry{seq: t.seq, epoch: ep.num, off: off, n: n, span: span, remote: t.remote}
	wantAck := t.ackC || t.remote
	if wantAck {
		e.acked = make(chan struct{})
		t.bySeq[e.seq] = e
	}
	if len(ep.entries) == 0 {
		ep.born = time.Now()
	}
	ep.entries = append(ep.entries, e)
	t.pending += n
	t.mu.Unlock()
	w := wire.Write{Seq: e.seq, Epoch: e.epoch, Offset: uint64(off), Length: uint32(n), Kind: kind, Data: data}
	if fua {
		w.Flags |= wire.WriteFUA
	}
	if wantAck {
		w.Flags |= wire.WriteAckWanted
	}
	ms := []wire.Message{w}
	if sendBarrier {
		ms = []wire.Message{barrier, w}
	}
	// Queued in order under send, written outside it: the frames of
	// writers submitting meanwhile go out with the same write.
	wait, err := t.sess.Queue(transport.Data, encodeAll(ms, t.sent))
	t.send.Unlock()
	if err == nil {
		wait()
	}
	return e
}

// sendMsg sends ms on the data stream (call with send held); an error is
// not returned: the session's end marks every logged write.
func (t *tlog) sendMsg(ms ...wire.Message) {
	t.sess.SendMany(transport.Data, encodeAll(ms, t.sent))
}

// encodeAll encodes ms as transport frames, counting their bytes in sent.
// A write's or resync reply's data is not copied here: it goes into the
// frame from where it is (or is not copied at all, see transport.Out).
func encodeAll(ms []wire.Message, sent *atomic.Uint64) []transport.Out {
	out := make([]transport.Out, len(ms))
	for i, m := range ms {
		o := transport.Out{Type: m.Type()}
		if b, ok := m.(wire.BulkMessage); ok {
			o.Payload, o.Tail = b.AppendHeader(nil), b.Bulk()
		} else {
			o.Payload = wire.Encode(m)
		}
		sent.Add(uint64(len(o.Payload) + len(o.Tail)))
		out[i] = o
	}
	return out
}

// localDone records that the local write of e finished. Under protocol A
// the write is complete for the application: its epoch closes before the
// next write (anything submitted later may depend on it).
func (t *tlog) localDone(e *tlEntry) {
	t.mu.Lock()
	e.local = true
	if e.net && !e.remote {
		t.md.EndWrite(e.span)
	}
	t.mu.Unlock()
}

// completed records that e was completed to the application: its epoch is
// closed before the next write, and the barrier goes out soon even if no
// write follows.
func (t *tlog) completed(e *tlEntry) {
	t.mu.Lock()
	if !t.lost && e.epoch == t.open().num {
		t.closing = true
	}
	t.mu.Unlock()
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// barrierNow closes the open epoch (with force even when empty) and sends
// its barrier; it returns a channel closed when every write logged so far
// is barrier-acked (barriers are acked in order) or the session ends, nil
// if nothing is waiting for an ack.
//
// With flush (an NBD FLUSH, a demotion) the barrier carries BarrierFlush:
// the peer makes everything up to it durable before it applies a later
// write. If the open epoch is empty but earlier ones are not yet acked, an
// empty epoch is closed to carry it.
func (t *tlog) barrierNow(force, flush bool) <-chan struct{} {
	t.send.Lock()
	defer t.send.Unlock()
	t.mu.Lock()
	if t.lost {
		t.mu.Unlock()
		return nil
	}
	b, ep, ok := t.closeEpoch(force || flush && len(t.epochs) >= 2, flush)
	if !ok {
		// Nothing open: wait for the newest closed epoch, if any (with
		// flush there is none, or an empty epoch was closed above).
		var done <-chan struct{}
		if n := len(t.epochs); n >= 2 {
			done = t.epochs[n-2].done
		}
		t.mu.Unlock()
		return done
	}
	t.mu.Unlock()
	t.sendMsg(b)
	return ep.done
}

// barrierAck frees the writes of an acked epoch: they are on the peer's
// stable storage. The ack must be for the oldest closed epoch, with its
// number of writes.
func (t *tlog) barrierAck(a wire.BarrierAck) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lost {
		return nil
	}
	ep := t.epochs[0]
	switch {
	case a.Epoch < ep.num:
		return fmt.Errorf("%w: BarrierAck for epoch %d, acked already", transport.ErrProtocol, a.Epoch)
	case a.Epoch == ep.num && !ep.closed:
		return fmt.Errorf("%w: BarrierAck for epoch %d, whose barrier was not sent", transport.ErrProtocol, a.Epoch)
	case a.Epoch != ep.num || uint32(len(ep.entries)) != a.Writes:
		return fmt.Errorf("%w: BarrierAck for epoch %d with %d writes, expected epoch %d with %d",
			transport.ErrProtocol, a.Epoch, a.Writes, ep.num, len(ep.entries))
	}
	// Checked before anything changes: a refused ack leaves the log whole
	// for lose() to mark.
	for _, e := range ep.entries {
		if e.acked == nil {
			continue
		}
		select {
		case <-e.acked:
		default:
			return fmt.Errorf("%w: BarrierAck for epoch %d before the WriteAck of write %d", transport.ErrProtocol, a.Epoch, e.seq)
		}
	}
	t.epochs = t.epochs[1:]
	for _, e := range ep.entries {
		if e.acked != nil {
			delete(t.bySeq, e.seq)
			if e.ackFailed && !e.remote {
				t.md.MarkOutOfSync(e.off, e.n)
			}
		}
		e.net = true
		t.pending -= e.n
		if e.local && !e.remote {
			t.md.EndWrite(e.span)
		}
	}
	close(ep.done)
	return nil
}

// writeAck records a protocol C write ack.
func (t *tlog) writeAck(a wire.WriteAck) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lost {
		return nil
	}
	e, ok := t.bySeq[a.Seq]
	if !ok {
		return fmt.Errorf("%w: write ack for unknown write %d", transport.ErrProtocol, a.Seq)
	}
	select {
	case <-e.acked:
		return fmt.Errorf("%w: second write ack for write %d", transport.ErrProtocol, a.Seq)
	default:
	}
	e.ackFailed = a.Status != wire.AckOK
	close(e.acked)
	return nil
}

// lose ends the log with its session: every write not barrier-acked is
// marked out of sync (before its activity-log extents are released), and
// everyone waiting is woken. It returns how many bytes were marked.
func (t *tlog) lose() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lost {
		return 0
	}
	t.lost = true
	var marked int64
	for _, ep := range t.epochs {
		for _, e := range ep.entries {
			if !e.remote {
				t.md.MarkOutOfSync(e.off, e.n)
				marked += e.n
			}
			e.net = true
			if e.local && !e.remote {
				t.md.EndWrite(e.span)
			}
			if e.acked != nil {
				select {
				case <-e.acked:
				default:
					e.unacked = true
					close(e.acked)
				}
			}
		}
		close(ep.done)
	}
	t.epochs, t.bySeq, t.pending = nil, nil, 0
	return marked
}

// inFlight returns the bytes sent and not yet barrier-acked.
func (t *tlog) inFlight() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending
}

// backlog returns the bytes sent and not yet barrier-acked and how long
// the oldest of those writes has waited at now (0 when there is none).
func (t *tlog) backlog(now time.Time) (int64, time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, ep := range t.epochs {
		if len(ep.entries) > 0 {
			return t.pending, now.Sub(ep.born)
		}
	}
	return t.pending, 0
}

// entriesInFlight returns the writes sent and not yet barrier-acked.
func (t *tlog) entriesInFlight() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var n int64
	for _, ep := range t.epochs {
		n += int64(len(ep.entries))
	}
	return n
}

// goRemote makes every later write a remote one (the Primary's disk is
// detached); call once no write of the local disk is in the log.
func (t *tlog) goRemote() {
	t.mu.Lock()
	t.remote = true
	t.mu.Unlock()
}

// isLost reports whether the session ended.
func (t *tlog) isLost() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lost
}
