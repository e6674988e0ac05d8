package replicator

import (
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
	first := a.take(nil)
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
	second := a.take(spare)
	if len(second) != 1 || second[0] != (wire.WriteAck{Seq: 3}) || &second[0] == &first[0] {
		t.Fatalf("second batch %v (shares the first's array: %v)", second, &second[0] == &first[0])
	}
	a.queue(wire.WriteAck{Seq: 4})
	if third := a.take(first[:0]); len(third) != 1 || &third[0] != &spare[:1][0] {
		t.Fatalf("third batch %v is not in the spare array given before", third)
	}
	if rest := a.take(nil); len(rest) != 0 {
		t.Fatalf("left over: %v", rest)
	}
}
