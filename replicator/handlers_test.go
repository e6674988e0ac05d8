package replicator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/metadisk"
)

// TestExecHandler: exit codes, the environment, bounded output, the
// timeout, a stopping resource, and a child that keeps the output open.
func TestExecHandler(t *testing.T) {
	dir := t.TempDir()
	pidFile, groupPidFile := filepath.Join(dir, "pid"), filepath.Join(dir, "group-pid")
	t.Cleanup(func() {
		if pid := readPid(t, pidFile); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	stopped, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name    string
		ctx     context.Context
		command string
		timeout time.Duration
		status  int
		out     string
		err     error // errHandlerTimeout, or any error if errAny
		errAny  bool
	}{
		{"success", nil, "exit 0", time.Minute, 0, "", nil, false},
		{"exit code", nil, "exit 5", time.Minute, 5, "", nil, false},
		{"environment and output", nil, `echo "$DRBD_RESOURCE $PATH $HOME"; echo err >&2; exit 3`, time.Minute, 3,
			"r0 " + handlerPath + " /\nerr", nil, false},
		{"output bounded", nil, "head -c 10000 /dev/zero | tr '\\0' x", time.Minute, 0,
			strings.Repeat("x", handlerOutputMax) + "…", nil, false},
		{"killed at the timeout", nil, "sleep 60", 100 * time.Millisecond, -1, "", errHandlerTimeout, false},
		{"the whole group killed at the timeout", nil, "sleep 60 & echo $! > " + groupPidFile + "; wait", 100 * time.Millisecond, -1, "", errHandlerTimeout, false},
		{"not run while stopping", stopped, "exit 0", time.Minute, -1, "", nil, true},
		{"a child keeps the output open", nil, "sleep 60 & echo $! > " + pidFile + "; exit 0", time.Minute, 0, "", nil, false},
		{"no such command", nil, "/nonexistent/handler", time.Minute, 127, "", nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			st, out, err := execHandler(ctx, tc.command, []string{"DRBD_RESOURCE=r0", "PATH=" + handlerPath, "HOME=/"}, tc.timeout)
			if st != tc.status {
				t.Errorf("exit code %d, want %d (err %v, output %q)", st, tc.status, err, out)
			}
			if tc.out != "" && out != tc.out {
				t.Errorf("output %q, want %q", out, tc.out)
			}
			switch {
			case tc.err != nil && !errors.Is(err, tc.err):
				t.Errorf("err %v, want %v", err, tc.err)
			case tc.errAny && err == nil:
				t.Errorf("no error, want one")
			case tc.err == nil && !tc.errAny && err != nil:
				t.Errorf("err %v", err)
			}
		})
	}
	// The timeout killed the shell's child too, not only the shell.
	pid := readPid(t, groupPidFile)
	if pid <= 0 {
		t.Fatal("the group test's child did not record its pid")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		_, rest, _ := strings.Cut(string(b), ") ")
		if err != nil || strings.HasPrefix(rest, "Z") {
			break // gone, or dead and not yet reaped
		}
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("the handler's child %d outlived the timeout: %s", pid, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readPid(t *testing.T, file string) int {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// TestHandlerRunner_Order: queued handlers run one at a time, in order,
// also when queued from many goroutines while others run; stop waits for
// the queue and takes no job after it.
func TestHandlerRunner_Order(t *testing.T) {
	h := newHandlerRunner()
	var mu sync.Mutex
	var got []int
	var running atomic.Int32
	job := func(i int) func() {
		return func() {
			if n := running.Add(1); n != 1 {
				t.Errorf("%d jobs at once", n)
			}
			time.Sleep(100 * time.Microsecond) // let a concurrent job show
			mu.Lock()
			got = append(got, i)
			mu.Unlock()
			running.Add(-1)
		}
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				h.enqueue(job(g*1000 + i))
			}
		})
	}
	wg.Wait()
	h.stop()
	h.enqueue(job(-1))
	h.wg.Wait()
	if len(got) != 200 {
		t.Fatalf("%d jobs ran, want 200 (and none after stop)", len(got))
	}
	last := map[int]int{}
	for _, v := range got {
		g, i := v/1000, v%1000
		if prev, ok := last[g]; ok && i != prev+1 {
			t.Fatalf("goroutine %d's job %d ran after its job %d", g, i, prev)
		}
		last[g] = i
	}
}

// handlerScript writes a handler that logs its call and exits with the
// code in dir/rc.HANDLER.NODE (0 without the file); it returns the
// handlers section naming it for every handler.
func handlerScript(t *testing.T, dir string) string {
	t.Helper()
	script := filepath.Join(dir, "handler.sh")
	err := os.WriteFile(script, []byte(`#!/bin/sh
echo "$NBDMIRROR_HANDLER node=$DRBD_MY_NODE_ID res=$DRBD_RESOURCE cstate=$DRBD_CSTATE me=$DRBD_MY_ADDRESS peer=$DRBD_PEER_ADDRESS peer_name=$DRBD_PEER disk=$NBDMIRROR_DISK_STATE pdsk=$NBDMIRROR_PEER_DISK_STATE oos=$NBDMIRROR_OUT_OF_SYNC_BYTES utd=$UP_TO_DATE_NODES" >> `+dir+`/calls
f=`+dir+`/rc.$NBDMIRROR_HANDLER.$DRBD_MY_NODE_ID
[ -f "$f" ] && exit $(cat "$f")
exit 0
`), 0o755)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString("handlers { handler-timeout 30; ")
	for _, h := range []string{"before-resync-target", "before-resync-source", "after-resync-target", "fence-peer",
		"unfence-peer", "out-of-sync", "split-brain", "initial-split-brain", "pri-lost-after-sb", "local-io-error"} {
		fmt.Fprintf(&b, "%s %q; ", h, script)
	}
	b.WriteString("}")
	return b.String()
}

// setRC makes handler exit with code on node (0 = alpha, 1 = beta);
// a negative code removes the setting.
func setRC(t *testing.T, dir, handler string, node, code int) {
	t.Helper()
	f := filepath.Join(dir, fmt.Sprintf("rc.%s.%d", handler, node))
	if code < 0 {
		os.Remove(f)
		return
	}
	if err := os.WriteFile(f, []byte(strconv.Itoa(code)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// calls returns the handler calls logged so far.
func calls(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "calls"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// waitCall waits until the n-th call of handler on node (counting from
// 1) is logged and returns its line.
func waitCall(t *testing.T, dir, handler string, node, n int) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	prefix := fmt.Sprintf("%s node=%d ", handler, node)
	for {
		seen := 0
		for _, l := range calls(t, dir) {
			if strings.HasPrefix(l, prefix) {
				if seen++; seen == n {
					return l
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("call %d of %s on node %d not within 30s; calls:\n%s", n, handler, node, strings.Join(calls(t, dir), "\n"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// countCalls counts the calls of handler on node so far.
func countCalls(t *testing.T, dir, handler string, node int) int {
	n := 0
	for _, l := range calls(t, dir) {
		if strings.HasPrefix(l, fmt.Sprintf("%s node=%d ", handler, node)) {
			n++
		}
	}
	return n
}

func peerOutdated(r *Resource) bool {
	return r.superblock().Flags&metadisk.FlagPeerOutdated != 0
}

// TestPair_Handlers: the resync handlers with their environment and the
// before-resync-target veto, fence-peer when a Primary loses its peer
// (the peer-outdated flag kept in the metadata) and unfence-peer when it
// is back, and out-of-sync after a verify that found differences.
func TestPair_Handlers(t *testing.T) {
	dir := t.TempDir()
	p := newPair(t, "disk { fencing resource-only; c-plan-ahead 0; resync-rate 1G; } net { verify-alg sha256; } "+handlerScript(t, dir))
	p.connect()
	p.connected()
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	// The initial full sync: the source's and target's handlers.
	line := waitCall(t, dir, "before-resync-target", 1, 1)
	for _, want := range []string{"res=r0", "me=127.0.0.1", "peer=127.0.0.1", "peer_name=alpha", "cstate=Connected"} {
		if !strings.Contains(line, want) {
			t.Errorf("before-resync-target's environment lacks %s: %s", want, line)
		}
	}
	waitCall(t, dir, "before-resync-source", 0, 1)
	line = waitCall(t, dir, "after-resync-target", 1, 1)
	if !strings.Contains(line, "disk=UpToDate") || !strings.Contains(line, "cstate=Connected") {
		t.Errorf("after-resync-target does not see the end of the resync: %s", line)
	}
	if n := countCalls(t, dir, "fence-peer", 0) + countCalls(t, dir, "fence-peer", 1); n != 0 {
		t.Fatalf("fence-peer ran %d times while connected", n)
	}

	// The Primary loses its UpToDate peer: fence-peer (4: outdated).
	setRC(t, dir, "fence-peer", 0, fencePeerOutdated)
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	line = waitCall(t, dir, "fence-peer", 0, 1)
	if !strings.Contains(line, "pdsk=DUnknown") || !strings.Contains(line, "utd=0x1") {
		t.Errorf("fence-peer's environment: %s", line)
	}
	p.wait(p.alpha, "the peer recorded as fenced", func(Snapshot) bool { return peerOutdated(p.alpha) })
	if !strings.Contains(p.logs[0].String(), "fence-peer helper returned 4 (peer was fenced)") {
		t.Errorf("no log line for fence-peer's result")
	}
	buf := make([]byte, 64<<10)
	if err := p.alpha.WriteAt(buf, 3<<20, false); err != nil {
		t.Fatal(err)
	}
	// Back and resynced: the flag goes and unfence-peer runs, once the
	// resync is over.
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	waitCall(t, dir, "before-resync-source", 0, 2)
	if line := waitCall(t, dir, "unfence-peer", 0, 1); !strings.Contains(line, "cstate=Connected") || !strings.Contains(line, "pdsk=UpToDate") {
		t.Errorf("unfence-peer before the peer has the data: %s", line)
	}
	waitCall(t, dir, "after-resync-target", 1, 2)
	p.wait(p.alpha, "the fenced flag cleared", func(Snapshot) bool { return !peerOutdated(p.alpha) })

	// before-resync-target vetoes: beta drops the connection (StandAlone).
	setRC(t, dir, "before-resync-target", 1, 1)
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	waitCall(t, dir, "fence-peer", 0, 2)
	if err := p.alpha.WriteAt(buf, 5<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	waitCall(t, dir, "before-resync-target", 1, 3)
	p.wait(p.beta, "StandAlone after the veto", func(s Snapshot) bool { return s.Conn == StandAlone })
	if !strings.Contains(p.logs[1].String(), "before-resync-target handler returned 1, dropping connection") {
		t.Errorf("the veto is not logged")
	}
	if got := p.beta.Snapshot().Disk; got != UpToDate && got != Outdated && got != Consistent {
		t.Errorf("the vetoed target's disk is %s: nothing of the resync may have begun", got)
	}
	if n := countCalls(t, dir, "after-resync-target", 1); n != 2 {
		t.Errorf("after-resync-target ran %d times, want 2", n)
	}
	// alpha lost the peer again (it refused): fenced once more, and not
	// unfenced while the peer's data is old.
	waitCall(t, dir, "fence-peer", 0, 3)
	if n := countCalls(t, dir, "unfence-peer", 0); n != 1 {
		t.Errorf("unfence-peer ran %d times, want 1: the vetoed peer was unfenced", n)
	}
	if !peerOutdated(p.alpha) {
		t.Errorf("the vetoed peer is not recorded as fenced")
	}
	setRC(t, dir, "before-resync-target", 1, -1)
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	waitCall(t, dir, "after-resync-target", 1, 3)
	waitCall(t, dir, "unfence-peer", 0, 2)
	p.same()

	// before-resync-source vetoes on the Primary: alpha drops the
	// connection; its exit code 3 is ignored.
	setRC(t, dir, "before-resync-source", 0, 1)
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	waitCall(t, dir, "fence-peer", 0, 4)
	if err := p.alpha.WriteAt(buf, 6<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "StandAlone after the source's veto", func(s Snapshot) bool { return s.Conn == StandAlone })
	if !strings.Contains(p.logs[0].String(), "before-resync-source handler returned 1, dropping connection") {
		t.Errorf("the source's veto is not logged")
	}
	setRC(t, dir, "before-resync-source", 0, 3)
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	setRC(t, dir, "before-resync-source", 0, -1)
	for _, l := range calls(t, dir) {
		if strings.HasPrefix(l, "unfence-peer ") && !strings.Contains(l, "cstate=Connected") {
			t.Errorf("unfence-peer ran during a resync: %s", l)
		}
	}

	// A verify that finds a differing block: out-of-sync on both nodes.
	f, err := os.OpenFile(p.disks[1], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt([]byte("differs"), 7<<20)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Verify(VerifyRange{}); err != nil {
		t.Fatal(err)
	}
	for node := range 2 {
		if line := waitCall(t, dir, "out-of-sync", node, 1); !strings.Contains(line, "oos=4096") {
			t.Errorf("out-of-sync on node %d: %s", node, line)
		}
	}
}

// TestPair_FencingPromotion: promoting a disconnected node with fencing
// runs fence-peer first and follows its exit code.
func TestPair_FencingPromotion(t *testing.T) {
	dir := t.TempDir()
	p := newPair(t, "disk { fencing resource-only; c-plan-ahead 0; resync-rate 1G; } "+handlerScript(t, dir))
	p.connect()
	p.connected()
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if err := p.alpha.Secondary(); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*Resource{p.alpha, p.beta} {
		if err := r.Disconnect(); err != nil {
			t.Fatal(err)
		}
	}
	// A broken handler: refused with −7, exit code 17.
	setRC(t, dir, "fence-peer", 1, 1)
	err := p.beta.Primary(false)
	stateErr(t, err, codePrimaryNOP, "Refusing to be Primary while peer is not outdated")
	var se *StateError
	if !errors.As(err, &se) || !se.NoUpToDateData() {
		t.Errorf("a refusal for want of fencing must map to exit code 17: %v", err)
	}
	// 6: the peer is newer; beta outdates itself.
	setRC(t, dir, "fence-peer", 1, fenceOutdateMyself)
	stateErr(t, p.beta.Primary(false), codeNoUpToDate, "this disk is now Outdated")
	if d := p.beta.Snapshot().Disk; d != Outdated {
		t.Fatalf("beta's disk is %s after fence-peer's 6, want Outdated", d)
	}
	if sb := p.beta.superblock(); sb.Flags&metadisk.FlagWasUpToDate != 0 {
		t.Errorf("the Outdated state is not in the metadata: %v", sb.Flags)
	}
	// 5 (unreachable) with an UpToDate disk: fenced; promoted.
	setRC(t, dir, "fence-peer", 0, fencePeerUnreachable)
	if err := p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	if !peerOutdated(p.alpha) {
		t.Errorf("the fenced peer is not recorded")
	}
	// Recorded: a second promotion does not ask again.
	if err := p.alpha.Secondary(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	if n := countCalls(t, dir, "fence-peer", 0); n != 1 {
		t.Errorf("fence-peer ran %d times on alpha, want 1", n)
	}
	// Every run is counted by exit code (the metrics' figures).
	for _, tc := range []struct {
		r    *Resource
		want []HandlerRuns
	}{
		{p.alpha, []HandlerRuns{{"before-resync-source", 0, 1}, {"fence-peer", fencePeerUnreachable, 1}}},
		{p.beta, []HandlerRuns{{"after-resync-target", 0, 1}, {"before-resync-target", 0, 1},
			{"fence-peer", 1, 1}, {"fence-peer", fenceOutdateMyself, 1}}},
	} {
		// (The initial sync's after-resync-target is queued: it may still
		// be running.)
		p.wait(tc.r, fmt.Sprintf("handler runs %v", tc.want), func(s Snapshot) bool { return slices.Equal(s.HandlerRuns, tc.want) })
	}
	// The outdated beta resyncs from alpha; once it is UpToDate, alpha
	// unfences it.
	p.connect()
	p.inSync()
	waitCall(t, dir, "unfence-peer", 0, 1)
	p.wait(p.alpha, "the fenced flag cleared", func(Snapshot) bool { return !peerOutdated(p.alpha) })
}

// TestPair_FencingStonithFreezes: with resource-and-stonith, a Primary
// that loses its peer holds application writes while fence-peer runs and,
// when the handler fails, until resume-io.
func TestPair_FencingStonithFreezes(t *testing.T) {
	dir := t.TempDir()
	p := newPair(t, "disk { fencing resource-and-stonith; c-plan-ahead 0; resync-rate 1G; } "+handlerScript(t, dir))
	p.connect()
	p.connected()
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	setRC(t, dir, "fence-peer", 0, 1) // broken
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	waitCall(t, dir, "fence-peer", 0, 1)
	p.wait(p.alpha, "the handler's result", func(Snapshot) bool {
		return strings.Contains(p.logs[0].String(), "fence-peer helper returned 1 (helper broken)")
	})
	done := make(chan error, 1)
	go func() { done <- p.alpha.WriteAt(make([]byte, 4096), 0, false) }()
	// The write is held: it has not begun (no request in flight) and
	// does not end until resume-io.
	p.wait(p.alpha, "the write held back", func(Snapshot) bool {
		p.alpha.mu.Lock()
		defer p.alpha.mu.Unlock()
		return p.alpha.fenceFrozen && p.alpha.waitingIO == 1 && p.alpha.inflight == 0
	})
	if s := p.alpha.Snapshot(); !s.Suspended {
		t.Errorf("the snapshot does not say I/O is suspended")
	}
	select {
	case err := <-done:
		t.Fatalf("a write completed while fencing failed (err %v)", err)
	default:
	}
	if err := p.alpha.ResumeIO(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the write was not released by resume-io")
	}
	// A handler that fences: writes go on after it.
	setRC(t, dir, "fence-peer", 0, fencePeerStonithed)
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	waitCall(t, dir, "fence-peer", 0, 2)
	if err := p.alpha.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if !peerOutdated(p.alpha) {
		t.Errorf("a STONITHed peer is not recorded as fenced")
	}
}
