package replicator

import "sync"

// rangeLock serialises changes to overlapping byte ranges: an application
// write and a resync read of the same blocks, two overlapping writes, or
// on the receiving side the writes and resync data of one stream, which
// lock in the order they arrive. Non-overlapping ranges never wait.
//
// The held ranges are a short unordered slice (at most the requests in
// flight): scanning it costs less than a map's iteration on every write.
type rangeLock struct {
	mu      sync.Mutex
	cond    sync.Cond
	held    []heldRange
	next    uint64
	waiting int // lockers asleep in cond.Wait
}

// heldRange is one locked range [off, end), known by its ticket.
type heldRange struct {
	ticket   uint64
	off, end int64
}

func newRangeLock() *rangeLock {
	l := &rangeLock{}
	l.cond.L = &l.mu
	return l
}

// lock waits until no held range overlaps [off, off+n), takes it, and
// returns its release.
func (l *rangeLock) lock(off, n int64) (unlock func()) {
	end := off + n
	l.mu.Lock()
	for l.overlaps(off, end) {
		l.waiting++
		l.cond.Wait()
		l.waiting--
	}
	t := l.next
	l.next++
	l.held = append(l.held, heldRange{ticket: t, off: off, end: end})
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		for i, h := range l.held {
			if h.ticket == t {
				last := len(l.held) - 1
				l.held[i] = l.held[last]
				l.held = l.held[:last]
				break
			}
		}
		if l.waiting > 0 {
			l.cond.Broadcast()
		}
		l.mu.Unlock()
	}
}

func (l *rangeLock) overlaps(off, end int64) bool {
	for _, h := range l.held {
		if off < h.end && h.off < end {
			return true
		}
	}
	return false
}
