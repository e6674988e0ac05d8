package replicator

import (
	"fmt"
	"slices"
	"testing"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
)

// The Secondary's epochs: each write that arrives is counted in the
// arriving epoch (as receiveWrite does), barriers close epochs
// (receiveBarrier), and writes finish in any order (written); an epoch is
// queued for its barrier ack only once its writes and those of every
// epoch before it are written, in epoch order, and only an epoch closed by
// a FLUSH asks the flusher to skip its gap.
func TestPeer_EpochsRetireInOrder(t *testing.T) {
	tests := []struct {
		name string
		// steps: "w" a write arrives in the arriving epoch, "b" its
		// barrier, "d<e>.<i>" write i (from 0) of epoch e is written.
		steps []string
		// acks: the epochs in the ack queue after each step.
		acks [][]uint64
		// alive: epochsAlive after the last step.
		alive int64
	}{
		{
			name:  "in order",
			steps: []string{"w", "b", "d1.0", "w", "b", "d2.0"},
			acks:  [][]uint64{nil, nil, {1}, {1}, {1}, {1, 2}},
			alive: 3,
		},
		{
			name:  "a later epoch written first waits for the earlier one",
			steps: []string{"w", "w", "b", "w", "b", "d2.0", "d1.1", "d1.0"},
			acks:  [][]uint64{nil, nil, nil, nil, nil, nil, nil, {1, 2}},
			alive: 3,
		},
		{
			name:  "the barrier arrives after the writes are written",
			steps: []string{"w", "d1.0", "b"},
			acks:  [][]uint64{nil, nil, {1}},
			alive: 2,
		},
		{
			name:  "an empty epoch waits behind an unwritten one",
			steps: []string{"w", "b", "b", "d1.0"},
			acks:  [][]uint64{nil, nil, nil, {1, 2}},
			alive: 3,
		},
		{
			name:  "the arriving epoch's writes do not retire it",
			steps: []string{"w", "b", "w", "d2.0", "d1.0"},
			acks:  [][]uint64{nil, nil, nil, nil, {1}},
			alive: 2,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			first := &recvEpoch{num: 1}
			p := &peer{epoch: first, epochs: []*recvEpoch{first}, ackKick: make(chan struct{}, 1), ackFlush: make(chan struct{}, 1)}
			byNum := map[uint64]*recvEpoch{1: first}
			for i, step := range tc.steps {
				switch {
				case step == "w":
					p.writing.Add(1)
					p.epoch.writes++
					p.ackMu.Lock()
					p.epoch.left++
					p.ackMu.Unlock()
				case step == "b":
					ep := p.epoch
					if err := p.receiveBarrier(wire.Barrier{Epoch: ep.num, Writes: ep.writes}); err != nil {
						t.Fatal(err)
					}
					byNum[p.epoch.num] = p.epoch
				default:
					var e uint64
					var w int
					if _, err := fmt.Sscanf(step, "d%d.%d", &e, &w); err != nil {
						t.Fatalf("step %q: %v", step, err)
					}
					p.written(byNum[e])
				}
				var got []uint64
				for _, a := range p.ackQueue {
					got = append(got, a.Epoch)
				}
				if !slices.Equal(got, tc.acks[i]) {
					t.Fatalf("after step %d (%s): ack queue %v, want %v", i, step, got, tc.acks[i])
				}
				select {
				case <-p.ackFlush:
					t.Fatalf("after step %d (%s): the flusher was asked to skip its gap without a FLUSH", i, step)
				default:
				}
			}
			if got := p.epochsAlive(); got != tc.alive {
				t.Errorf("epochsAlive %d, want %d", got, tc.alive)
			}
			for _, a := range p.ackQueue {
				if a.Writes != byNum[a.Epoch].writes {
					t.Errorf("epoch %d acked with %d writes, %d arrived", a.Epoch, a.Writes, byNum[a.Epoch].writes)
				}
			}
		})
	}
}

// An epoch closed by a FLUSH asks the flusher to flush at once when it is
// written, not before; epochs after it do not.
func TestPeer_UrgentEpoch(t *testing.T) {
	first := &recvEpoch{num: 1}
	p := &peer{epoch: first, epochs: []*recvEpoch{first}}
	p.ackMu.Lock()
	first.writes, first.left = 1, 1
	first.closed = true
	p.urgent = 1
	second := &recvEpoch{num: 2, closed: true}
	p.epochs = append(p.epochs, second)
	if retired, urgent := p.retireLocked(); retired || urgent {
		t.Fatalf("retired %v urgent %v before the FLUSH's epoch was written", retired, urgent)
	}
	first.left = 0
	if retired, urgent := p.retireLocked(); !retired || !urgent {
		t.Fatalf("retired %v urgent %v once it was written", retired, urgent)
	}
	third := &recvEpoch{num: 3, closed: true}
	p.epochs = append(p.epochs, third)
	if retired, urgent := p.retireLocked(); !retired || urgent {
		t.Fatalf("a later epoch: retired %v urgent %v, want true false", retired, urgent)
	}
	p.ackMu.Unlock()
	if len(p.epochs) != 0 || len(p.ackQueue) != 3 {
		t.Fatalf("%d epochs left, %d queued; want 0, 3", len(p.epochs), len(p.ackQueue))
	}
}
