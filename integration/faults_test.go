//go:build integration

package integration

// The network fault matrix of issue #8 (reference/testing.md §5 rows P2,
// P3, P4, P5 and T1): two daemons in two network namespaces under a write
// load (fio through NBD, or the sequence writer), the link broken with
// nft, ss -K and tc. Each scenario measures what it promises: how long the
// nodes took to notice, how much was resynced, what memory and queues the
// Primary held; and each ends with the disks compared byte for byte.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// faultNet is the net section of the partition scenarios: a ping every
// 2 s, answered within 1 s; a send stalled for 1.5 s ends the session; a
// lost session redialed within 2 s. Detection of a silent partition is
// then due within ping-int + ping-timeout = 3 s (about 1 s + ping-timeout
// while data flows).
const (
	faultNet    = "ping-int 2; ping-timeout 10; timeout 15; connect-int 2;"
	faultDetect = 3 * time.Second
	// faultMargin is what a loaded 2-CPU machine running race-detector
	// builds may add to a detection.
	faultMargin = 2 * time.Second
)

// timedStatus is one line of a node's event stream with the time the
// test read it.
type timedStatus struct {
	at time.Time
	st rstatus
}

// eventRecorder keeps a node's `events --now` stream, each line with the
// time it arrived, for as long as the test runs.
type eventRecorder struct {
	n      *rnode
	mu     sync.Mutex
	evs    []timedStatus
	cancel context.CancelFunc
	done   chan struct{}
}

// record starts reading the node's event stream.
func (n *rnode) record() *eventRecorder {
	n.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &eventRecorder{n: n, cancel: cancel, done: make(chan struct{})}
	cmd, sc := n.events(ctx)
	go func() {
		defer close(r.done)
		defer cmd.Wait()
		for sc.Scan() {
			var st rstatus
			if err := json.Unmarshal(sc.Bytes(), &st); err != nil || st.Event == "overflow" {
				// A lost or unreadable line would hide a state change
				// (or, as an empty state, fake one).
				n.t.Errorf("%s: events: %v: %s", n.name, err, sc.Text())
				continue
			}
			r.mu.Lock()
			r.evs = append(r.evs, timedStatus{time.Now(), st})
			r.mu.Unlock()
		}
	}()
	n.t.Cleanup(r.stop)
	// The first line is the current state: the stream is live from here.
	r.wait(30*time.Second, "the first event", time.Time{}, func(rstatus) bool { return true })
	return r
}

func (r *eventRecorder) stop() {
	r.cancel()
	<-r.done
}

// find returns the first event that matches among the state at since
// (the last event read before it) and the events read after it.
func (r *eventRecorder) find(since time.Time, match func(rstatus) bool) (timedStatus, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.evs[r.at(since):] {
		if match(e.st) {
			return e, true
		}
	}
	return timedStatus{}, false
}

