package nbd

import "sync"

// budget bounds how many requests and how many payload bytes are in flight.
// A request larger than the whole byte budget is charged the whole budget, so
// it can always run once nothing else holds any. The zero value is unusable;
// call init.
type budget struct {
	mu      sync.Mutex
	cond    sync.Cond
	n, maxN int
	b, maxB int64
	closed  bool
	waiting int
}

func (l *budget) init(maxN int, maxB int64) {
	l.maxN, l.maxB = maxN, maxB
	l.cond.L = &l.mu
}

func (l *budget) charge(bytes int64) int64 { return min(bytes, l.maxB) }

// acquire blocks until one more request of the given size fits, and reports
// false if the budget was closed meanwhile.
func (l *budget) acquire(bytes int64) bool {
	_, ok := l.acquireAs(func() int64 { return bytes })
	return ok
}

// acquireAs is acquire for a request whose size need says, asked again at
// every wake-up (every release of this budget): what a request needs of it
// may shrink meanwhile. It returns the size taken (to release), or false if
// the budget was closed.
func (l *budget) acquireAs(need func() int64) (int64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed {
		bytes := need()
		if l.n < l.maxN && l.b+l.charge(bytes) <= l.maxB {
			l.n++
			l.b += l.charge(bytes)
			return bytes, true
		}
		l.waiting++
		l.cond.Wait()
		l.waiting--
	}
	return 0, false
}

// release returns what acquire took.
func (l *budget) release(bytes int64) {
	bytes = l.charge(bytes)
	l.mu.Lock()
	l.n--
	l.b -= bytes
	if l.waiting > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}

// close wakes every waiter; later acquires fail.
func (l *budget) close() {
	l.mu.Lock()
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
}

// inUse reports the requests and bytes held.
func (l *budget) inUse() (int, int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n, l.b
}
