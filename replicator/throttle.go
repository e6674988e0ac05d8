package replicator

import "time"

// rsThrottle is DRBD's c-min-rate throttle (drbd_rs_c_min_rate_throttle,
// reference/drbd.md §6.4): while the disk shows application I/O — more
// than 32 KiB of it (DRBD's 64 sectors) since the throttle last looked —
// a resync request waits whenever the resync's recent rate, over the last
// 3 to 6 s, is above c-min-rate. c-min-rate is a threshold, not a floor:
// under steady application I/O the resync settles near it; without
// application I/O it runs at the full rate; 0 never throttles.
type rsThrottle struct {
	minRate float64 // bytes/s
	lastApp uint64  // the application I/O counter at the last look
	marks   [2]rsMark
	waits   uint64 // requests that waited (logged at the end)
}

// rsMark is a progress mark: the resync's bytes done at a time. A new
// mark is taken every throttleMarkStep; the rate is measured from the
// older of the two kept, as DRBD's marks every 3 s.
type rsMark struct {
	at   time.Time
	done int64
}

const (
	throttleMarkStep  = 3 * time.Second
	throttleAppEvents = 32 << 10               // bytes of application I/O that count as activity
	throttleWait      = 100 * time.Millisecond // how long a throttled request waits (DRBD: HZ/10)
)

func newRSThrottle(minRate int64, app uint64, now time.Time) *rsThrottle {
	m := rsMark{at: now}
	return &rsThrottle{minRate: float64(minRate), lastApp: app, marks: [2]rsMark{m, m}}
}

// slowDown reports whether the next resync request should wait, given the
// application I/O counter and the resync's bytes done so far.
func (t *rsThrottle) slowDown(app uint64, done int64, now time.Time) bool {
	if now.Sub(t.marks[1].at) >= throttleMarkStep {
		t.marks[0], t.marks[1] = t.marks[1], rsMark{at: now, done: done}
	}
	if t.minRate == 0 || app-t.lastApp <= throttleAppEvents {
		return false
	}
	t.lastApp = app
	dt := max(now.Sub(t.marks[0].at).Seconds(), 1) // DRBD: whole seconds, at least one
	if float64(done-t.marks[0].done)/dt <= t.minRate {
		return false
	}
	t.waits++
	return true
}