// wait waits for find to find an event.
func (r *eventRecorder) wait(timeout time.Duration, what string, since time.Time, match func(rstatus) bool) timedStatus {
	r.n.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if e, ok := r.find(since, match); ok {
			return e
		}
		select {
		case <-r.done:
			r.n.t.Fatalf("%s: the event stream ended waiting for %s", r.n.name, what)
		default:
		}
		if time.Now().After(deadline) {
			r.mu.Lock()
			n := len(r.evs)
			r.mu.Unlock()
			r.n.t.Fatalf("%s: %s: not within %v (%d events)", r.n.name, what, timeout, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// states returns the connection states from the one at since on, in
// order, repeats folded.
func (r *eventRecorder) states(since time.Time) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.evs[r.at(since):] {
		if len(out) == 0 || out[len(out)-1] != e.st.CState {
			out = append(out, e.st.CState)
		}
	}
	return out
}

// at returns the index of the event that holds the state at since: the
// last read at or before it (0 if none). Call with mu held.
func (r *eventRecorder) at(since time.Time) int {
	first := 0
	for i, e := range r.evs {
		if e.at.After(since) {
			break
		}
		first = i
	}
	return first
}

func notConnected(st rstatus) bool { return st.CState != "Connected" }
func connectedUpToDate(st rstatus) bool {
	return st.CState == "Connected" && st.Disk == "UpToDate" && st.PeerDisk == "UpToDate"
}

// partition installs nft rules in B's namespace that silently drop what
// goes from A to B (in) and from B to A (out).
func (h *hosts) partition(in, out bool) {
	h.t.Helper()
	var rules []string
	if in {
		rules = append(rules, "add chain inet chaos in { type filter hook input priority 0; policy accept; }",
			"add rule inet chaos in ip saddr "+h.ipA+" drop")
	}
	if out {
		rules = append(rules, "add chain inet chaos out { type filter hook output priority 0; policy accept; }",
			"add rule inet chaos out ip daddr "+h.ipA+" drop")
	}
	h.nft(h.nsB, strings.Join(rules, "\n"))
}

// flow is one TCP connection between A and B, by its ports.
type flow struct{ portA, portB int }

// dataFlow finds the data stream's connection: of the two between the
// nodes, the one that has carried more bytes from A.
func dataFlow(t *testing.T, h *hosts) flow {
	t.Helper()
	out := h.in(h.nsA, "ss", "-t", "-i", "-n", "-H", "state", "established", "dst", h.ipB)
	re := regexp.MustCompile(regexp.QuoteMeta(h.ipA) + `:(\d+)\s+` + regexp.QuoteMeta(h.ipB) + `:(\d+)[^\n]*\n[^\n]*bytes_sent:(\d+)`)
	var best flow
	var most int64 = -1
	ms := re.FindAllStringSubmatch(out, -1)
	for _, m := range ms {
		a, _ := strconv.Atoi(m[1])
		b, _ := strconv.Atoi(m[2])
		sent, _ := strconv.ParseInt(m[3], 10, 64)
		if sent > most {
			best, most = flow{a, b}, sent
		}
	}
	if len(ms) != 2 {
		t.Fatalf("want the two connections of a session between the nodes, ss shows:\n%s", out)
	}
	return best
}

// dropFlow installs nft rules in B's namespace that silently drop one
// connection's packets from A (in) and to A (out).
func (h *hosts) dropFlow(f flow, in, out bool) {
	h.t.Helper()
	var rules []string
	if in {
		rules = append(rules, "add chain inet chaos in { type filter hook input priority 0; policy accept; }",
			fmt.Sprintf("add rule inet chaos in ip saddr %s tcp sport %d tcp dport %d drop", h.ipA, f.portA, f.portB))
	}
	if out {
		rules = append(rules, "add chain inet chaos out { type filter hook output priority 0; policy accept; }",
			fmt.Sprintf("add rule inet chaos out ip daddr %s tcp sport %d tcp dport %d drop", h.ipA, f.portB, f.portA))
	}
	h.nft(h.nsB, strings.Join(rules, "\n"))
}

// rss returns the node's daemon's resident set size in bytes (VmRSS).
// `ip netns exec` execs the daemon, so the PID started is the daemon's.
func (n *rnode) rss() int64 {
	n.t.Helper()
	pid := n.d.cmd.Process.Pid
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != binary {
		n.t.Fatalf("process %d is %q (%v), not the daemon %s", pid, exe, err, binary)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		n.t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				n.t.Fatalf("VmRSS: %q: %v", v, err)
			}
			return kb << 10
		}
	}
	n.t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// resyncStarts returns the out_of_sync_bytes of each "resync starting as
// <role>" line in the node's log.
func (n *rnode) resyncStarts(role string) []uint64 {
	re := regexp.MustCompile(`resync starting as ` + role + `.*out_of_sync_bytes=(\d+)`)
	var out []uint64
	for _, m := range re.FindAllStringSubmatch(n.d.out.String(), -1) {
		v, _ := strconv.ParseUint(m[1], 10, 64)
		out = append(out, v)
	}
	return out
}

// faultFio is a rate-limited random writer with crc32c verification
// headers on [8 MiB, 40 MiB) of the export; verifyFile checks a replica's
// backing file against it.
type faultFio struct {
	args []string
	dir  string
}

func newFaultFio(t *testing.T, name string, ios, iops int) *faultFio {
	need(t, "fio")
	return &faultFio{dir: t.TempDir(), args: []string{"--name=" + name, "--rw=randwrite", "--bs=4k",
		"--offset=8m", "--size=32m", "--randseed=4242", "--verify=crc32c", "--number_ios=" + strconv.Itoa(ios),
		"--verify_state_save=0", "--rate_iops=" + strconv.Itoa(iops)}}
}

func (f *faultFio) start(t *testing.T, n *rnode) *proc {
	t.Helper()
	return startIn(t, f.dir, "fio", append(f.args, "--ioengine=nbd", "--iodepth=4", "--uri="+n.uri(), "--do_verify=0")...)
}

// verifyFile verifies the blocks fio wrote by reading a backing file.
func (f *faultFio) verifyFile(t *testing.T, path string) {
	t.Helper()
	args := make([]string, 0, len(f.args)+4)
	for _, a := range f.args {
		if !strings.HasPrefix(a, "--rate_iops=") {
			args = append(args, a)
		}
	}
	run(t, 3*time.Minute, "fio", append(args, "--ioengine=psync", "--filename="+path, "--verify_only", "--verify_fatal=1")...)
}

// partitionDuringFio is P2: a silent two-way partition (B drops
// everything from and to A) while fio writes through the Primary alpha.
// It asserts the detection time on both nodes, that alpha keeps writing
// during the partition, that the resync after the heal moves what was
// written meanwhile and no more, equal disks, and fio's verification of
// beta's copy.
func partitionDuringFio(t *testing.T, c *cluster) {
	ra, rb := c.alpha.record(), c.beta.record()
	// 250 writes/s of 4 KiB for 16 s: longer than the scenario.
	job := newFaultFio(t, "p2", 4000, 250)
	fio := job.start(t, c.alpha)
	eventually(t, 30*time.Second, "fio writing", func() (bool, string) {
		st := c.alpha.status()
		return st.Counters.DW >= 1024, fmt.Sprint(st.Counters.DW)
	})
	before := c.alpha.status()
	if before.CState != "Connected" {
		t.Fatalf("alpha before the partition: %+v", before)
	}
	injected := time.Now()
	c.h.partition(true, true)
	da := ra.wait(30*time.Second, "alpha notices the partition", injected, notConnected)
	db := rb.wait(30*time.Second, "beta notices the partition", injected, notConnected)
	detA, detB := da.at.Sub(injected), db.at.Sub(injected)
	t.Logf("silent partition detected by alpha after %v (%s), by beta after %v (%s)", detA.Round(time.Millisecond), da.st.CState,
		detB.Round(time.Millisecond), db.st.CState)
	for _, d := range []time.Duration{detA, detB} {
		if d > faultDetect+faultMargin {
			t.Errorf("a silent partition detected after %v, want within ping-int + ping-timeout + %v = %v", d, faultMargin, faultDetect+faultMargin)
		}
	}
	// The Primary goes on: writes land on its disk and are marked.
	detected := c.alpha.status()
	eventually(t, 30*time.Second, "alpha writing while partitioned", func() (bool, string) {
		st := c.alpha.status()
		return st.Counters.DW >= detected.Counters.DW+2048 && st.OutOfSyncBytes > 0, fmt.Sprintf("%+v", st.Counters)
	})
	if fio.exited() {
		t.Fatalf("fio ended during the partition: %v\n%s", fio.err, fio.out)
	}
	healed := time.Now()
	atHeal := c.alpha.status()
	c.h.heal(c.h.nsB)
	writtenApart := (atHeal.Counters.DW - before.Counters.DW) << 10
	t.Logf("during the partition (%v) alpha wrote %d KiB and marked %d KiB out of sync", healed.Sub(injected).Round(time.Millisecond),
		writtenApart>>10, atHeal.OutOfSyncBytes>>10)
	// What is marked is what was written from the injection (plus what
	// the last barrier ack before it had not yet confirmed).
	if atHeal.OutOfSyncBytes == 0 || atHeal.OutOfSyncBytes > writtenApart+mib {
		t.Errorf("alpha marked %d bytes having written %d during the partition", atHeal.OutOfSyncBytes, writtenApart)
	}
	// The bitmaps go out at WFBitMapS: what alpha wrote up to then.
	rc := ra.wait(time.Minute, "alpha reconnects", healed, func(st rstatus) bool {
		return st.CState == "WFBitMapS" || st.CState == "SyncSource"
	})
	t.Logf("reconnected %v after the heal", rc.at.Sub(healed).Round(time.Millisecond))
	ra.wait(time.Minute, "alpha in sync", healed, connectedUpToDate)
	starts := c.alpha.resyncStarts("SyncSource")
	if len(starts) == 0 {
		t.Fatalf("alpha logged no resync after the heal")
	}
	resync := starts[len(starts)-1]
	// The resync moves what was marked at the heal plus what was written
	// between the heal and the bitmap exchange: no more.
	since := (rc.st.Counters.DW - atHeal.Counters.DW) << 10
	t.Logf("resync after the heal: %d KiB (marked at the heal %d KiB, written from the heal to the bitmap exchange %d KiB)",
		resync>>10, atHeal.OutOfSyncBytes>>10, since>>10)
	if resync < atHeal.OutOfSyncBytes || resync > atHeal.OutOfSyncBytes+since {
		t.Errorf("resync of %d bytes: want between %d (marked at the heal) and that plus the %d written since",
			resync, atHeal.OutOfSyncBytes, since)
	}
	if err := fio.wait(2 * time.Minute); err != nil {
		t.Fatalf("fio: %v\n%s", err, fio.out)
	}
	c.alpha.demote()
	c.sameData()
	job.verifyFile(t, c.beta.disk)
	for _, r := range []*eventRecorder{ra, rb} {
		t.Logf("%s: %s", r.n.name, strings.Join(r.states(injected), " → "))
	}
}

// TestFault_P2SilentPartition (P2): a silent two-way partition during fio
// writes, plain TCP.
func TestFault_P2SilentPartition(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; "+faultNet+" } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.skipInitialSync()
	partitionDuringFio(t, c)
}

