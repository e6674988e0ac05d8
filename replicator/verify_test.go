package replicator

import (
	"errors"
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// corrupt overwrites 4 KiB blocks of a node's disk behind its back.
func (p *pair) corrupt(node int, blocks ...int64) {
	p.t.Helper()
	f, err := os.OpenFile(p.disks[node], os.O_WRONLY, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	for _, b := range blocks {
		if _, err := f.WriteAt([]byte(strings.Repeat("x", 4096)), b*4096); err != nil {
			p.t.Fatal(err)
		}
	}
}

// verified runs one verify from alpha and waits for both nodes to be
// Connected again; it returns the blocks then marked out of sync on each.
func (p *pair) verified(vr VerifyRange) (alpha, beta uint64) {
	p.t.Helper()
	if err := p.alpha.Verify(vr); err != nil {
		p.t.Fatal(err)
	}
	done := func(s Snapshot) bool { return s.Conn == Connected }
	p.wait(p.alpha, "verify done", done)
	p.wait(p.beta, "verify done", done)
	return p.alpha.Snapshot().OutOfSyncBytes / 4096, p.beta.Snapshot().OutOfSyncBytes / 4096
}

func sectors(v uint64) *uint64 { return &v }

// equalPair is a connected pair whose disks are declared equal
// (new-current-uuid --clear-bitmap), both Secondary.
func equalPair(t *testing.T, opts string) *pair {
	t.Helper()
	p := newPair(t, opts)
	p.connect()
	p.connected()
	if err := p.alpha.NewCurrentUUID(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	return p
}

// TestPair_VerifyRange: --start and --stop bound a verify to exactly the
// blocks between them; a verify without --start resumes where the last
// one stopped, and from the start once one reached the end; ranges off
// the device are refused.
func TestPair_VerifyRange(t *testing.T) {
	p := equalPair(t, "net { protocol C; verify-alg sha256; } disk { c-plan-ahead 0; resync-rate 1G; }")
	blocks := uint64(p.alpha.Size()) / 4096
	p.corrupt(1, 10, 11, 50, 100, int64(blocks-1))

	// Sectors 83 to 479: blocks 10 (83 rounded down to 80) to 59.
	if a, b := p.verified(VerifyRange{Start: sectors(83), Stop: sectors(479)}); a != 3 || b != 3 {
		t.Fatalf("verify of sectors 83-479 marked %d blocks on alpha, %d on beta; want 10, 11 and 50", a, b)
	}
	// Resumes at block 60 and runs to the end.
	if a, b := p.verified(VerifyRange{}); a != 5 || b != 5 {
		t.Fatalf("the resumed verify left %d blocks marked on alpha, %d on beta; want 5", a, b)
	}
	// That one reached the end: the next begins at sector 0.
	p.verified(VerifyRange{})
	log := p.logs[0].String()
	for _, want := range []string{
		"Starting Online Verify from sector 80\"",
		"Online verify found 3 4k block out of sync!",
		"Starting Online Verify from sector 480\"",
		"Online verify found 2 4k block out of sync!",
		"Starting Online Verify from sector 0\"",
		"Online verify found 5 4k block out of sync!",
		"Out of sync: start=80, size=16 (sectors)", // blocks 10 and 11: one run
		"Out of sync: start=400, size=8 (sectors)",
		fmt.Sprintf("Out of sync: start=%d, size=8 (sectors)", (blocks-1)*8),
	} {
		if !strings.Contains(log, want) {
			t.Errorf("alpha's log lacks %q", want)
		}
	}
	if strings.Contains(log, "start=88,") {
		t.Errorf("adjacent differing blocks logged apart")
	}
	if n := strings.Count(log, "Starting Online Verify"); n != 3 {
		t.Errorf("alpha's log has %d verify starts, want 3", n)
	}

	// After one that reached the end, --stop alone verifies from sector 0;
	// DRBD's own default stop (the largest sector) means the end.
	p.verified(VerifyRange{Stop: sectors(80)})
	p.verified(VerifyRange{Start: sectors(80), Stop: sectors(math.MaxUint64)})
	if log := p.logs[0].String(); strings.Count(log, "Starting Online Verify from sector 0\"") != 2 ||
		strings.Count(log, "Starting Online Verify from sector 80\"") != 2 {
		t.Errorf("--stop alone after a full verify, or --stop at the largest sector, went wrong:\n%s", log)
	}

	for _, tc := range []struct {
		name string
		vr   VerifyRange
	}{
		{"start at the end", VerifyRange{Start: sectors(blocks * 8)}},
		{"start past the end", VerifyRange{Start: sectors(1 << 40)}},
		{"stop before start", VerifyRange{Start: sectors(800), Stop: sectors(400)}},
		{"stop in start's block", VerifyRange{Start: sectors(800), Stop: sectors(800)}},
	} {
		err := p.alpha.Verify(tc.vr)
		if !errors.Is(err, ErrVerifyRange) {
			t.Errorf("%s: %v, want ErrVerifyRange", tc.name, err)
		}
		if s := p.alpha.Snapshot(); s.Conn != Connected {
			t.Fatalf("%s: refused, yet %s", tc.name, s.Conn)
		}
	}
}

var reached = regexp.MustCompile(`Online Verify reached sector (\d+)`)

// TestPair_VerifyResume: a verify interrupted by a disconnect resumes
// where it got to, and --stop on a running VerifyS moves where it ends.
func TestPair_VerifyResume(t *testing.T) {
	// 4 MiB/s: the 32 MiB disk takes 8 s, time to interrupt it.
	p := equalPair(t, "net { protocol C; verify-alg sha256; } disk { c-plan-ahead 0; resync-rate 4M; }")
	blocks := uint64(p.alpha.Size()) / 4096
	if err := p.alpha.Verify(VerifyRange{}); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "a quarter verified", func(s Snapshot) bool {
		return s.Conn == VerifyS && s.Resync != nil && s.Resync.LeftBytes < s.Resync.TotalBytes*3/4
	})
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
	var at [2]uint64
	for i := range at {
		m := reached.FindStringSubmatch(p.logs[i].String())
		if m == nil {
			t.Fatalf("node %d did not log where the verify got to", i)
		}
		at[i], _ = strconv.ParseUint(m[1], 10, 64)
		if at[i] == 0 || at[i] >= blocks*8 || at[i]%8 != 0 {
			t.Fatalf("node %d: verify reached sector %d of %d", i, at[i], blocks*8)
		}
	}
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	starts := func(sector uint64) int {
		return strings.Count(p.logs[0].String(), fmt.Sprintf("Starting Online Verify from sector %d\"", sector))
	}
	// pausedVerify starts a verify that waits before its first request,
	// moves its stop, lets it run and waits for its end.
	pausedVerify := func(stop uint64) {
		t.Helper()
		if err := p.alpha.PauseSync(); err != nil {
			t.Fatal(err)
		}
		if err := p.alpha.Verify(VerifyRange{}); err != nil {
			t.Fatal(err)
		}
		// Once beta knows, alpha's walk is past its start, most likely
		// waiting for the pause to end with its first block.
		p.wait(p.beta, "VerifyT", func(s Snapshot) bool { return s.Conn == VerifyT })
		if err := p.alpha.Verify(VerifyRange{Stop: sectors(stop)}); err != nil {
			t.Fatal(err)
		}
		if err := p.alpha.ResumeSync(); err != nil {
			t.Fatal(err)
		}
		p.wait(p.alpha, "verify done", func(s Snapshot) bool { return s.Conn == Connected })
		p.wait(p.beta, "verify done", func(s Snapshot) bool { return s.Conn == Connected })
	}
	// The next verify resumes where the interrupted one got to; its stop
	// moved below where it stands ends it there, having compared nothing.
	pausedVerify(8)
	if starts(at[0]) != 1 {
		t.Fatalf("the verify after the interruption did not start at sector %d", at[0])
	}
	// So the next one starts there again; its stop moved 64 blocks on
	// ends it there.
	pausedVerify(at[0] + 64*8)
	if starts(at[0]) != 2 {
		t.Fatalf("a verify stopped before its first block moved the resume point")
	}
	// --stop alone on a Connected node: from there, one block.
	if err := p.alpha.Verify(VerifyRange{Stop: sectors(at[0] + 65*8)}); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "verify done", func(s Snapshot) bool { return s.Conn == Connected })
	if starts(at[0]+64*8) != 1 {
		t.Errorf("the verify after a moved stop did not start at sector %d", at[0]+64*8)
	}
	log := p.logs[0].String()
	for _, want := range []string{
		fmt.Sprintf("Online Verify stop sector set to %d\"", at[0]),
		fmt.Sprintf("Online Verify stop sector set to %d\"", at[0]+64*8),
	} {
		if !strings.Contains(log, want) {
			t.Errorf("alpha's log lacks %q", want)
		}
	}
}

// TestPair_VerifyCMinRate: application writes during a verify from the
// Primary hold its requests back under c-min-rate (not with 0), and none
// of them makes a block differ.
func TestPair_VerifyCMinRate(t *testing.T) {
	for _, minRate := range []string{"0", "1"} {
		t.Run("c-min-rate="+minRate, func(t *testing.T) {
			// 32 MiB at 8 MiB/s: about 4 s of verify without throttling.
			p := equalPair(t, "net { protocol A; verify-alg sha256; } disk { c-plan-ahead 0; resync-rate 8M; c-min-rate "+minRate+"; }")
			if err := p.alpha.Primary(false); err != nil {
				t.Fatal(err)
			}
			stopWrites := p.writeLoad(2 * time.Millisecond)
			if err := p.alpha.Verify(VerifyRange{}); err != nil {
				t.Fatal(err)
			}
			if minRate == "0" {
				p.wait(p.alpha, "a quarter verified", func(s Snapshot) bool {
					return s.Conn != VerifyS || s.Resync != nil && s.Resync.LeftBytes <= s.Resync.TotalBytes*3/4
				})
			} else {
				p.wait(p.alpha, "a verify request held back", func(Snapshot) bool { return p.alpha.throttled.Load() > 0 })
			}
			stopWrites()
			p.wait(p.alpha, "verify done", func(s Snapshot) bool { return s.Conn == Connected })
			p.wait(p.beta, "verify done", func(s Snapshot) bool { return s.Conn == Connected })
			held := p.alpha.throttled.Load()
			t.Logf("verify requests held back: %d", held)
			if minRate == "0" && held != 0 {
				t.Errorf("c-min-rate 0 held %d verify requests back", held)
			}
			for i, r := range []*Resource{p.alpha, p.beta} {
				if oos := r.Snapshot().OutOfSyncBytes; oos != 0 {
					t.Errorf("node %d: the verify marked %d bytes that application writes changed meanwhile", i, oos)
				}
			}
			p.wait(p.alpha, "every write barrier-acked", func(s Snapshot) bool { return s.Counters.PE == 0 })
			p.same()
		})
	}
}
