package replicator

import (
	"sync"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// acker holds the acks of the peer's writes and barriers until they are
// written to the control stream, in the order they were queued: the acks
// queued while one write is under way leave together in the next (DRBD's
// asender). One queue keeps a barrier's ack behind the acks of its
// epoch's writes, and one send at a time (sendMu, held from taking a
// batch until it is written) keeps the batches in order.
//
// The ack sender writes whatever is queued; the data loop writes the
// queue itself once ackBurst acks wait and no batch is being written
// (sendQueued), rather than leave them until the ack sender gets a
// processor: on a busy machine that is often only after the whole burst
// of writes they answer, and the Primary's writers, waiting for them
// under protocol C, would wait for the slowest of the burst.
type acker struct {
	mu   sync.Mutex
	q    []wire.Message
	kick chan struct{}

	sendMu sync.Mutex
	spare  []wire.Message // the array the next batch taken leaves to the queue (under sendMu)
}

// ackBurst is how many queued acks the data loop sends itself (measured,
// 4 KiB protocol C at iodepth 32: +5 to +11 % IOPS; 4 and 16 did less).
const ackBurst = 8

func newAcker() *acker { return &acker{kick: make(chan struct{}, 1)} }

// queue appends acks and wakes the sender.
func (a *acker) queue(acks ...wire.Message) {
	a.mu.Lock()
	a.q = append(a.q, acks...)
	a.mu.Unlock()
	select {
	case a.kick <- struct{}{}:
	default: // the sender is awake and takes these with the others
	}
}

// take returns everything queued if that is at least least acks, and
// empties the queue, which goes on in spare's array; otherwise nil.
func (a *acker) take(least int, spare []wire.Message) []wire.Message {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.q) < least || len(a.q) == 0 {
		return nil
	}
	batch := a.q
	a.q = spare[:0]
	return batch
}

// sendQueued sends the queued acks with send if at least least are queued;
// with wait false, not if another batch is being sent (that sender's
// next round takes them). A batch is sent whole before the next is taken.
func (a *acker) sendQueued(least int, wait bool, send func([]wire.Message) error) error {
	if wait {
		a.sendMu.Lock()
	} else if !a.sendMu.TryLock() {
		return nil
	}
	defer a.sendMu.Unlock()
	// batch and spare are never the same array: the queue fills the one
	// while the other is sent.
	batch := a.take(least, a.spare)
	if batch == nil {
		return nil
	}
	err := send(batch)
	clear(batch)
	a.spare = batch[:0]
	return err
}

// sendAcks writes acks to the control stream.
func (p *peer) sendAcks(acks []wire.Message) error {
	return p.s.SendMany(transport.Control, encodeAll(acks, &p.r.netSent))
}

// ackSender writes the queued acks until the session ends.
func (p *peer) ackSender() {
	defer p.wg.Done()
	for p.await(p.acks.kick) {
		if err := p.acks.sendQueued(1, true, p.sendAcks); err != nil {
			return // the session ended; the peer marks what it did not get acked
		}
	}
}
