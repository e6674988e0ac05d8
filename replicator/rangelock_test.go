package replicator

import (
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"
)

// Overlapping ranges wait for each other, touching and disjoint ones do
// not, and a release wakes exactly the lockers it unblocks.
func TestRangeLock_Overlap(t *testing.T) {
	for _, tc := range []struct {
		name    string
		held    [2]int64 // off, n
		want    [2]int64
		blocked bool
	}{
		{"same range", [2]int64{0, 4096}, [2]int64{0, 4096}, true},
		{"inside", [2]int64{0, 1 << 20}, [2]int64{8192, 4096}, true},
		{"straddling the end", [2]int64{0, 8192}, [2]int64{4096, 8192}, true},
		{"straddling the start", [2]int64{8192, 8192}, [2]int64{4096, 8192}, true},
		{"touching after", [2]int64{0, 4096}, [2]int64{4096, 4096}, false},
		{"touching before", [2]int64{4096, 4096}, [2]int64{0, 4096}, false},
		{"far", [2]int64{0, 4096}, [2]int64{1 << 30, 4096}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newRangeLock()
			other := l.lock(1<<40, 512) // an unrelated range stays held throughout
			release := l.lock(tc.held[0], tc.held[1])
			got := make(chan func())
			go func() { got <- l.lock(tc.want[0], tc.want[1]) }()
			select {
			case unlock := <-got:
				if tc.blocked {
					t.Fatal("an overlapping range was granted while held")
				}
				unlock()
				release()
			case <-time.After(50 * time.Millisecond):
				if !tc.blocked {
					t.Fatal("a range that does not overlap waited")
				}
				release()
				select {
				case unlock := <-got:
					unlock()
				case <-time.After(10 * time.Second):
					t.Fatal("the waiting range was not granted after the release")
				}
			}
			other()
			if len(l.held) != 0 || l.waiting != 0 {
				t.Fatalf("after every release: %d held, %d waiting", len(l.held), l.waiting)
			}
		})
	}
}

// Many lockers on random ranges: no two overlapping ranges are ever held
// at once, and every locker gets its range.
func TestRangeLock_Concurrent(t *testing.T) {
	l := newRangeLock()
	var mu sync.Mutex
	inside := map[int][2]int64{}
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 300 {
				off, n := int64(rng.IntN(64))*4096, int64(1+rng.IntN(8))*4096
				unlock := l.lock(off, n)
				mu.Lock()
				for o, r := range inside {
					if off < r[1] && r[0] < off+n {
						t.Errorf("locker %d holds [%d, %d) while locker %d holds [%d, %d)", g, off, off+n, o, r[0], r[1])
					}
				}
				inside[g] = [2]int64{off, off + n}
				mu.Unlock()
				runtime.Gosched() // hold it while others run
				mu.Lock()
				delete(inside, g)
				mu.Unlock()
				unlock()
			}
		}()
	}
	wg.Wait()
	if len(l.held) != 0 || l.waiting != 0 {
		t.Fatalf("after every release: %d held, %d waiting", len(l.held), l.waiting)
	}
}
