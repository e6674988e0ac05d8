//go:build integration

package integration

// The two-node harness: nodes alpha and beta in two network namespaces
// joined by veth, each with its own disk, metadata, run-dir and daemon
// (started inside its namespace, stopped by PID). Admin verbs reach each
// daemon over its control socket and NBD clients use its Unix socket,
// both from the test's own namespace.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rnode is one node of a cluster.
type rnode struct {
	t                     *testing.T
	name, ns              string
	dir, disk, conf, run_ string
	d                     *proc
}

// cluster is alpha (in h.nsA) and beta (in h.nsB) sharing one resource r0.
type cluster struct {
	t            *testing.T
	h            *hosts
	alpha, beta  *rnode
	size         int64
	dataSize     int64 // the data area, without the internal metadata
	resourceConf string
}

// newCluster writes r0's configuration (net and disk options from opts,
// e.g. "net { protocol C; }") for two disks of size bytes, creates the
// metadata on both and starts both daemons.
func newCluster(t *testing.T, size int64, opts string) *cluster {
	t.Helper()
	return newClusterWith(t, size, func(string) string { return opts }, nil)
}

// newClusterDisks is newCluster with some nodes' disks given: disks maps a
// node's name to the path of its disk (of size bytes), made by the test,
// and "NAME:meta" to the path of its external metadata (else internal).
func newClusterDisks(t *testing.T, size int64, opts string, disks map[string]string) *cluster {
	t.Helper()
	return newClusterWith(t, size, func(string) string { return opts }, disks)
}

// newClusterEach is newCluster with options of each node's own (opts of
// its name): certificates, a different secret. resourceConf is alpha's.
func newClusterEach(t *testing.T, size int64, opts func(node string) string) *cluster {
	t.Helper()
	return newClusterWith(t, size, opts, nil)
}

// newClusterWith is the cluster of node options opts and disks (as
// newClusterDisks's).
func newClusterWith(t *testing.T, size int64, opts func(node string) string, disks map[string]string) *cluster {
	t.Helper()
	need(t, "nbdinfo")
	h := newHosts(t)
	c := &cluster{t: t, h: h, size: size}
	base := t.TempDir()
	mk := func(name, ns string) *rnode {
		dir := filepath.Join(base, name)
		os.MkdirAll(dir, 0o755)
		disk := disks[name]
		if disk == "" {
			disk = sparseFile(t, dir, "d0", size)
		}
		return &rnode{t: t, name: name, ns: ns, dir: dir, disk: disk,
			conf: filepath.Join(dir, "nbdmirror.conf"), run_: filepath.Join(dir, "run")}
	}
	meta := func(name string) string {
		if m := disks[name+":meta"]; m != "" {
			return m
		}
		return "internal"
	}
	c.alpha, c.beta = mk("alpha", h.nsA), mk("beta", h.nsB)
	conf := func(node string) string {
		return fmt.Sprintf("resource r0 {\n  %s\n"+
			"  on alpha { disk %s; meta-disk %s; address %s:7789; }\n"+
			"  on beta  { disk %s; meta-disk %s; address %s:7789; }\n}\n",
			opts(node), c.alpha.disk, meta("alpha"), h.ipA, c.beta.disk, meta("beta"), h.ipB)
	}
	c.resourceConf = conf("alpha")
	for _, n := range c.nodes() {
		if err := os.WriteFile(n.conf, []byte(conf(n.name)), 0o644); err != nil {
			t.Fatal(err)
		}
		n.must("create-md", "r0")
		n.start()
	}
	t.Cleanup(func() {
		for _, n := range c.nodes() {
			if n.d != nil && !n.d.exited() {
				n.d.stop(syscall.SIGKILL)
			}
			if t.Failed() && n.d != nil {
				t.Logf("%s daemon log:\n%s", n.name, tail(n.d.out.String(), 60))
			}
		}
	})
	return c
}

