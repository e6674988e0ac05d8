//go:build integration

package integration

// Replication end to end (reference/testing.md §5 rows): two daemons in two
// network namespaces, real NBD clients (fio, nbdsh), the disks compared
// byte for byte at the end.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestReplication_Baseline (N1): initial full sync from alpha, fio random
// writes with verify on alpha under protocol A and C; then beta holds the
// same bytes, and after a switchover fio verifies them through beta.
func TestReplication_Baseline(t *testing.T) {
	need(t, "fio")
	for _, proto := range []string{"A", "C"} {
		t.Run("protocol "+proto, func(t *testing.T) {
			c := newCluster(t, 128*mib, fmt.Sprintf("net { protocol %s; } disk { c-plan-ahead 0; resync-rate 500M; }", proto))
			c.initialSync()
			st := c.alpha.status()
			if st.Role != "Primary" || st.PeerRole != "Secondary" {
				t.Fatalf("alpha after the initial sync: %+v", st)
			}
			fioDir := t.TempDir()
			job := []string{"--name=n1", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=64m",
				"--offset=16m", "--randseed=77", "--verify=crc32c", "--iodepth=16", "--number_ios=6000", "--verify_state_save=0"}
			run(t, 3*time.Minute, "fio", append(job, "--uri="+c.alpha.uri(), "--do_verify=1",
				"--output="+filepath.Join(fioDir, "w.txt"))...)
			// A TRIM larger than one peer message (40 MiB) replicates in pieces.
			rc := dialNBD(t, c.alpha.sock(), "r0")
			rc.send(t, 4, 1, 82*mib, 40*mib, nil) // NBD_CMD_TRIM
			if e := rc.reply(t, 1); e != 0 {
				t.Fatalf("TRIM of 40 MiB: error %d", e)
			}
			rc.c.Close()
			// Demotion returns only after beta has seen it (and every write).
			c.alpha.demote()
			c.sameData()
			if st := c.alpha.status(); st.OutOfSyncBytes != 0 || st.CState != "Connected" {
				t.Fatalf("alpha after the writes: %+v", st)
			}
			c.beta.must("primary", "r0")
			run(t, 3*time.Minute, "fio", append(job, "--uri="+c.beta.uri(), "--verify_only",
				"--output="+filepath.Join(fioDir, "v.txt"))...)
			c.beta.demote()
			for _, n := range c.nodes() {
				n.must("down", "r0")
			}
			c.sameData()
		})
	}
}

