package bitmap

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cespare/xxhash/v2"
)

// resum recomputes a page's checksum after a test changed it.
func resum(p []byte) []byte {
	binary.BigEndian.PutUint64(p[offPageSum:], xxhash.Sum64(p[:offPageSum]))
	return p
}

func commit(t *testing.T, a *ActivityLog) *Transaction {
	t.Helper()
	tx := a.Prepare()
	if tx == nil {
		t.Fatal("no transaction prepared")
	}
	a.Committed(tx)
	return tx
}

func TestActivityLog_Basics(t *testing.T) {
	a := NewActivityLog(3, 10)
	if st := a.Acquire(5, 5); st != Wait {
		t.Fatalf("first acquire: %v, want Wait", st)
	}
	if st := a.Acquire(5, 6); st != Wait {
		t.Fatalf("second acquire: %v", st)
	}
	// Two writers waiting for extents 5 and 6 share one transaction.
	tx := commit(t, a)
	if tx.Seq != 11 || !slices.Equal(tx.Add, []Extent{5, 6}) || !slices.Equal(tx.Active, []Extent{5, 6}) || len(tx.Evict) != 0 {
		t.Fatalf("tx %+v", tx)
	}
	if !a.Ready(5, 6) || a.Prepare() != nil {
		t.Fatal("not ready after commit, or a second transaction")
	}
	// Logged extents need no transaction.
	if st := a.Acquire(6, 6); st != Ready {
		t.Fatalf("acquire of a logged extent: %v", st)
	}
	a.Release(5, 5)
	a.Release(5, 6)
	a.Release(6, 6)
	// 5 and 6 are idle; 5 was released first, so it is evicted first.
	a.Acquire(7, 8)
	tx = commit(t, a)
	if !slices.Equal(tx.Evict, []Extent{5}) || !slices.Equal(tx.Active, []Extent{6, 7, 8}) {
		t.Fatalf("eviction tx %+v", tx)
	}
	if got := tx.EvictPages(); !slices.Equal(got, []int{0}) {
		t.Errorf("evict pages %v", got)
	}
	// Everything referenced: no room for a fourth extent, nothing taken.
	a.Acquire(6, 6)
	if st := a.Acquire(9, 9); st != Full || a.Len() != 3 {
		t.Fatalf("acquire with a full log: %v, %d entries", st, a.Len())
	}
	a.Release(7, 8)
	if st := a.Acquire(9, 9); st != Wait {
		t.Fatalf("after release: %v", st)
	}
	tx = commit(t, a)
	if !slices.Equal(tx.Evict, []Extent{7}) {
		t.Errorf("evicted %v, want the least recently used idle extent 7", tx.Evict)
	}
	if txs, ev := a.Stats(); txs != 3 || ev != 2 {
		t.Errorf("stats %d %d", txs, ev)
	}
	a.Release(6, 6)
	a.Release(9, 9)
	a.Reset()
	if a.Len() != 0 || len(a.Active()) != 0 {
		t.Error("reset left entries")
	}
}

func TestActivityLog_AllOrNothing(t *testing.T) {
	a := NewActivityLog(MinALExtents, 0)
	if st := a.Acquire(0, 5); st != Wait {
		t.Fatal(st)
	}
	commit(t, a)
	// Extents 6..9 need four slots; only one is free and none is idle.
	if st := a.Acquire(6, 9); st != Full || a.Len() != 6 {
		t.Fatalf("acquire: %v, entries %d", st, a.Len())
	}
	a.Release(0, 5)
	if st := a.Acquire(6, 9); st != Wait {
		t.Fatal(st)
	}
	tx := commit(t, a)
	if len(tx.Evict) != 3 || len(tx.Active) != MinALExtents {
		t.Fatalf("tx %+v", tx)
	}
}