// TestFault_P3OneWay (P3): one direction of the link drops everything
// while a sequence writer runs on alpha (protocol C): both nodes notice
// within ping-int + ping-timeout + margin, alpha's writes go on, and
// after the heal the nodes resync and hold the same data, with every
// acknowledged write.
func TestFault_P3OneWay(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in, out bool // dropped by B: from A, to A
		// only the data stream's connection (the control stream, with
		// the pings and protocol C's acks, still flows)
		dataOnly bool
	}{
		{"A to B dropped", true, false, false},
		{"B to A dropped", false, true, false},
		{"A to B dropped on the data stream", true, false, true},
		{"B to A dropped on the data stream", false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 64*mib, "net { protocol C; "+faultNet+" } disk { c-plan-ahead 0; resync-rate 500M; c-min-rate 0; }")
			c.skipInitialSync()
			ra, rb := c.alpha.record(), c.beta.record()
			w := newSeqWriter(t, 32*mib)
			w.pace = 2 * time.Millisecond // 500 writes/s, 2 MB/s
			stop := w.start(c.alpha)
			eventually(t, 30*time.Second, "100 acknowledged writes", func() (bool, string) {
				a := w.ackedCount()
				return a >= 100, fmt.Sprint(a)
			})
			injected, issuedBefore := time.Now(), w.issuedCount()
			if tc.dataOnly {
				c.h.dropFlow(dataFlow(t, c.h), tc.in, tc.out)
			} else {
				c.h.partition(tc.in, tc.out)
			}
			da := ra.wait(30*time.Second, "alpha notices", injected, notConnected)
			db := rb.wait(30*time.Second, "beta notices", injected, notConnected)
			detA, detB := da.at.Sub(injected), db.at.Sub(injected)
			t.Logf("%s: detected by alpha after %v (%s), by beta after %v (%s)", tc.name, detA.Round(time.Millisecond), da.st.CState,
				detB.Round(time.Millisecond), db.st.CState)
			for _, d := range []time.Duration{detA, detB} {
				if d > faultDetect+faultMargin {
					t.Errorf("a one-way partition detected after %v, want within %v", d, faultDetect+faultMargin)
				}
			}
			// Nothing blocks: the writer goes on, and the nodes stay
			// disconnected (no session half up) until the heal.
			ackedAt := w.ackedCount()
			eventually(t, 30*time.Second, "writes acknowledged while partitioned", func() (bool, string) {
				a := w.ackedCount()
				return a >= ackedAt+100, fmt.Sprint(a)
			})
			for _, n := range c.nodes() {
				// Only the old connection is dropped: a new session comes
				// up on new ones, the others are cut until the heal.
				if st := n.status(); st.CState == "Connected" && !tc.dataOnly {
					t.Errorf("%s Connected through a one-way partition: %+v", n.name, st)
				}
			}
			healed := time.Now()
			c.h.heal(c.h.nsB)
			ra.wait(time.Minute, "alpha in sync", healed, connectedUpToDate)
			rb.wait(time.Minute, "beta in sync", healed, connectedUpToDate)
			t.Logf("in sync again %v after the heal", time.Since(healed).Round(time.Millisecond))
			// What was resynced: blocks written since the partition (one
			// write was in flight at it), each 4 KiB; some, at least.
			issued := w.issuedCount()
			var resynced uint64
			for _, b := range c.alpha.resyncStarts("SyncSource") {
				resynced += b
			}
			t.Logf("resynced %d KiB; %d writes issued from the partition to the resync's end", resynced>>10, issued-issuedBefore)
			if resynced == 0 || resynced > 4096*(issued-issuedBefore+1) {
				t.Errorf("resynced %d bytes, want between one block and the %d written since the partition", resynced, 4096*(issued-issuedBefore+1))
			}
			acked := stop()
			c.alpha.demote()
			c.sameData()
			if s := w.check(c.beta); s < acked {
				t.Errorf("beta holds writes up to %d, %d were acknowledged", s, acked)
			}
			t.Logf("%d writes acknowledged; alpha %s; beta %s", acked, strings.Join(ra.states(injected), " → "),
				strings.Join(rb.states(injected), " → "))
		})
	}
}

