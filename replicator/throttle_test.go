package replicator

import (
	"testing"
	"time"
)

func TestRSThrottle(t *testing.T) {
	t0 := time.Unix(1000, 0)
	const mib = 1 << 20
	type look struct {
		at   time.Duration // since the start
		app  uint64        // application I/O counter
		done int64         // resync bytes done
		want bool
	}
	for _, tc := range []struct {
		name    string
		minRate int64
		looks   []look
	}{
		{"c-min-rate 0 never throttles", 0, []look{
			{time.Second, 100 * mib, 50 * mib, false},
			{2 * time.Second, 200 * mib, 100 * mib, false},
		}},
		{"no application I/O", 1 << 10, []look{
			{time.Second, 0, 50 * mib, false},
			{2 * time.Second, 32 << 10, 100 * mib, false}, // 32 KiB is not activity yet
		}},
		{"application I/O, resync above the rate", 4 * mib, []look{
			{time.Second, 33 << 10, 8 * mib, true},
			{1100 * time.Millisecond, 33 << 10, 8 * mib, false}, // no new application I/O since
			{1200 * time.Millisecond, 66<<10 + 1, 8 * mib, true},
		}},
		{"application I/O, resync at or below the rate", 4 * mib, []look{
			{time.Second, 1 * mib, 4 * mib, false},
			{2 * time.Second, 2 * mib, 8 * mib, false},
		}},
		{"under a second counts as one", 4 * mib, []look{
			{100 * time.Millisecond, 1 * mib, 4*mib + 1, true},
		}},
		{"the rate is measured from the older of two marks, taken every 3 s", 1 * mib, []look{
			{3 * time.Second, 1 * mib, 30 * mib, true},          // mark at 3 s; rate since 0: 10 MiB/s
			{6 * time.Second, 2 * mib, 30 * mib, false},         // marks 3 s and 6 s: nothing done since 3 s
			{6500 * time.Millisecond, 3 * mib, 33 * mib, false}, // since 3 s: 3 MiB in 3.5 s, below 1 MiB/s
			{7 * time.Second, 4 * mib, 35 * mib, true},          // since 3 s: 5 MiB in 4 s
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			th := newRSThrottle(tc.minRate, 0, t0)
			waits := uint64(0)
			for i, l := range tc.looks {
				got := th.slowDown(l.app, l.done, t0.Add(l.at))
				if got != l.want {
					t.Errorf("look %d (%v, app %d, done %d): slowDown %v, want %v", i, l.at, l.app, l.done, got, l.want)
				}
				if got {
					waits++
				}
			}
			if th.waits != waits {
				t.Errorf("waits %d, want %d", th.waits, waits)
			}
		})
	}
}
