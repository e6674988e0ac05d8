package replicator

import (
	"errors"
	"sync"
	"testing"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
)

func TestAcker_Order(t *testing.T) {
	a := newAcker()
	a.queue(wire.WriteAck{Seq: 1})
	a.queue(wire.WriteAck{Seq: 2}, wire.BarrierAck{Epoch: 1, Writes: 2})
	if len(a.kick) != 1 {
		t.Fatalf("%d kicks pending, want 1 (wake-ups coalesce)", len(a.kick))
	}
	first := a.take(1, nil)
	want := []wire.Message{wire.WriteAck{Seq: 1}, wire.WriteAck{Seq: 2}, wire.BarrierAck{Epoch: 1, Writes: 2}}
	if len(first) != len(want) {
		t.Fatalf("took %v, want %v", first, want)
	}
	for i := range want {
		if first[i] != want[i] {
			t.Fatalf("ack %d: %v, want %v", i, first[i], want[i])
		}
	}
	// The next batch fills another array: the one taken is being sent.
	spare := make([]wire.Message, 0, 8)
	a.queue(wire.WriteAck{Seq: 3})
	second := a.take(1, spare)
	if len(second) != 1 || second[0] != (wire.WriteAck{Seq: 3}) || &second[0] == &first[0] {
		t.Fatalf("second batch %v (shares the first's array: %v)", second, &second[0] == &first[0])
	}
	a.queue(wire.WriteAck{Seq: 4})
	if third := a.take(1, first[:0]); len(third) != 1 || &third[0] != &spare[:1][0] {
		t.Fatalf("third batch %v is not in the spare array given before", third)
	}
	if rest := a.take(1, nil); len(rest) != 0 {
		t.Fatalf("left over: %v", rest)
	}
}

// sendQueued sends at least min acks or none; without wait it leaves the
// queue to a send under way; a failed send's error is returned.
func TestAcker_SendQueued(t *testing.T) {
	a := newAcker()
	var sent [][]wire.Message
	rec := func(b []wire.Message) error {
		sent = append(sent, append([]wire.Message(nil), b...))
		return nil
	}
	for i := range ackBurst - 1 {
		a.queue(wire.WriteAck{Seq: uint64(i + 1)})
	}
	if err := a.sendQueued(ackBurst, false, rec); err != nil || len(sent) != 0 {
		t.Fatalf("sent %v (err %v) with %d queued, below the %d asked for", sent, err, ackBurst-1, ackBurst)
	}
	a.queue(wire.WriteAck{Seq: ackBurst})
	a.sendMu.Lock() // a batch being sent
	if err := a.sendQueued(ackBurst, false, rec); err != nil || len(sent) != 0 {
		t.Fatalf("sent %v (err %v) while another batch was being sent", sent, err)
	}
	a.sendMu.Unlock()
	if err := a.sendQueued(ackBurst, false, rec); err != nil || len(sent) != 1 || len(sent[0]) != ackBurst {
		t.Fatalf("sent %v (err %v), want one batch of %d", sent, err, ackBurst)
	}
	boom := errors.New("boom")
	a.queue(wire.WriteAck{Seq: 99})
	if err := a.sendQueued(1, true, func([]wire.Message) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("a failed send returned %v", err)
	}
	if err := a.sendQueued(1, true, rec); err != nil || len(sent) != 1 {
		t.Fatalf("the failed batch was sent again: %v", sent[1:])
	}
}

// The ack sender and the data loop sending at once put every ack on the
// wire once, in the order queued (a barrier's ack never overtakes the acks
// of its epoch's writes).
func TestAcker_ConcurrentSendersKeepOrder(t *testing.T) {
	const n = 20000
	a := newAcker()
	var mu sync.Mutex
	var got []uint64
	rec := func(b []wire.Message) error {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range b {
			got = append(got, m.(wire.WriteAck).Seq)
		}
		return nil
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // the ack sender
		defer wg.Done()
		for {
			select {
			case <-a.kick:
				a.sendQueued(1, true, rec)
			case <-done:
				a.sendQueued(1, true, rec)
				return
			}
		}
	}()
	go func() { // the data loop: queues, and sends bursts itself
		defer wg.Done()
		for i := range n {
			a.queue(wire.WriteAck{Seq: uint64(i + 1)})
			a.sendQueued(ackBurst, false, rec)
		}
		close(done)
	}()
	wg.Wait()
	if len(got) != n {
		t.Fatalf("%d acks sent, want %d", len(got), n)
	}
	for i, seq := range got {
		if seq != uint64(i+1) {
			t.Fatalf("ack %d on the wire is seq %d: out of order", i, seq)
		}
	}
}