// TestFault_P4ConnectionReset (P4): `ss -K` in alpha's namespace kills
// both streams at random instants while a sequence writer runs (protocol
// A). Every kill is seen at once, the Primary's writes never fail, the
// nodes reconnect and resync; after the last kill, with new connections
// held off, beta holds a consistent prefix of the writes (a frame cut in
// the middle is never applied); after the heal the disks are equal and
// beta has every acknowledged write.
func TestFault_P4ConnectionReset(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol A; "+faultNet+" } disk { c-plan-ahead 0; resync-rate 500M; c-min-rate 0; }")
	c.skipInitialSync()
	ra, rb := c.alpha.record(), c.beta.record()
	seed := uint64(time.Now().UnixNano())
	t.Logf("random instants from seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 4))
	w := newSeqWriter(t, 32*mib)
	w.pace = time.Millisecond
	stop := w.start(c.alpha)
	const kills = 6
	var issuedAtKill uint64 // writes issued when the last kill was done
	var worst time.Duration
	since := time.Time{}
	for i := range kills {
		ra.wait(time.Minute, "alpha in sync", since, connectedUpToDate)
		rb.wait(time.Minute, "beta in sync", since, connectedUpToDate)
		time.Sleep(time.Duration(50+rng.IntN(700)) * time.Millisecond)
		last := i == kills-1
		if last {
			// Hold new connections off (SYN dropped both ways) so that
			// beta stays as the kill left it.
			c.h.nft(c.h.nsB, fmt.Sprintf(`add chain inet chaos in { type filter hook input priority 0; policy accept; }
				add chain inet chaos out { type filter hook output priority 0; policy accept; }
				add rule inet chaos in ip saddr %s tcp flags & (syn | ack) == syn drop
				add rule inet chaos out ip daddr %s tcp flags & (syn | ack) == syn drop`, c.h.ipA, c.h.ipA))
		}
		acked := w.ackedCount()
		killed := time.Now()
		out := c.h.in(c.h.nsA, "ss", "-K", "-t", "dst", c.h.ipB)
		issuedAtKill = w.issuedCount()
		if n := strings.Count(out, c.h.ipB+":"); n == 0 {
			t.Fatalf("kill %d: ss -K killed no connection to beta:\n%s", i, out)
		}
		da := ra.wait(30*time.Second, "alpha sees the reset", killed, notConnected)
		db := rb.wait(30*time.Second, "beta sees the reset", killed, notConnected)
		d := max(da.at.Sub(killed), db.at.Sub(killed))
		worst = max(worst, d)
		t.Logf("kill %d after %d acknowledged writes: seen by both in %v", i, acked, d.Round(time.Millisecond))
		if d > faultMargin {
			t.Errorf("kill %d: a reset seen after %v, want within %v", i, d, faultMargin)
		}
		since = killed
	}
	// Beta, cut off, has applied all it will: no request on its disk.
	eventually(t, 30*time.Second, "beta idle", func() (bool, string) {
		st := c.beta.status()
		return st.CState == "WFConnection" && st.Counters.LO == 0, fmt.Sprintf("%+v", st)
	})
	s := w.check(c.beta)
	t.Logf("after the last kill beta holds the consistent prefix up to write %d (%d issued when the connections were killed)", s, issuedAtKill)
	if s == 0 || s > issuedAtKill {
		t.Errorf("beta holds a prefix up to write %d; %d had been issued when its connections were killed", s, issuedAtKill)
	}
	healed := time.Now()
	c.h.heal(c.h.nsB)
	ra.wait(time.Minute, "alpha in sync after the heal", healed, connectedUpToDate)
	rb.wait(time.Minute, "beta in sync after the heal", healed, connectedUpToDate)
	acked := stop()
	c.alpha.demote()
	c.sameData()
	if s := w.check(c.beta); s < acked {
		t.Errorf("beta holds writes up to %d, %d were acknowledged", s, acked)
	}
	t.Logf("%d kills, worst detection %v, %d writes acknowledged; resyncs on alpha (bytes): %v", kills, worst.Round(time.Millisecond),
		acked, c.alpha.resyncStarts("SyncSource"))
}