// TestReplication_DisconnectResync (P1): writes while beta is
// disconnected are marked on alpha block by block; the reconnect resyncs
// exactly those (resync bytes = bits dirtied, not the whole disk).
func TestReplication_DisconnectResync(t *testing.T) {
	c := newCluster(t, 256*mib, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	c.beta.must("disconnect", "r0")
	c.alpha.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	// Three ranges, 4 KiB-aligned: 1 MiB, 12 KiB and 2 MiB = 3084 KiB.
	ranges := []struct{ off, n int64 }{{8 * mib, mib}, {100 * mib, 12 << 10}, {200 * mib, 2 * mib}}
	var want uint64
	for _, r := range ranges {
		buf := make([]byte, r.n)
		rand.Read(buf)
		c.alpha.writeAt(r.off, buf)
		want += uint64(r.n)
	}
	st := c.alpha.status()
	if st.OutOfSyncBytes != want {
		t.Fatalf("alpha marks %d bytes out of sync after writing %d while disconnected", st.OutOfSyncBytes, want)
	}
	if st.UUIDs.Bitmap == "0000000000000000" || st.UUIDs.Bitmap == "" {
		t.Fatalf("alpha kept no bitmap UUID after losing its peer: %+v", st.UUIDs)
	}
	before := c.beta.status().Counters.DW
	c.beta.must("connect", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	got := (c.beta.status().Counters.DW - before) * 1024
	if got != want {
		t.Errorf("beta wrote %d bytes in the resync, want exactly the %d marked", got, want)
	}
	c.alpha.demote()
	c.sameData()
	if log := c.alpha.d.out.String(); !strings.Contains(log, "uuid_compare()=") {
		t.Errorf("alpha did not log the UUID comparison:\n%s", tail(log, 40))
	}
}

// TestReplication_SplitBrain (S1): both nodes promoted while apart and
// written to; at connect both end StandAlone and neither disk changes;
// discard-my-data on beta resolves it to alpha's data, changes of both
// sides included. Three rounds.
func TestReplication_SplitBrain(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	c.alpha.demote()
	for round := range 3 {
		for _, n := range c.nodes() {
			n.must("disconnect", "r0")
		}
		c.alpha.must("primary", "r0")
		c.beta.must("primary", "r0")
		a := bytes.Repeat([]byte{byte('a' + round)}, 64<<10)
		b := bytes.Repeat([]byte{byte('A' + round)}, 128<<10)
		c.alpha.writeAt(int64(round)*mib, a)
		c.beta.writeAt(int64(round)*mib+32*mib, b)
		for _, n := range c.nodes() {
			n.demote()
		}
		size := c.dataSize
		ha, hb := c.alpha.dataHash(size), c.beta.dataHash(size)
		for _, n := range c.nodes() {
			n.must("connect", "r0")
		}
		for _, n := range c.nodes() {
			n.waitState(time.Minute, "StandAlone", "", "")
		}
		for _, n := range c.nodes() {
			if !strings.Contains(n.d.out.String(), "Split-Brain detected but unresolved, dropping connection!") {
				t.Fatalf("round %d: %s did not log the split brain", round, n.name)
			}
		}
		if c.alpha.dataHash(size) != ha || c.beta.dataHash(size) != hb {
			t.Fatalf("round %d: a disk changed after the split brain was detected", round)
		}
		// Manual recovery: beta is the victim.
		if code, _, errOut := c.beta.cli("connect", "--discard-my-data", "r0"); code != 0 {
			t.Fatalf("connect --discard-my-data: exit %d: %s", code, errOut)
		}
		c.alpha.must("connect", "r0")
		c.beta.must("wait-connect", "--timeout", "60s", "r0")
		c.beta.must("wait-sync", "--timeout", "2m", "r0")
		c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
		if got := c.beta.dataHash(size); got != ha {
			t.Fatalf("round %d: beta does not hold alpha's data after the resolution", round)
		}
	}
	// --discard-my-data is refused on a Primary.
	c.alpha.must("primary", "r0")
	c.alpha.must("disconnect", "r0")
	code, _, errOut := c.alpha.cli("connect", "--discard-my-data", "r0")
	if code == 0 || !strings.Contains(errOut, "--discard-my-data not allowed when primary.") {
		t.Fatalf("connect --discard-my-data on a Primary: exit %d: %s", code, errOut)
	}
}

// TestReplication_Failover (protocol C): alpha crashes while Primary
// under a sequence writer; beta, promoted, holds every acknowledged
// write; beta is written to; alpha comes back, joins as SyncTarget and
// ends with beta's data.
func TestReplication_Failover(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	w := newSeqWriter(t, 32*mib)
	acked := w.killDuring(c.alpha, 200)
	c.beta.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	if s := w.check(c.beta); s < acked {
		t.Fatalf("protocol C: beta holds writes up to %d, %d were acknowledged", s, acked)
	}
	c.beta.must("primary", "r0")
	more := make([]byte, 128<<10)
	rand.Read(more)
	c.beta.writeAt(40*mib, more)
	c.alpha.start()
	c.alpha.must("up", "r0")
	c.alpha.must("wait-connect", "--timeout", "60s", "r0")
	c.alpha.must("wait-sync", "--timeout", "2m", "r0")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	if st := c.alpha.status(); st.Role != "Secondary" || st.PeerRole != "Primary" {
		t.Fatalf("alpha after rejoining: %+v", st)
	}
	c.beta.demote()
	c.sameData()
}

// TestReplication_FailoverPrefix (P10): protocol A, alpha killed while a
// sequence writer runs; beta's disk is a consistent prefix of the writes;
// beta is promoted and alpha, back, becomes SyncTarget by the generation
// UUIDs (no split brain) and ends with beta's data.
func TestReplication_FailoverPrefix(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	w := newSeqWriter(t, 32*mib)
	acked := w.killDuring(c.alpha, 300)
	c.beta.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	s := w.check(c.beta)
	t.Logf("acknowledged %d writes, beta holds the prefix up to %d", acked, s)
	if s == 0 || s > uint64(len(w.issued)) {
		t.Fatalf("beta holds prefix %d of %d issued", s, len(w.issued))
	}
	c.beta.must("primary", "r0")
	c.alpha.start()
	c.alpha.must("up", "r0")
	c.alpha.must("wait-connect", "--timeout", "60s", "r0")
	c.alpha.must("wait-sync", "--timeout", "2m", "r0")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	for _, n := range c.nodes() {
		if strings.Contains(n.d.out.String(), "Split-Brain") {
			t.Fatalf("%s reported a split brain", n.name)
		}
	}
	if !strings.Contains(c.alpha.d.out.String(), "resync starting as SyncTarget") {
		t.Errorf("alpha did not rejoin as SyncTarget")
	}
	c.beta.demote()
	c.sameData()
}

// TestReplication_Switchover (P11): three planned switchovers with a
// sequence writer: the new Primary has every acknowledged write.
func TestReplication_Switchover(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	w := newSeqWriter(t, 16*mib)
	from, to := c.alpha, c.beta
	for round := range 3 {
		acked := w.run(from, 200)
		from.demote()
		to.must("primary", "r0")
		if s := w.check(to); s != acked {
			t.Fatalf("round %d: %s holds writes up to %d, %d were acknowledged", round, to.name, s, acked)
		}
		from, to = to, from
	}
	from.demote()
	c.sameData()
}

// TestReplication_StaleNode (S2): beta stops, alpha writes, beta returns:
// beta becomes SyncTarget by the generation UUIDs, never source.
func TestReplication_StaleNode(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	c.beta.d.stop(syscall.SIGTERM)
	data := make([]byte, 512<<10)
	rand.Read(data)
	c.alpha.writeAt(10*mib, data)
	c.beta.start()
	c.beta.must("up", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	if !strings.Contains(c.beta.d.out.String(), "resync starting as SyncTarget") ||
		!strings.Contains(c.alpha.d.out.String(), "resync starting as SyncSource") {
		t.Fatalf("beta did not rejoin as SyncTarget of alpha")
	}
	c.alpha.demote()
	c.sameData()
}

// TestReplication_Verify (V1): four blocks (two adjacent) corrupted on
// beta's disk while it was down; verify reports exactly those, on both
// nodes; a Primary's disconnect/connect resyncs them; a second verify
// finds nothing.
func TestReplication_Verify(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; verify-alg sha256; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	c.beta.must("down", "r0")
	f, err := os.OpenFile(c.beta.disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	blocks := []int64{100, 5000, 5001, 12000}
	for _, b := range blocks {
		junk := make([]byte, 4096)
		rand.Read(junk)
		if _, err := f.WriteAt(junk, b*4096); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	c.beta.must("up", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.must("verify", "r0")
	want := uint64(len(blocks) * 4096)
	for _, n := range c.nodes() {
		eventually(t, 2*time.Minute, n.name+": verify done", func() (bool, string) {
			st := n.status()
			return st.CState == "Connected" && st.OutOfSyncBytes == want, fmt.Sprintf("%+v", st)
		})
	}
	log := c.alpha.d.out.String()
	// The two adjacent blocks are one run, as DRBD logs it.
	for _, r := range []string{"Out of sync: start=800, size=8 (sectors)", "Out of sync: start=40000, size=16 (sectors)",
		"Out of sync: start=96000, size=8 (sectors)",
		"Online verify found 4 4k block out of sync!"} {
		if !strings.Contains(log, r) {
			t.Errorf("alpha's log lacks %q", r)
		}
	}
	if n := strings.Count(log, "Out of sync: start="); n != 3 {
		t.Errorf("alpha logged %d out-of-sync runs, want 3", n)
	}
	// Repair: the Primary's reconnect resyncs exactly the marked blocks.
	before := c.beta.status().Counters.DW
	c.alpha.must("disconnect", "r0")
	c.alpha.must("connect", "r0")
	c.alpha.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	if got := (c.beta.status().Counters.DW - before) * 1024; got != want {
		t.Errorf("the repair resync wrote %d bytes on beta, want %d", got, want)
	}
	c.alpha.must("verify", "r0")
	eventually(t, 2*time.Minute, "second verify done", func() (bool, string) {
		return strings.Count(c.alpha.d.out.String(), "Online verify done") == 2, ""
	})
	if st := c.alpha.status(); st.OutOfSyncBytes != 0 {
		t.Errorf("the second verify marked %d bytes", st.OutOfSyncBytes)
	}
	// A bounded verify through the CLI: sectors 40000-40015, two blocks.
	c.alpha.must("verify", "--start", "40000", "--stop", "40016", "r0")
	eventually(t, time.Minute, "bounded verify done", func() (bool, string) {
		return strings.Count(c.alpha.d.out.String(), "Online verify done") == 3, ""
	})
	if log := c.alpha.d.out.String(); !strings.Contains(log, `Starting Online Verify from sector 40000"`) {
		t.Errorf("the bounded verify did not start at sector 40000")
	}
	c.alpha.demote()
	c.sameData()
}

// TestReplication_ResyncRate: new-current-uuid --clear-bitmap on one of
// two fresh connected nodes skips the initial sync; then a resync of 6 MiB
// at resync-rate 1M runs at 1 MiB/s ± 10 %.
func TestReplication_ResyncRate(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 1M; }")
	c.upBoth()
	c.alpha.must("new-current-uuid", "--clear-bitmap", "r0")
	for _, n := range c.nodes() {
		n.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	}
	if a, b := c.alpha.status().UUIDs.Current, c.beta.status().UUIDs.Current; a != b {
		t.Fatalf("after skipping the initial sync the current UUIDs differ: %s, %s", a, b)
	}
	c.alpha.must("primary", "r0")
	c.dataSize = c.alpha.status().SizeBytes
	c.beta.must("disconnect", "r0")
	const size = 6 * mib
	data := make([]byte, size)
	rand.Read(data)
	c.alpha.writeAt(8*mib, data)
	c.beta.must("connect", "r0")
	var start, end time.Time
	eventually(t, time.Minute, "resync starts", func() (bool, string) {
		st := c.beta.status()
		if st.CState == "SyncTarget" {
			start = time.Now()
			return true, ""
		}
		return false, st.CState
	})
	eventually(t, time.Minute, "resync ends", func() (bool, string) {
		st := c.beta.status()
		if st.CState == "Connected" && st.Disk == "UpToDate" {
			end = time.Now()
			return true, ""
		}
		return false, fmt.Sprintf("%s %d left", st.CState, st.OutOfSyncBytes)
	})
	rate := float64(size) / end.Sub(start).Seconds() / mib
	t.Logf("6 MiB resynced in %v: %.3f MiB/s", end.Sub(start), rate)
	if rate < 0.9 || rate > 1.1 {
		t.Errorf("resync at %.3f MiB/s with resync-rate 1M, want 1 ± 10 %%", rate)
	}
	c.alpha.demote()
	c.sameData()
}

// TestReplication_ResyncInterrupted (P8): a resync of 24 MiB at 2 MiB/s
// is interrupted by a disconnect, a kill -9 of the SyncTarget and a
// silent partition; each time it resumes where its last commit left it
// instead of starting again, and the disks end equal.
func TestReplication_ResyncInterrupted(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 2M; }")
	c.skipInitialSync()
	c.beta.must("disconnect", "r0")
	const total = 24 * mib
	data := make([]byte, total)
	rand.Read(data)
	c.alpha.writeAt(4*mib, data)
	c.beta.must("connect", "r0")
	left := uint64(total)
	// waitProgress waits until the target has less than below left.
	waitProgress := func(below uint64) uint64 {
		t.Helper()
		var st rstatus
		eventually(t, time.Minute, fmt.Sprintf("beta below %d bytes out of sync", below), func() (bool, string) {
			st = c.beta.status()
			return st.CState == "SyncTarget" && st.OutOfSyncBytes < below, fmt.Sprintf("%+v", st)
		})
		return st.OutOfSyncBytes
	}
	// resumed checks the target's bitmap after an interruption: the work
	// committed before it is not redone (one commit of slack).
	resumed := func(how string, before uint64) {
		t.Helper()
		after := c.beta.status().OutOfSyncBytes
		t.Logf("%s: %d bytes left before, %d after", how, before, after)
		if after > before+3*mib || after >= total {
			t.Fatalf("%s: the resync restarted: %d bytes out of sync on beta, %d before", how, after, before)
		}
	}
	for _, step := range []struct {
		name string
		cut  func()
		heal func()
	}{
		{"disconnect", func() { c.beta.must("disconnect", "r0") }, func() { c.beta.must("connect", "r0") }},
		{"kill -9 of the SyncTarget", func() { c.beta.kill() }, func() {
			c.beta.start()
			c.beta.must("up", "r0")
		}},
		{"silent partition", func() {
			c.h.nft(c.h.nsB, fmt.Sprintf(`add chain inet chaos in { type filter hook input priority 0; policy accept; }
				add chain inet chaos out { type filter hook output priority 0; policy accept; }
				add rule inet chaos in ip saddr %s drop
				add rule inet chaos out ip daddr %s drop`, c.h.ipA, c.h.ipA))
			c.alpha.waitState(time.Minute, "WFConnection", "", "")
			c.beta.waitState(time.Minute, "WFConnection", "", "")
		}, func() { c.h.heal(c.h.nsB) }},
	} {
		left = waitProgress(left - 2*mib)
		step.cut()
		if step.name != "silent partition" {
			c.alpha.waitState(time.Minute, "WFConnection", "", "")
		}
		step.heal()
		resumed(step.name, left)
		c.beta.must("wait-connect", "--timeout", "60s", "r0")
	}
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.demote()
	c.sameData()
}

// TestReplication_CrashRestart (P9): the Primary's daemon is killed under
// a sequence writer and restarted: it keeps every acknowledged write, and
// the resync to beta covers only what its activity log held.
func TestReplication_CrashRestart(t *testing.T) {
	const alExtents = 7
	c := newCluster(t, 64*mib, fmt.Sprintf("net { protocol A; } disk { al-extents %d; c-plan-ahead 0; resync-rate 500M; }", alExtents))
	c.initialSync()
	w := newSeqWriter(t, 48*mib)
	acked := w.killDuring(c.alpha, 300)
	c.alpha.start()
	c.alpha.must("up", "r0")
	if s := w.check(c.alpha); s < acked {
		t.Fatalf("alpha holds writes up to %d after the restart, %d were acknowledged", s, acked)
	}
	before := c.beta.status().Counters.DW
	c.alpha.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	resynced := (c.beta.status().Counters.DW - before) * 1024
	t.Logf("resync after the crash: %d bytes (al-extents %d = %d bytes)", resynced, alExtents, alExtents*extentSize)
	if resynced > alExtents*extentSize {
		t.Errorf("the resync after the crash moved %d bytes, more than the activity log covers", resynced)
	}
	c.sameData()
	if s := w.check(c.beta); s < acked {
		t.Errorf("beta holds writes up to %d after the resync, %d were acknowledged", s, acked)
	}
}

// TestReplication_ChecksumResync (P6): with csums-alg, a resync of 24 MiB
// rewritten with identical data plus 1 MiB of new data over a 4 Mbit/s
// link moves about 1 MiB: it finishes in a time only possible if the
// identical blocks were skipped.
func TestReplication_ChecksumResync(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; csums-alg sha256; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.skipInitialSync()
	c.beta.must("disconnect", "r0")
	c.alpha.writeAt(8*mib, make([]byte, 24*mib)) // zeros over zeros: identical
	fresh := make([]byte, mib)
	rand.Read(fresh)
	c.alpha.writeAt(40*mib, fresh)
	if st := c.alpha.status(); st.OutOfSyncBytes != 25*mib {
		t.Fatalf("alpha marks %d bytes, want 25 MiB", st.OutOfSyncBytes)
	}
	c.h.in(c.h.nsA, "tc", "qdisc", "add", "dev", c.h.devA, "root", "tbf", "rate", "4mbit", "burst", "32kb", "latency", "200ms")
	sent := c.alpha.status().Counters.NS
	start := time.Now()
	c.beta.must("connect", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	// 25 MiB at 4 Mbit/s would take 52 s.
	c.beta.must("wait-sync", "--timeout", "25s", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	wire := (c.alpha.status().Counters.NS - sent) * 1024
	t.Logf("csums resync of 25 MiB marked (1 MiB different) in %v, %d bytes sent", time.Since(start), wire)
	if wire > 2*mib || wire < mib {
		t.Errorf("alpha sent %d bytes in the csums resync, want about 1 MiB", wire)
	}
	c.alpha.demote()
	c.sameData()
}

// TestReplication_PullAhead: on-congestion pull-ahead over a 1 Mbit/s
// link: alpha goes Ahead (beta Behind, Outdated) instead of slowing the
// writer, then once the link drains a resync brings beta back.
func TestReplication_PullAhead(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; on-congestion pull-ahead; congestion-fill 256k; sndbuf-size 128k; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.skipInitialSync()
	c.h.in(c.h.nsA, "tc", "qdisc", "add", "dev", c.h.devA, "root", "tbf", "rate", "1mbit", "burst", "10kb", "latency", "400ms")
	start := time.Now()
	for i := range 8 {
		chunk := make([]byte, mib)
		rand.Read(chunk)
		c.alpha.writeAt(int64(i)*mib, chunk)
	}
	t.Logf("8 MiB written in %v over a 1 Mbit/s link", time.Since(start))
	if !strings.Contains(c.alpha.d.out.String(), "Congestion-fill threshold reached") {
		t.Fatalf("alpha never went Ahead")
	}
	c.h.in(c.h.nsA, "tc", "qdisc", "del", "dev", c.h.devA, "root")
	c.beta.waitState(2*time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	for _, l := range []string{"conn( Connected -> Behind )", "disk( UpToDate -> Outdated )", "resync starting as SyncTarget"} {
		if !strings.Contains(c.beta.d.out.String(), l) {
			t.Errorf("beta's log lacks %q", l)
		}
	}
	c.alpha.demote()
	c.sameData()
}

// TestReplication_ResyncUnderLoad (P7): beta invalidates itself (a full
// resync from alpha) while fio writes on alpha; the resync completes, the
// disks end equal, and fio verifies its data through beta after a
// switchover. c-min-rate 0: the resync runs at its full rate alongside
// the writes instead of yielding to them (TestPair_CMinRate covers that).
func TestReplication_ResyncUnderLoad(t *testing.T) {
	need(t, "fio")
	c := newCluster(t, 64*mib, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 20M; c-min-rate 0; }")
	c.initialSync()
	fioDir := t.TempDir()
	job := []string{"--name=p7", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=48m", "--offset=8m",
		"--randseed=7", "--verify=crc32c", "--iodepth=8", "--number_ios=8000", "--verify_state_save=0"}
	f := startIn(t, fioDir, "fio", append(job, "--uri="+c.alpha.uri(), "--do_verify=0", "--rate_iops=2000")...)
	eventually(t, time.Minute, "fio writing", func() (bool, string) {
		st := c.alpha.status()
		return st.Counters.DW > 1024, fmt.Sprint(st.Counters.DW)
	})
	c.beta.must("invalidate", "r0")
	c.beta.waitState(time.Minute, "SyncTarget", "Inconsistent", "")
	if err := f.wait(3 * time.Minute); err != nil {
		t.Fatalf("fio: %v\n%s", err, f.out.String())
	}
	if st := c.beta.status(); st.Counters.DW < 60*1024 {
		t.Errorf("beta wrote only %d KiB: the full resync did not run", st.Counters.DW)
	}
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.demote()
	c.sameData()
	c.beta.must("primary", "r0")
	run(t, 3*time.Minute, "fio", append(job, "--uri="+c.beta.uri(), "--verify_only")...)
	c.beta.demote()
}
