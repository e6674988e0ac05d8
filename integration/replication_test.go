//go:build integration

package integration

// Replication end to end (reference/testing.md §5 rows): two daemons in two
// network namespaces, real NBD clients (fio, nbdsh), the disks compared
// byte for byte at the end.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"strings"
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