// congestionSample is what the test reads of alpha while the link is
// throttled.
type congestionSample struct {
	rss, pe, ap int64
	dw          uint64 // KiB written to alpha's disk
	cstate      string
}

// TestFault_P5CongestedLink (P5): tc tbf limits alpha's side of the link
// to 1 Mbit/s while fio writes 8 MiB (64 KiB writes, 8 in flight) through
// alpha, protocol A, sndbuf-size 128k. With on-congestion block the
// writer runs at the link's pace: what alpha takes in is what the link
// carries plus the socket buffer, its requests in flight to the peer and
// its memory stay bounded. With pull-ahead the writer is not held back:
// alpha goes Ahead (beta Behind), its queue to the peer stays below
// congestion-fill, and once the link is back a resync of at most what was
// written brings beta back. Both end with equal disks that fio verifies.
func TestFault_P5CongestedLink(t *testing.T) {
	for _, tc := range []struct {
		policy string
		net    string
	}{
		{"block", "on-congestion block;"},
		{"pull-ahead", "on-congestion pull-ahead; congestion-fill 256k;"},
	} {
		t.Run(tc.policy, func(t *testing.T) {
			need(t, "fio")
			// ping-timeout 2 s: a ping waits behind up to 400 ms of data
			// in the qdisc, twice on a loaded machine.
			c := newCluster(t, 64*mib, "net { protocol A; sndbuf-size 128k; ping-timeout 20; "+tc.net+
				" } disk { c-plan-ahead 0; resync-rate 500M; }")
			c.skipInitialSync()
			ra, rb := c.alpha.record(), c.beta.record()
			dir := t.TempDir()
			job := []string{"--name=p5", "--rw=write", "--bs=64k", "--offset=8m", "--size=8m", "--verify=crc32c",
				"--verify_state_save=0"}
			rssBefore := c.alpha.rss()
			start := c.alpha.status()
			c.h.in(c.h.nsA, "tc", "qdisc", "add", "dev", c.h.devA, "root", "tbf", "rate", "1mbit", "burst", "10kb", "latency", "400ms")
			throttled := time.Now()
			fio := startIn(t, dir, "fio", append(job, "--ioengine=nbd", "--iodepth=8", "--uri="+c.alpha.uri(), "--do_verify=0")...)
			// Sample for 8 s (block), or until fio is done (pull-ahead).
			var samples []congestionSample
			for {
				st := c.alpha.status()
				samples = append(samples, congestionSample{rss: c.alpha.rss(), pe: st.Counters.PE, ap: st.Counters.AP,
					dw: st.Counters.DW - start.Counters.DW, cstate: st.CState})
				if tc.policy == "block" && time.Since(throttled) > 8*time.Second || tc.policy == "pull-ahead" && fio.exited() {
					break
				}
				if time.Since(throttled) > time.Minute {
					t.Fatalf("fio did not write 8 MiB within a minute over a 1 Mbit/s link with pull-ahead")
				}
				time.Sleep(100 * time.Millisecond)
			}
			window := time.Since(throttled)
			var peak congestionSample
			for _, s := range samples {
				peak.rss, peak.pe, peak.ap = max(peak.rss, s.rss), max(peak.pe, s.pe), max(peak.ap, s.ap)
			}
			last := samples[len(samples)-1]
			t.Logf("%s: %v throttled: alpha took %d KiB, RSS %d MiB before, peak %d MiB; peak requests to the peer %d, in the resource %d; states %s",
				tc.policy, window.Round(time.Millisecond), last.dw, rssBefore>>20, peak.rss>>20, peak.pe, peak.ap,
				strings.Join(ra.states(throttled), " → "))
			// The link carries 1 Mbit/s = 122 KiB/s.
			carried := uint64(window.Seconds()*122) + 1
			switch tc.policy {
			case "block":
				// What alpha took in: what the link carried, plus the
				// socket buffer (128k), the qdisc (400 ms = 50 KiB) and
				// fio's 8 writes in flight (512 KiB), with 1 MiB of slack.
				if bound := carried + 128 + 50 + 512 + 1024; last.dw > bound {
					t.Errorf("on-congestion block: alpha wrote %d KiB in %v over the link, want at most %d", last.dw, window, bound)
				}
				if fio.exited() {
					t.Errorf("fio finished 8 MiB in %v over a 1 Mbit/s link with on-congestion block", window)
				}
				// The writer waited; the session stayed.
				if st := ra.states(throttled); len(st) != 1 || st[0] != "Connected" {
					t.Errorf("on-congestion block: alpha went %v on a slow link", st)
				}
			case "pull-ahead":
				if err := fio.wait(10 * time.Second); err != nil {
					t.Fatalf("fio: %v\n%s", err, fio.out)
				}
				ra.wait(time.Second, "alpha Ahead", throttled, func(st rstatus) bool { return st.CState == "Ahead" })
				rb.wait(30*time.Second, "beta Behind", throttled, func(st rstatus) bool { return st.CState == "Behind" })
				if last.dw < 8*1024 {
					t.Errorf("fio done, but alpha wrote %d KiB", last.dw)
				}
			}
			// Requests awaiting the peer: 8 MiB of 64 KiB writes are 128;
			// fio's 8, the socket buffer (256 KiB with the kernel's
			// doubling), the qdisc and the barrier acks under way hold
			// about 16-25 (measured): fewer than 3 MiB of the 8.
			if peak.pe > 48 {
				t.Errorf("%d requests awaiting the peer at the peak", peak.pe)
			}
			// Twice the data written: a queue that kept it would show.
			if grow := peak.rss - rssBefore; grow > 16*mib {
				t.Errorf("alpha's RSS grew by %d MiB under congestion", grow>>20)
			}
			c.h.in(c.h.nsA, "tc", "qdisc", "del", "dev", c.h.devA, "root")
			unthrottled := time.Now()
			if err := fio.wait(2 * time.Minute); err != nil {
				t.Fatalf("fio: %v\n%s", err, fio.out)
			}
			// Converging (pull-ahead: the resync) with RSS sampled.
			var rssConv int64
			for {
				rssConv = max(rssConv, c.alpha.rss())
				if _, ok := ra.find(unthrottled, connectedUpToDate); ok {
					break
				}
				if time.Since(unthrottled) > time.Minute {
					t.Fatalf("alpha not in sync a minute after tc qdisc del: %s", strings.Join(ra.states(throttled), " → "))
				}
				time.Sleep(100 * time.Millisecond)
			}
			rb.wait(time.Minute, "beta in sync", unthrottled, connectedUpToDate)
			rs := c.alpha.resyncStarts("SyncSource")
			t.Logf("%s: in sync %v after tc qdisc del; RSS peak while converging %d MiB, after %d MiB; resyncs (bytes) %v", tc.policy,
				time.Since(unthrottled).Round(time.Millisecond), rssConv>>20, c.alpha.rss()>>20, rs)
			switch {
			case tc.policy == "block" && len(rs) != 0:
				t.Errorf("on-congestion block: resyncs of %v bytes, want none (the session never broke)", rs)
			case tc.policy == "pull-ahead" && (len(rs) == 0 || rs[len(rs)-1] == 0 || rs[len(rs)-1] > 8*mib):
				t.Errorf("after Ahead, resyncs of %v bytes; want one of at most the 8 MiB written", rs)
			}
			// The resync holds at most 8 requests of 1 MiB; a race-detector
			// build's heap (and shadow) around them: 60-70 MiB measured
			// (a build without -race: 12-18 MiB for resyncs of 8-48 MiB).
			if grow := rssConv - rssBefore; grow > 128*mib {
				t.Errorf("alpha's RSS grew by %d MiB while converging", grow>>20)
			}
			c.alpha.demote()
			c.sameData()
			run(t, 3*time.Minute, "fio", append(job, "--ioengine=psync", "--filename="+c.beta.disk, "--verify_only", "--verify_fatal=1")...)
		})
	}
}

