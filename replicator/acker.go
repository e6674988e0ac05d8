package replicator

import (
	"sync"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// acker holds the acks of the peer's writes and barriers until the ack
// sender writes them to the control stream, in the order they were
// queued: the data loop never waits for a socket write, and the acks
// queued while one write is under way leave together in the next (DRBD's
// asender). One queue keeps a barrier's ack behind the acks of its
// epoch's writes.
type acker struct {
	mu   sync.Mutex
	q    []wire.Message
	kick chan struct{}
}

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

// take returns everything queued and empties the queue, which goes on in
// spare's array.
func (a *acker) take(spare []wire.Message) []wire.Message {
	a.mu.Lock()
	defer a.mu.Unlock()
	batch := a.q
	a.q = spare[:0]
	return batch
}

// ackSender writes the queued acks until the session ends.
func (p *peer) ackSender() {
	defer p.wg.Done()
	var spare []wire.Message
	for p.await(p.acks.kick) {
		// batch and spare are never the same array: the queue fills the
		// one while the other is sent.
		batch := p.acks.take(spare)
		if len(batch) > 0 {
			if err := p.s.SendMany(transport.Control, encodeAll(batch, &p.r.netSent)); err != nil {
				return // the session ended; the peer marks what it did not get acked
			}
			clear(batch)
		}
		spare = batch[:0]
	}
}
