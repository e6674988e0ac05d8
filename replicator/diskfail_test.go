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
	// disk-timeout 10 (tenths of a second). The slow row completes a
	// request every tenth of it: a 0.9 s scheduling stall on a loaded
	// machine would be needed to fail it falsely.
	const timeout = time.Second
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
				time.Sleep(timeout / 10)
				r.localBegin()
				r.localEnd()
			}
			r.localEnd()
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, log := adjustResource(t, newDisk(t), parseRes(t, adjustSrc(newDisk(t), "", "disk-timeout 10;", "", 7001)))
			start := time.Now()
			window := 3 * timeout
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

// TestPair_HandshakeWaitsForParams: a peer whose transport accepted the
// session but whose node sends nothing (its disk hangs, say) does not hold
// the Primary's writes back; they are marked meanwhile. With the I/O
// freeze at the handshake's start, the write waited for the handshake's
// 30 s limit.
func TestPair_HandshakeWaitsForParams(t *testing.T) {
	p := newPair(t, "net { protocol C; }")
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	dialFake(t, p) // beta's transport accepts the session; no node answers on it
	p.wait(p.alpha, "WFReportParams", func(s Snapshot) bool { return s.Conn == WFReportParams })
	before := p.alpha.Snapshot().OutOfSyncBytes
	done := make(chan error, 1)
	go func() { done <- p.alpha.WriteAt(make([]byte, 4096), 1<<20, false) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a write waited for a peer that sent no parameters")
	}
	if got := p.alpha.Snapshot().OutOfSyncBytes - before; got != 4096 {
		t.Fatalf("the write marked %d bytes, want 4096", got)
	}
}