// testPKI is a CA with certificates for alpha and beta, and a second CA
// with a certificate for alpha, all made with openssl.
type testPKI struct {
	dir string
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	need(t, "openssl")
	p := &testPKI{dir: t.TempDir()}
	for _, ca := range []string{"ca", "other-ca"} {
		run(t, time.Minute, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
			"-keyout", p.path(ca+".key"), "-out", p.path(ca+".crt"), "-days", "2", "-subj", "/CN=nbdmirror test "+ca)
	}
	for _, c := range []struct{ name, node, ca string }{{"alpha", "alpha", "ca"}, {"beta", "beta", "ca"}, {"alpha-other", "alpha", "other-ca"}} {
		ext := p.path(c.name + ".ext")
		if err := os.WriteFile(ext, []byte("subjectAltName=DNS:"+c.node+"\nextendedKeyUsage=serverAuth,clientAuth\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		run(t, time.Minute, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
			"-keyout", p.path(c.name+".key"), "-out", p.path(c.name+".csr"), "-subj", "/CN="+c.node)
		run(t, time.Minute, "openssl", "x509", "-req", "-in", p.path(c.name+".csr"), "-CA", p.path(c.ca+".crt"),
			"-CAkey", p.path(c.ca+".key"), "-CAcreateserial", "-out", p.path(c.name+".crt"), "-days", "2", "-extfile", ext)
	}
	return p
}

func (p *testPKI) path(name string) string { return p.dir + "/" + name }

// net returns the TLS keys for a node with certificate cert ("alpha",
// "alpha-other", "beta") trusting the test CA.
func (p *testPKI) net(cert string) string {
	return fmt.Sprintf("tls-cert %s; tls-key %s; tls-ca %s;", p.path(cert+".crt"), p.path(cert+".key"), p.path("ca.crt"))
}

// TestFault_T1Secured (T1): the baseline replication (a full initial sync,
// then fio) and the silent partition of P2 over TLS 1.3 and over the
// shared-secret link: the session says so, and everything P2 asserts
// holds.
func TestFault_T1Secured(t *testing.T) {
	pki := newTestPKI(t)
	for _, tc := range []struct {
		name string
		net  func(node string) string
		want string // in the session's log line
	}{
		{"TLS", func(node string) string { return pki.net(node) }, "authenticated=false tls=true"},
		{"shared-secret", func(string) string { return `shared-secret "t1 secret";` }, "authenticated=true tls=false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClusterEach(t, 64*mib, func(node string) string {
				return "net { protocol C; " + faultNet + " " + tc.net(node) + " } disk { c-plan-ahead 0; resync-rate 500M; }"
			})
			c.initialSync()
			for _, n := range c.nodes() {
				if log := n.d.out.String(); !strings.Contains(log, tc.want) {
					t.Fatalf("%s: no session with %q:\n%s", n.name, tc.want, tail(log, 40))
				}
			}
			partitionDuringFio(t, c)
			for _, n := range c.nodes() {
				if log := n.d.out.String(); strings.Count(log, "session established") != strings.Count(log, tc.want) {
					t.Errorf("%s: a session without %q:\n%s", n.name, tc.want, tail(log, 40))
				}
			}
		})
	}
}