func TestActivityLog_Pages(t *testing.T) {
	tests := []struct {
		e    Extent
		page int
	}{{0, 0}, {30, 0}, {31, 1}, {62, 2}, {1 << 20, (1 << 20) / 31}}
	for _, tc := range tests {
		if tc.e.Page() != tc.page {
			t.Errorf("extent %d on page %d, want %d", tc.e, tc.e.Page(), tc.page)
		}
		first, n := tc.e.Blocks()
		if f, l := PagesOfBlocks(first, n); f != tc.page || l != tc.page {
			t.Errorf("extent %d blocks span pages %d-%d", tc.e, f, l)
		}
	}
	if f, l := ExtentsOf(ExtentSize-1, 2); f != 0 || l != 1 {
		t.Errorf("ExtentsOf %d %d", f, l)
	}
}

// TestActivityLog_Random drives random writers against a model and checks
// the invariants after every step: the log never exceeds its capacity, an
// extent with references is never evicted, a writer told Ready is covered by
// the last committed active set, transactions are numbered in order, and
// writers that all wait can always be served by a transaction.
// A writer that pins idle extents while another writer's extent is
// pending must not push the referenced extents over the capacity: the
// pending extent would wait for room only its own waiters could free.
func TestActivityLog_NoOvercommitByIdleExtents(t *testing.T) {
	a := NewActivityLog(2, 0)
	a.Acquire(4, 5)
	a.Committed(a.Prepare())
	a.Release(4, 5) // 4 and 5 are active and idle
	if st := a.Acquire(2, 3); st != Wait {
		t.Fatalf("first writer: %v, want Wait", st)
	}
	if st := a.Acquire(3, 4); st != Full {
		t.Fatalf("second writer pinning idle extent 4: %v, want Full", st)
	}
	tx := a.Prepare()
	if tx == nil || !slices.Equal(tx.Add, []Extent{2, 3}) {
		t.Fatalf("transaction %+v, want 2 and 3 added", tx)
	}
	a.Committed(tx)
	if !a.Ready(2, 3) {
		t.Fatal("first writer not ready after its transaction")
	}
}

func TestActivityLog_Random(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	const capacity = 16
	a := NewActivityLog(capacity, 100)
	type write struct{ first, last Extent }
	var held []write
	var durable []Extent // Active of the last committed transaction
	var lastSeq uint64 = 100
	for step := range 20000 {
		switch op := r.IntN(10); {
		case op < 5:
			first := Extent(r.IntN(40))
			w := write{first, first + Extent(r.IntN(3))}
			switch a.Acquire(w.first, w.last) {
			case Full:
				continue
			default:
				held = append(held, w)
			}
		case op < 8 && len(held) > 0:
			// Release a write that is ready (a waiting one cannot
			// have been written yet).
			i := r.IntN(len(held))
			if !a.Ready(held[i].first, held[i].last) {
				continue
			}
			a.Release(held[i].first, held[i].last)
			held = slices.Delete(held, i, i+1)
		default:
			tx := a.Prepare()
			if tx == nil {
				// Progress: when every writer waits, a transaction
				// must be possible (nothing else could free room).
				if len(held) > 0 && !slices.ContainsFunc(held, func(w write) bool { return a.Ready(w.first, w.last) }) {
					t.Fatalf("step %d: every writer waits and no transaction can be prepared (%d writers)", step, len(held))
				}
				continue
			}
			if tx.Seq != lastSeq+1 {
				t.Fatalf("step %d: tx seq %d after %d", step, tx.Seq, lastSeq)
			}
			lastSeq = tx.Seq
			if len(tx.Active) > capacity {
				t.Fatalf("step %d: %d active extents", step, len(tx.Active))
			}
			for _, e := range tx.Evict {
				for _, w := range held {
					if e >= w.first && e <= w.last {
						t.Fatalf("step %d: evicted extent %d that a write holds", step, e)
					}
				}
			}
			a.Committed(tx)
			durable = tx.Active
		}
		for _, w := range held {
			if !a.Ready(w.first, w.last) {
				continue
			}
			for e := w.first; e <= w.last; e++ {
				if _, ok := slices.BinarySearch(durable, e); !ok {
					t.Fatalf("step %d: extent %d reported ready but not in the durable set %v", step, e, durable)
				}
			}
		}
	}
	if txs, _ := a.Stats(); txs < 100 {
		t.Errorf("only %d transactions", txs)
	}
}
