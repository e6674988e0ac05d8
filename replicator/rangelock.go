package replicator

import "sync"

// rangeLock serialises changes to overlapping byte ranges: an application
// write and a resync read of the same blocks, two overlapping writes, or
// on the receiving side the writes and resync data of one stream, which
// lock in the order they arrive. Non-overlapping ranges never wait.
type rangeLock struct {
	mu   sync.Mutex
	cond sync.Cond
	held map[uint64][2]int64 // by ticket: [off, end)
	next uint64
}

func newRangeLock() *rangeLock {
	l := &rangeLock{held: map[uint64][2]int64{}}
	l.cond.L = &l.mu
	return l
}

// lock waits until no held range overlaps [off, off+n), takes it, and
// returns its release.
func (l *rangeLock) lock(off, n int64) (unlock func()) {
	end := off + n
	l.mu.Lock()
	for l.overlaps(off, end) {
		l.cond.Wait()
	}
	t := l.next
	l.next++
	l.held[t] = [2]int64{off, end}
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(l.held, t)
		l.cond.Broadcast()
		l.mu.Unlock()
	}
}

func (l *rangeLock) overlaps(off, end int64) bool {
	for _, h := range l.held {
		if off < h[1] && h[0] < end {
			return true
		}
	}
	return false
}