// TestFault_T1Refused (T1): peers whose security settings do not match
// never connect, and nothing falls back to a weaker link: a plaintext peer
// of a TLS node, a certificate from another CA, a wrong secret, and no
// secret against one. Each node keeps trying (connect-int 2 s) and is
// refused each time for the reason logged.
func TestFault_T1Refused(t *testing.T) {
	pki := newTestPKI(t)
	for _, tc := range []struct {
		name        string
		alpha, beta string
		// a refusal logged by each node: [alpha, beta]
		reasons [2]string
	}{
		{"plaintext peer of a TLS node", "", pki.net("beta"),
			[2]string{"the peer speaks TLS", "the peer does not speak TLS"}},
		{"certificate from another CA", pki.net("alpha-other"), pki.net("beta"),
			[2]string{"tls: bad certificate", "certificate signed by unknown authority"}},
		{"wrong secret", `shared-secret "one";`, `shared-secret "two";`,
			[2]string{"different shared-secret?", "different shared-secret?"}},
		{"no secret against one", "", `shared-secret "two";`,
			[2]string{"only one side has a shared-secret", "only one side has a shared-secret"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClusterEach(t, 64*mib, func(node string) string {
				opts := tc.alpha
				if node == "beta" {
					opts = tc.beta
				}
				return "net { protocol C; " + faultNet + " " + opts + " }"
			})
			ra, rb := c.alpha.record(), c.beta.record()
			for _, n := range c.nodes() {
				n.must("up", "r0")
			}
			since := time.Now()
			// Three connect intervals: every node dials and is dialed.
			for i, n := range c.nodes() {
				eventually(t, 30*time.Second, n.name+" refuses the peer", func() (bool, string) {
					return strings.Count(n.d.out.String(), tc.reasons[i]) >= 2, ""
				})
			}
			time.Sleep(time.Until(since.Add(6 * time.Second)))
			for i, r := range []*eventRecorder{ra, rb} {
				n := c.nodes()[i]
				states := r.states(time.Time{})
				for _, s := range states {
					if s != "StandAlone" && s != "WFConnection" && s != "Unconnected" {
						t.Errorf("%s went %s with a peer it must refuse (%v)", n.name, s, states)
					}
				}
				log := n.d.out.String()
				if strings.Contains(log, "session established") {
					t.Errorf("%s established a session:\n%s", n.name, tail(log, 40))
				}
				var reason string
				for _, line := range strings.Split(log, "\n") {
					if strings.Contains(line, tc.reasons[i]) {
						reason = line
						break
					}
				}
				t.Logf("%s: %d refusals, e.g. %s", n.name, strings.Count(log, tc.reasons[i]), reason)
			}
		})
	}
}
