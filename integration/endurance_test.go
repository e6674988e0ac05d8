//go:build integration && long

package integration

// The endurance run of `make test-long` (reference/testing.md §5,
// "Nightly"), LINBIT-style: two nodes in two network namespaces with a
// random protocol, link rate and Secondary disk delay, fio's zipf random
// reads and writes through alpha's export over more data than the
// activity log covers, and repeated `invalidate-remote` (a full resync)
// under the load. At the end both disks hold the same bytes. The build
// tag `long` keeps it out of `make test`.
//
//	NBDMIRROR_ENDURANCE       how long fio runs (a Go duration; default 5m)
//	NBDMIRROR_ENDURANCE_SEED  replays a run: the seed it printed

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestEndurance(t *testing.T) {
	need(t, "fio", "nbdkit", "nbdfuse", "fusermount3")
	needRoot(t)
	duration := 5 * time.Minute
	if s := os.Getenv("NBDMIRROR_ENDURANCE"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 10*time.Second {
			t.Fatalf("NBDMIRROR_ENDURANCE=%q: want a duration of at least 10s (%v)", s, err)
		}
		duration = d
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("NBDMIRROR_ENDURANCE_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("NBDMIRROR_ENDURANCE_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("to replay: make test-long ENDURANCE=%v SEED=%d", duration, seed)
		}
	})
	r := rand.New(rand.NewPCG(seed, 0))
	const (
		size      = 64 * mib // 16 extents
		alExtents = 7        // 28 MiB: fio's 56 MiB are twice that
		fioSize   = 56 * mib
	)
	protocol := []string{"A", "C"}[r.IntN(2)]
	linkMbit := []int{50, 100, 200, 500}[r.IntN(4)]
	wdelay := []int{0, 1, 2, 5}[r.IntN(4)] // ms, each write to beta's disk
	rdelay := []int{0, 1}[r.IntN(2)]
	controller := []string{"c-plan-ahead 0; resync-rate 200M;", "c-plan-ahead 20; c-fill-target 1M; c-max-rate 200M;"}[r.IntN(2)]
	t.Logf("seed %d: protocol %s, link %d Mbit/s, beta's disk +%d ms per write and +%d ms per read, %s fio for %v",
		seed, protocol, linkMbit, wdelay, rdelay, controller, duration)

	// beta's disk: nbdkit's delay filter over a file, through nbdfuse.
	dir := t.TempDir()
	lower := sparseFile(t, dir, "beta-lower.img", size)
	betaDisk := fuseMount(t, dir, "beta-disk", size, nil, "--socket-activation", "nbdkit", "--filter=delay", "file", lower,
		fmt.Sprintf("wdelay=%dms", wdelay), fmt.Sprintf("rdelay=%dms", rdelay))

	c := newClusterDisks(t, size, fmt.Sprintf("net { protocol %s; } disk { al-extents %d; c-min-rate 0; %s }",
		protocol, alExtents, controller), map[string]string{"beta": betaDisk})
	for _, dev := range []struct{ ns, name string }{{c.h.nsA, c.h.devA}, {c.h.nsB, strings.Replace(c.h.devA, "vA", "vB", 1)}} {
		burst := max(32<<10, linkMbit<<20/8/100) // 10 ms at the rate
		c.h.in(dev.ns, "tc", "qdisc", "add", "dev", dev.name, "root", "tbf", "rate", fmt.Sprintf("%dmbit", linkMbit),
			"burst", strconv.Itoa(burst), "latency", "100ms")
	}
	c.skipInitialSync()

	fioOut := filepath.Join(dir, "fio.json")
	fio := startIn(t, dir, "fio", "--name=endurance", "--ioengine=nbd", "--uri="+c.alpha.uri(), "--rw=randrw",
		"--rwmixwrite=70", "--random_distribution=zipf:2.0", "--bsrange=4k-64k", "--size="+strconv.Itoa(fioSize),
		"--iodepth=8", "--time_based", fmt.Sprintf("--runtime=%d", int(duration.Seconds())),
		fmt.Sprintf("--randseed=%d", seed), "--output-format=json", "--output="+fioOut)
	t.Cleanup(func() {
		// fio runs its job in a child process, which would outlive the
		// parent and hold its output open: stop the whole process group
		// (startProc made fio its leader).
		syscall.Kill(-fio.cmd.Process.Pid, syscall.SIGKILL)
	})

	// Under the load: now and then a full resync of beta, waited for.
	dataKiB := uint64(c.dataSize / 1024)
	invalidations := 0
	for {
		select {
		case <-fio.done:
		case <-time.After(time.Duration(1000+r.IntN(4000)) * time.Millisecond):
		}
		if fio.exited() {
			break
		}
		before := c.beta.status().Counters.DW
		began := time.Now()
		c.alpha.must("invalidate-remote", "r0")
		// A full resync writes every block of beta's disk once more.
		eventually(t, 5*time.Minute, "the full resync of invalidate-remote", func() (bool, string) {
			a, b := c.alpha.status(), c.beta.status()
			// A connection lost under the load is retried and the resync
			// resumes (counted below); a node that gives up is a failure.
			if a.CState == "StandAlone" || b.CState == "StandAlone" {
				t.Fatalf("StandAlone during invalidate-remote %d: alpha %+v, beta %+v", invalidations+1, a, b)
			}
			done := a.CState == "Connected" && b.Disk == "UpToDate" && b.Counters.DW-before >= dataKiB
			return done, fmt.Sprintf("alpha %s, beta %s, beta wrote %d KiB of %d", a.CState, b.Disk, b.Counters.DW-before, dataKiB)
		})
		invalidations++
		t.Logf("invalidate-remote %d: full resync done in %v", invalidations, time.Since(began).Round(time.Millisecond))
	}
	if err := fio.wait(time.Minute); err != nil {
		t.Fatalf("fio: %v\n%s", err, fio.out.String())
	}
	job := readFioJSON(t, fioOut)
	if job.Error != 0 || job.Write.TotalIOs == 0 || job.Read.TotalIOs == 0 {
		t.Fatalf("fio: %+v", job)
	}
	want := 1 // repeated from a minute of load on
	if duration >= time.Minute {
		want = 2
	}
	if invalidations < want {
		t.Fatalf("%d full resyncs ran during %v of load, want at least %d", invalidations, duration, want)
	}
	c.beta.waitState(5*time.Minute, "Connected", "UpToDate", "UpToDate")
	al := alTransactions(t, c.alpha)
	if al <= alExtents {
		t.Fatalf("alpha wrote %d activity-log transactions: the load did not churn a log of %d extents", al, alExtents)
	}
	c.alpha.demote() // returns once beta confirmed every write
	c.sameData()
	// Each lost connection, with why each side dropped it.
	var losses []string
	for _, n := range c.nodes() {
		for _, line := range strings.Split(n.d.out.String(), "\n") {
			if strings.Contains(line, `msg="connection to the peer lost"`) || strings.Contains(line, `msg="session to the peer lost"`) {
				losses = append(losses, n.name+": "+line)
			}
		}
	}
	t.Logf("fio wrote %d MiB in %d writes and read %d MiB in %d reads; %d full resyncs; %d activity-log transactions; "+
		"beta wrote %d MiB; %d connection losses logged%s",
		job.Write.IOKBytes>>10, job.Write.TotalIOs, job.Read.IOKBytes>>10, job.Read.TotalIOs, invalidations, al,
		c.beta.status().Counters.DW>>10, len(losses), strings.Join(append([]string{""}, losses...), "\n  "))
}

// alTransactions returns the activity-log transactions the node's
// resource has written since it was attached (status --json).
func alTransactions(t *testing.T, n *rnode) uint64 {
	t.Helper()
	var st []struct {
		Counters struct {
			AL uint64 `json:"al"`
		} `json:"counters"`
	}
	out := n.must("status", "--json", "r0")
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st[0].Counters.AL
}