func (c *cluster) nodes() []*rnode { return []*rnode{c.alpha, c.beta} }

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// start runs the node's daemon inside its namespace.
func (n *rnode) start() {
	n.t.Helper()
	args := []string{"netns", "exec", n.ns, binary, "--config", n.conf, "--node", n.name, "--run-dir", n.run_,
		"--log-level", "debug", "daemon"}
	n.d = startEnv(n.t, []string{"NOTIFY_SOCKET="}, "ip", args...)
	waitUnix(n.t, n.d, filepath.Join(n.run_, "control.sock"))
}

// kill stops the daemon with SIGKILL (a crash).
func (n *rnode) kill() {
	n.t.Helper()
	n.d.stop(syscall.SIGKILL)
}

func (n *rnode) sock() string { return filepath.Join(n.run_, "nbd.sock") }
func (n *rnode) uri() string  { return "nbd+unix:///r0?socket=" + n.sock() }

// cli runs an nbdmirror command for this node: exit code, stdout, stderr.
func (n *rnode) cli(args ...string) (int, string, string) {
	n.t.Helper()
	return runCLI(n.t, 3*time.Minute, append([]string{"--config", n.conf, "--node", n.name, "--run-dir", n.run_}, args...))
}

func (n *rnode) must(args ...string) string {
	n.t.Helper()
	code, out, errOut := n.cli(args...)
	if code != 0 {
		n.t.Fatalf("%s: nbdmirror %s: exit %d: %s%s", n.name, strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// rstatus is the part of `status --json` (and of each `events` line)
// these tests read.
type rstatus struct {
	Event          string `json:"event"` // events only: exists, change
	Role           string `json:"role"`
	PeerRole       string `json:"peer_role"`
	CState         string `json:"cstate"`
	Disk           string `json:"disk"`
	PeerDisk       string `json:"peer_disk"`
	SizeBytes      int64  `json:"size_bytes"`
	OutOfSyncBytes uint64 `json:"out_of_sync_bytes"`
	Counters       struct {
		NS uint64 `json:"ns"` // KiB sent to the peer
		NR uint64 `json:"nr"`
		DW uint64 `json:"dw"` // KiB written to the disk
		DR uint64 `json:"dr"`
		LO int64  `json:"lo"` // requests on the local disk
		PE int64  `json:"pe"` // requests sent to the peer, not yet answered
		AP int64  `json:"ap"` // application requests in the resource
	} `json:"counters"`
	UUIDs struct {
		Current string `json:"current"`
		Bitmap  string `json:"bitmap"`
	} `json:"uuids"`
}

func (n *rnode) status() rstatus {
	n.t.Helper()
	out := n.must("status", "--json", "r0")
	var st []rstatus
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 {
		n.t.Fatalf("%s: status --json: %v\n%s", n.name, err, out)
	}
	return st[0]
}

// waitState waits, reading the node's `events --now` stream, until its
// connection and disk states are the given ones ("" = any). It fails at
// the deadline, on a ProtocolError in the stream, and on a panic, data
// race or protocol error in the daemon's log.
func (n *rnode) waitState(timeout time.Duration, cstate, disk, peerDisk string) rstatus {
	n.t.Helper()
	n.checkLog()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd, sc := n.events(ctx)
	defer cmd.Wait()
	defer cancel()
	var last rstatus
	seen := 0
	for sc.Scan() {
		var st rstatus
		if err := json.Unmarshal(sc.Bytes(), &st); err != nil {
			n.t.Fatalf("%s: events: %v: %s", n.name, err, sc.Text())
		}
		if st.Event == "overflow" {
			n.t.Fatalf("%s: events: %s", n.name, sc.Text())
		}
		seen++
		last = st
		if st.CState == "ProtocolError" {
			n.t.Fatalf("%s: ProtocolError in the event stream: %s", n.name, sc.Text())
		}
		if (cstate == "" || st.CState == cstate) && (disk == "" || st.Disk == disk) && (peerDisk == "" || st.PeerDisk == peerDisk) {
			n.checkLog()
			return st
		}
	}
	n.checkLog()
	n.t.Fatalf("%s: %s %s/%s: not within %v (%d events, the last %+v)", n.name, cstate, disk, peerDisk, timeout, seen, last)
	return last
}

// events starts the node's `events --now` stream, ended with ctx; the
// caller waits for the command.
func (n *rnode) events(ctx context.Context) (*exec.Cmd, *bufio.Scanner) {
	n.t.Helper()
	cmd := exec.CommandContext(ctx, binary, "--config", n.conf, "--node", n.name, "--run-dir", n.run_, "events", "--now", "r0")
	cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	return cmd, sc
}

// checkLog fails the test on a panic, a data race or a protocol error.
func (n *rnode) checkLog() {
	n.t.Helper()
	if n.d == nil {
		return
	}
	out := n.d.out.String()
	for _, bad := range []string{"panic:", "DATA RACE", "ProtocolError"} {
		if strings.Contains(out, bad) {
			n.t.Fatalf("%s: %q in the daemon's output:\n%s", n.name, bad, tail(out, 80))
		}
	}
}

// dataHash returns the sha256 of the first size bytes of the node's disk
// (the data, without the internal metadata).
func (n *rnode) dataHash(size int64) string {
	n.t.Helper()
	f, err := os.Open(n.disk)
	if err != nil {
		n.t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, size)); err != nil {
		n.t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// writeAt writes data at off through the node's export (NBD WRITE, then
// FLUSH) and closes the connection.
func (n *rnode) writeAt(off int64, data []byte) {
	n.t.Helper()
	rc := dialNBD(n.t, n.sock(), "r0")
	defer rc.c.Close()
	rc.send(n.t, 1, 1, uint64(off), uint32(len(data)), data)
	if e := rc.reply(n.t, 1); e != 0 {
		n.t.Fatalf("%s: NBD write of %d bytes at %d: error %d", n.name, len(data), off, e)
	}
	rc.send(n.t, 3, 2, 0, 0, nil) // NBD_CMD_FLUSH
	if e := rc.reply(n.t, 2); e != 0 {
		n.t.Fatalf("%s: NBD flush: error %d", n.name, e)
	}
}

// upBoth brings r0 up on both nodes and waits for the connection.
func (c *cluster) upBoth() {
	c.t.Helper()
	for _, n := range c.nodes() {
		n.must("up", "r0")
	}
	for _, n := range c.nodes() {
		n.must("wait-connect", "--timeout", "60s", "r0")
	}
}

// initialSync makes alpha Primary with --force and waits for the full sync.
func (c *cluster) initialSync() {
	c.t.Helper()
	c.upBoth()
	c.alpha.must("primary", "--force", "r0")
	c.beta.must("wait-sync", "--timeout", "5m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.dataSize = c.alpha.status().SizeBytes
	if c.dataSize <= 0 {
		c.t.Fatalf("alpha reports size %d", c.dataSize)
	}
}

// skipInitialSync brings both nodes up, declares their fresh disks equal
// (new-current-uuid --clear-bitmap on alpha) and makes alpha Primary.
func (c *cluster) skipInitialSync() {
	c.t.Helper()
	c.upBoth()
	c.alpha.must("new-current-uuid", "--clear-bitmap", "r0")
	c.beta.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	c.alpha.must("primary", "r0")
	c.dataSize = c.alpha.status().SizeBytes
}

// sameData fails unless both disks hold the same data (the size agreed
// is recorded at the initial sync).
func (c *cluster) sameData() {
	c.t.Helper()
	for _, n := range c.nodes() {
		n.checkLog()
	}
	size := c.dataSize
	a, b := c.alpha.dataHash(size), c.beta.dataHash(size)
	if a != b {
		c.t.Fatalf("the disks differ: alpha %s, beta %s", a, b)
	}
}

// demote runs secondary, retrying while an NBD client that just left is
// still counted (its connection's end is seen a moment after it exits).
func (n *rnode) demote() {
	n.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, out, errOut := n.cli("secondary", "r0")
		if code == 0 {
			return
		}
		if !strings.Contains(errOut, "held open") || time.Now().After(deadline) {
			n.t.Fatalf("%s: secondary: exit %d: %s%s", n.name, code, out, errOut)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
