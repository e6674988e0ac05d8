package replicator

import (
	"strings"
	"testing"
	"time"
)

// TestWatchDisk: disk-timeout's watchdog fails (and then detaches) a
// disk with a request in flight and no completion for the timeout, and
// leaves alone a disk that is idle or completes requests, however long
// each one is in flight.
func TestWatchDisk(t *testing.T) {
	const timeout = 200 * time.Millisecond
	tests := []struct {
		name string
		// load runs for the observation window against r's counters.
		load     func(r *Resource, window time.Duration)
		detached bool
	}{
		{"a request stuck", func(r *Resource, _ time.Duration) { r.localBegin() }, true},
		{"idle", func(*Resource, time.Duration) {}, false},
		{"slow but completing", func(r *Resource, window time.Duration) {
			r.localBegin() // always one in flight: each completes within the timeout
			for end := time.Now().Add(window); time.Now().Before(end); {
				time.Sleep(timeout / 4)
				r.localBegin()
				r.localEnd()
			}
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, log := adjustResource(t, newDisk(t), parseRes(t, adjustSrc(newDisk(t), "", "disk-timeout 2;", "", 7001)))
			start := time.Now()
			window := 5 * timeout
			tc.load(r, window)
			deadline := start.Add(window + 10*time.Second) // a loaded machine's margin for the detach
			for {
				s := r.Snapshot()
				if tc.detached && s.Disk == Diskless {
					if took := time.Since(start); took < timeout {
						t.Fatalf("detached after %v, before the timeout", took)
					}
					if !strings.Contains(log.String(), "Local IO failed in disk-timeout. Detaching...") ||
						!strings.Contains(log.String(), "disk( Inconsistent -> Failed )") {
						t.Fatalf("log:\n%s", log)
					}
					return
				}
				if !tc.detached && time.Since(start) > window {
					if s.Disk != Inconsistent || strings.Contains(log.String(), "Local IO failed") {
						t.Fatalf("disk %s after %v without a stuck request; log:\n%s", s.Disk, window, log)
					}
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("disk %s after %v; log:\n%s", s.Disk, time.Since(start), log)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
