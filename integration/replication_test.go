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

// TestReplication_Failover (P10, P11 start): alpha crashes while Primary;
// beta is promoted and written to; alpha comes back, joins as SyncTarget
// and ends with beta's data.
func TestReplication_Failover(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	data := make([]byte, 256<<10)
	rand.Read(data)
	c.alpha.writeAt(4*mib, data)
	c.alpha.kill()
	c.beta.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	c.beta.must("primary", "r0")
	more := make([]byte, 128<<10)
	rand.Read(more)
	c.beta.writeAt(20*mib, more)
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
	done := make(chan uint64, 1)
	go func() { done <- w.run(c.alpha, -1) }()
	eventually(t, time.Minute, "300 acknowledged writes", func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.acked >= 300, fmt.Sprint(w.acked)
	})
	c.alpha.kill()
	acked := <-done
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
	for _, r := range []string{"Out of sync: start=800, size=8 (sectors)", "Out of sync: start=40000, size=8 (sectors)",
		"Out of sync: start=40008, size=8 (sectors)", "Out of sync: start=96000, size=8 (sectors)",
		"Online verify found 4 4k block out of sync!"} {
		if !strings.Contains(log, r) {
			t.Errorf("alpha's log lacks %q", r)
		}
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
