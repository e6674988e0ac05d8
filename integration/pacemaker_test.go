//go:build integration

package integration

// A real two-node Pacemaker + Corosync cluster on this machine: nodes
// alpha and beta, each in its own network namespace (joined by veth) and
// its own mount, UTS, IPC and PID namespaces, with its own corosync and
// pacemaker state. testdata/pacemaker/node.sh is PID 1 of each node: it
// sets the node up and starts the nbdmirror daemon, corosync and
// pacemakerd there (there is no systemd). Killing that PID 1 kills the
// whole node at once: a node loss.

import (
	"bytes"
	"crypto/rand"
	"encoding/xml"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pcmkCluster is the two Pacemaker nodes sharing resource r0.
type pcmkCluster struct {
	t           *testing.T
	h           *hosts
	base        string
	conf        string // the nbdmirror configuration, the same file for both nodes
	ocfDir      string // extra OCF providers, overlaid on /usr/lib/ocf/resource.d in each node
	alpha, beta *pcmkNode
	dataSize    int64
}

// pcmkNode is one node. Each start is a new incarnation: fresh namespaces
// (but the same netns), the same disk, metadata and cluster state.
type pcmkNode struct {
	t       *testing.T
	c       *pcmkCluster
	name    string
	state   string // this node's /etc/corosync, /var/lib/pacemaker, ... and logs
	rn      *rnode // the nbdmirror CLI for this node, from the test's namespaces
	init    *proc  // unshare, whose child is the node's PID 1
	initPID int    // that PID 1, as the test's PID namespace numbers it
}

const pcmkCorosyncConf = `totem {
	version: 2
	cluster_name: nbdmirror-test
	transport: knet
	crypto_cipher: none
	crypto_hash: none
	token: 3000
}
logging {
	to_stderr: no
	to_syslog: no
	to_logfile: yes
	logfile: /var/log/corosync/corosync.log
	timestamp: on
}
quorum {
	provider: corosync_votequorum
	two_node: 1
}
nodelist {
	node {
		name: alpha
		nodeid: 1
		ring0_addr: %s
	}
	node {
		name: beta
		nodeid: 2
		ring0_addr: %s
	}
}
`

// newPcmkCluster writes r0's configuration (with opts, e.g. "net {
// protocol C; }"), creates the metadata on both disks and each node's
// corosync and pacemaker state. The nodes are not started.
func newPcmkCluster(t *testing.T, size int64, opts string) *pcmkCluster {
	t.Helper()
	needRoot(t)
	need(t, "corosync", "corosync-cfgtool", "pacemakerd", "crm_mon", "crm_attribute", "cibadmin", "nsenter",
		"unshare", "nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "mountpoint",
		"ocf-tester", "xmllint")
	h := newHosts(t)
	c := &pcmkCluster{t: t, h: h, base: t.TempDir()}
	c.conf = filepath.Join(c.base, "nbdmirror.conf")
	c.ocfDir = filepath.Join(c.base, "ocf")
	run(t, time.Minute, "cp", "-r", "testdata/pacemaker/ocf", c.ocfDir)
	mk := func(name, ns string) *pcmkNode {
		dir := filepath.Join(c.base, name)
		n := &pcmkNode{t: t, c: c, name: name, state: filepath.Join(dir, "state")}
		n.rn = &rnode{t: t, name: name, ns: ns, dir: dir, conf: c.conf, run_: filepath.Join(dir, "run")}
		os.MkdirAll(n.rn.run_, 0o755)
		n.rn.disk = sparseFile(t, dir, "d0", size)
		for _, d := range []string{"etc/corosync", "var/lib/corosync", "var/log/corosync", "log"} {
			os.MkdirAll(filepath.Join(n.state, d), 0o755)
		}
		// Owned as the packages own them (hacluster:haclient).
		run(t, time.Minute, "install", "-d", "-o", "hacluster", "-g", "haclient", "-m", "0770", filepath.Join(n.state, "var/log/pacemaker"))
		run(t, time.Minute, "install", "-d", "-o", "hacluster", "-g", "haclient", "-m", "0750", filepath.Join(n.state, "var/lib/pacemaker"))
		for _, d := range []string{"cib", "pengine", "blackbox", "cores"} {
			run(t, time.Minute, "install", "-d", "-o", "hacluster", "-g", "haclient", "-m", "0750", filepath.Join(n.state, "var/lib/pacemaker", d))
		}
		if err := os.WriteFile(filepath.Join(n.state, "etc/corosync/corosync.conf"), []byte(fmt.Sprintf(pcmkCorosyncConf, h.ipA, h.ipB)), 0o644); err != nil {
			t.Fatal(err)
		}
		return n
	}
	c.alpha, c.beta = mk("alpha", h.nsA), mk("beta", h.nsB)
	src := fmt.Sprintf("resource r0 {\n  %s\n"+
		"  on alpha { disk %s; meta-disk internal; address %s:7789; }\n"+
		"  on beta  { disk %s; meta-disk internal; address %s:7789; }\n}\n",
		opts, c.alpha.rn.disk, h.ipA, c.beta.rn.disk, h.ipB)
	if err := os.WriteFile(c.conf, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.nodes() {
		n.rn.must("create-md", "r0")
	}
	t.Cleanup(func() {
		for _, n := range c.nodes() {
			n.kill()
			n.checkLogs()
			if t.Failed() {
				n.dumpLogs()
			}
		}
	})
	return c
}

func (c *pcmkCluster) nodes() []*pcmkNode { return []*pcmkNode{c.alpha, c.beta} }

// byName is the node called name.
func (c *pcmkCluster) byName(name string) *pcmkNode {
	if name == "beta" {
		return c.beta
	}
	return c.alpha
}

// other is the node that is not n.
func (c *pcmkCluster) other(n *pcmkNode) *pcmkNode {
	if n == c.alpha {
		return c.beta
	}
	return c.alpha
}

// start boots the node: new namespaces, node.sh as their PID 1, which
// starts the nbdmirror daemon, corosync and pacemakerd. It returns once
// the daemon serves its control socket.
func (n *pcmkNode) start() {
	n.t.Helper()
	script, err := filepath.Abs("testdata/pacemaker/node.sh")
	if err != nil {
		n.t.Fatal(err)
	}
	env := []string{
		"PCMK_NODE=" + n.name, "PCMK_STATE=" + n.state, "PCMK_RUN=" + n.rn.run_, "PCMK_OCF=" + n.c.ocfDir,
		"NBDMIRROR=" + binary,
		"NBDMIRROR_ARGS=--config " + n.c.conf + " --node " + n.name + " --run-dir /run/nbdmirror --log-level debug",
		"NBDMIRROR_DAEMON_ARGS=", "NOTIFY_SOCKET=",
		// The agent runs the race-detector build too: without this, each
		// of its actions would sleep a second before it exits.
		"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"),
	}
	os.Remove(filepath.Join(n.state, "log", "pids"))
	run(n.t, time.Minute, "ip", "-n", n.rn.ns, "link", "set", n.dev(), "up") // after a power-off
	n.init = startEnv(n.t, env, "ip", "netns", "exec", n.rn.ns,
		"unshare", "--mount", "--uts", "--ipc", "--pid", "--kill-child", "--mount-proc", script)
	unsharePID := n.init.cmd.Process.Pid
	eventually(n.t, 20*time.Second, n.name+": the node's PID 1", func() (bool, string) {
		if n.init.exited() {
			n.t.Fatalf("%s: unshare exited: %v\n%s", n.name, n.init.err, n.init.out)
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", unsharePID, unsharePID))
		if err != nil {
			return false, err.Error()
		}
		f := strings.Fields(string(b))
		if len(f) != 1 {
			return false, fmt.Sprintf("children %q", b)
		}
		n.initPID, _ = strconv.Atoi(f[0])
		return n.initPID > 0, string(b)
	})
	waitUnix(n.t, n.init, filepath.Join(n.rn.run_, "control.sock"))
	eventually(n.t, 60*time.Second, n.name+": corosync and pacemakerd started", func() (bool, string) {
		if n.init.exited() {
			n.t.Fatalf("%s: the node stopped: %v\n%s", n.name, n.init.err, n.init.out)
		}
		b, _ := os.ReadFile(filepath.Join(n.state, "log", "pids"))
		return strings.Contains(string(b), "node "+n.name+" up"), string(b)
	})
}

// up reports whether the node runs.
func (n *pcmkNode) up() bool { return n.init != nil && !n.init.exited() }

// daemons returns the node's processes by command name (nbdmirror,
// corosync, pacemakerd, pacemaker-*), as host PIDs: every process in the
// PID namespace of its PID 1.
func (n *pcmkNode) daemons() map[string][]int {
	n.t.Helper()
	want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", n.initPID))
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	procs := map[string][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); err != nil || ns != want {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			continue
		}
		name := strings.TrimSpace(string(comm))
		procs[name] = append(procs[name], pid)
	}
	return procs
}

// dev is the node's end of the veth pair.
func (n *pcmkNode) dev() string {
	if n == n.c.alpha {
		return n.c.h.devA
	}
	return "vB" + strings.TrimPrefix(n.c.h.devA, "vA")
}

// loseNode kills the node at once: SIGKILL to its PID 1 kills every
// process of its PID namespace (the nbdmirror daemon, corosync,
// pacemakerd and its children) in the same moment. With powerOff, its
// link goes down first, as when a machine loses power: the peer gets no
// FIN or RST from the dead processes' sockets and must notice the loss by
// its own timeouts. It checks, by PID, that the daemon, corosync and
// pacemakerd are gone.
func (n *pcmkNode) loseNode(powerOff bool) {
	n.t.Helper()
	procs := n.daemons()
	var victims []int
	for _, name := range []string{"nbdmirror", "corosync", "pacemakerd"} {
		if len(procs[name]) == 0 {
			n.t.Fatalf("%s: no %s process before the node loss: %v", n.name, name, procs)
		}
		victims = append(victims, procs[name]...)
	}
	if powerOff {
		run(n.t, time.Minute, "ip", "-n", n.rn.ns, "link", "set", n.dev(), "down")
	}
	if err := syscall.Kill(n.initPID, syscall.SIGKILL); err != nil {
		n.t.Fatalf("%s: kill -9 %d: %v", n.name, n.initPID, err)
	}
	n.init.wait(30 * time.Second)
	eventually(n.t, 30*time.Second, n.name+": the node's processes gone", func() (bool, string) {
		for _, pid := range victims {
			if err := syscall.Kill(pid, 0); err == nil {
				return false, fmt.Sprintf("pid %d still exists", pid)
			}
		}
		return true, ""
	})
}

// kill stops the node if it runs (test cleanup).
func (n *pcmkNode) kill() {
	if n.up() {
		if n.initPID > 0 {
			syscall.Kill(n.initPID, syscall.SIGKILL)
		}
		n.init.signal(syscall.SIGKILL)
		<-n.init.done
	}
}

// in runs a command inside the node's namespaces.
func (n *pcmkNode) in(timeout time.Duration, args ...string) (string, error) {
	return tryRun(timeout, "nsenter", append([]string{"-t", strconv.Itoa(n.initPID), "-a", "--"}, args...)...)
}

func (n *pcmkNode) mustIn(args ...string) string {
	n.t.Helper()
	out, err := n.in(time.Minute, args...)
	if err != nil {
		n.t.Fatalf("%s: %s: %v\n%s", n.name, strings.Join(args, " "), err, out)
	}
	return out
}

// crmMon is the part of `crm_mon --output-as=xml` these tests read.
type crmMon struct {
	Nodes []struct {
		Name   string `xml:"name,attr"`
		Online bool   `xml:"online,attr"`
	} `xml:"nodes>node"`
	Clones []struct {
		ID        string   `xml:"id,attr"`
		Resources []crmRes `xml:"resource"`
	} `xml:"resources>clone"`
	Resources []crmRes `xml:"resources>resource"`
	Failures  []struct {
		OpKey    string `xml:"op_key,attr"`
		Node     string `xml:"node,attr"`
		ExitCode string `xml:"exitstatus,attr"`
		Reason   string `xml:"exitreason,attr"`
	} `xml:"failures>failure"`
}

type crmRes struct {
	ID     string `xml:"id,attr"`
	Role   string `xml:"role,attr"`
	Failed bool   `xml:"failed,attr"`
	Nodes  []struct {
		Name string `xml:"name,attr"`
	} `xml:"node"`
}

// pcmkView is what one node's Pacemaker says: which nodes are online,
// each node's role of the clone, where the file system runs.
type pcmkView struct {
	online   map[string]bool
	roles    map[string]string // node → Promoted, Unpromoted, Stopped ...
	fs       string            // the node where fs is Started
	failures []string
}

func (v pcmkView) String() string {
	return fmt.Sprintf("online %v, r0 %v, fs on %q, failures %v", v.online, v.roles, v.fs, v.failures)
}

// view asks the node's Pacemaker for the cluster state.
func (n *pcmkNode) view(clone, fs string) (pcmkView, error) {
	out, err := n.in(30*time.Second, "crm_mon", "-1", "--output-as=xml")
	if err != nil {
		return pcmkView{}, fmt.Errorf("crm_mon: %v: %s", err, out)
	}
	var m crmMon
	if err := xml.Unmarshal([]byte(out), &m); err != nil {
		return pcmkView{}, fmt.Errorf("crm_mon output: %v: %s", err, out)
	}
	v := pcmkView{online: map[string]bool{}, roles: map[string]string{}}
	for _, nd := range m.Nodes {
		v.online[nd.Name] = nd.Online
	}
	for _, cl := range m.Clones {
		if cl.ID != clone {
			continue
		}
		for _, r := range cl.Resources {
			for _, nd := range r.Nodes {
				v.roles[nd.Name] = r.Role
			}
		}
	}
	for _, r := range m.Resources {
		if r.ID == fs && r.Role == "Started" && len(r.Nodes) == 1 {
			v.fs = r.Nodes[0].Name
		}
	}
	for _, f := range m.Failures {
		v.failures = append(v.failures, fmt.Sprintf("%s on %s: exit %s %s", f.OpKey, f.Node, f.ExitCode, f.Reason))
	}
	return v, nil
}

// waitView polls the node's view until cond holds; it returns the view
// and how long it took.
func (n *pcmkNode) waitView(timeout time.Duration, what, clone, fs string, cond func(pcmkView) bool) (pcmkView, time.Duration) {
	n.t.Helper()
	begin := time.Now()
	var last pcmkView
	var lastErr error
	for time.Since(begin) < timeout {
		if !n.up() {
			n.t.Fatalf("%s stopped while waiting for %s: %v\n%s", n.name, what, n.init.err, n.init.out)
		}
		v, err := n.view(clone, fs)
		lastErr = err
		if err == nil {
			last = v
			if cond(v) {
				return v, time.Since(begin)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	n.t.Fatalf("%s: %s: not within %v: %s (%v)", n.name, what, timeout, last, lastErr)
	return last, 0
}

// checkLogs fails the test on a panic or data race in the node's daemon,
// or in the agent (whose output Pacemaker's executor logs).
func (n *pcmkNode) checkLogs() {
	for _, f := range []string{"log/nbdmirror.log", "var/log/pacemaker/pacemaker.log"} {
		b, _ := os.ReadFile(filepath.Join(n.state, f))
		if loc := forbidden.FindIndex(b); loc != nil {
			n.t.Errorf("%s: a panic or data race in %s:\n%s", n.name, f, tail(string(b[:min(len(b), loc[1]+8000)]), 80))
		}
	}
}

// logSince returns the state changes, warnings and errors in the node's
// daemon log from t on.
func (n *pcmkNode) logSince(t time.Time) string {
	b, _ := os.ReadFile(filepath.Join(n.state, "log", "nbdmirror.log"))
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		ts, _, ok := strings.Cut(strings.TrimPrefix(l, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if !ok || err != nil || at.Before(t) {
			continue
		}
		if strings.Contains(l, "( ") || strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") ||
			strings.Contains(l, "resync") || strings.Contains(l, "unclean") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// dumpLogs logs the end of the node's logs (after a failure).
func (n *pcmkNode) dumpLogs() {
	for _, f := range []string{"log/nbdmirror.log", "log/corosync.out", "log/pacemakerd.out"} {
		b, _ := os.ReadFile(filepath.Join(n.state, f))
		n.t.Logf("%s: %s:\n%s", n.name, f, tail(string(b), 40))
	}
	b, _ := os.ReadFile(filepath.Join(n.state, "var/log/pacemaker/pacemaker.log"))
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "error") || strings.Contains(l, "warning") || strings.Contains(l, "notice") ||
			strings.Contains(l, "nbdmirror") {
			lines = append(lines, l)
		}
	}
	n.t.Logf("%s: pacemaker.log (notices, warnings, errors):\n%s", n.name, tail(strings.Join(lines, "\n"), 80))
}

// cib runs a cibadmin or crm_attribute command on the node.
func (n *pcmkNode) cib(args ...string) {
	n.t.Helper()
	n.mustIn(args...)
}

// file is a path inside the node's mount namespace, as the test sees it.
func (n *pcmkNode) file(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", n.initPID, path)
}

// writeSync writes a file in the node's mount namespace and fsyncs it
// and its directory.
func (n *pcmkNode) writeSync(path string, data []byte) {
	n.t.Helper()
	p := n.file(path)
	f, err := os.Create(p)
	if err != nil {
		n.t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		n.t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		n.t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		n.t.Fatal(err)
	}
	d, err := os.Open(filepath.Dir(p))
	if err != nil {
		n.t.Fatal(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		n.t.Fatal(err)
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// sameBytes fails unless the file in the node's mount namespace holds want.
func (n *pcmkNode) sameBytes(path string, want []byte) {
	n.t.Helper()
	got, err := os.ReadFile(n.file(path))
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	if !bytes.Equal(got, want) {
		n.t.Fatalf("%s: %s: %d bytes that differ from the %d written", n.name, path, len(got), len(want))
	}
}

// boot starts both nodes and waits until each sees both online.
func (c *pcmkCluster) boot() {
	c.t.Helper()
	for _, n := range c.nodes() {
		n.start()
	}
	for _, n := range c.nodes() {
		n.waitView(2*time.Minute, "both nodes online", "", "", func(v pcmkView) bool {
			return v.online["alpha"] && v.online["beta"]
		})
	}
	// No fence device here: a lost node is taken for dead at once.
	c.alpha.cib("crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--update", "false")
	// The Promoted instance stays where it is when the lost node returns.
	c.alpha.cib("crm_attribute", "--type", "rsc_defaults", "--name", "resource-stickiness", "--update", "100")
}

// promotableXML is a promotable clone of one primitive, with a monitor
// per role.
func promotableXML(clone, id, class, provider, typ string, params map[string]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `<clone id="%s"><meta_attributes id="%[1]s-meta">`, clone)
	for i, kv := range [][2]string{{"promotable", "true"}, {"promoted-max", "1"}, {"promoted-node-max", "1"},
		{"clone-max", "2"}, {"clone-node-max", "1"}, {"notify", "true"}} {
		fmt.Fprintf(&b, `<nvpair id="%s-meta-%d" name="%s" value="%s"/>`, clone, i, kv[0], kv[1])
	}
	fmt.Fprintf(&b, `</meta_attributes><primitive id="%s" class="%s" provider="%s" type="%s">`, id, class, provider, typ)
	b.WriteString(instanceXML(id, params))
	fmt.Fprintf(&b, `<operations><op id="%[1]s-mon-p" name="monitor" interval="5s" role="Promoted" timeout="20s"/>`+
		`<op id="%[1]s-mon-u" name="monitor" interval="7s" role="Unpromoted" timeout="20s"/></operations>`, id)
	b.WriteString(`</primitive></clone>`)
	return b.String()
}

func instanceXML(id string, params map[string]string) string {
	if len(params) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<instance_attributes id="%s-params">`, id)
	for _, k := range slices.Sorted(maps.Keys(params)) {
		fmt.Fprintf(&b, `<nvpair id="%s-params-%s" name="%s" value="%s"/>`, id, k, k, params[k])
	}
	b.WriteString(`</instance_attributes>`)
	return b.String()
}

// pcmkFailoverBound is the longest a failover may take: from the kill -9
// of the Primary's node to the survivor Promoted with the file system
// mounted. Corosync needs up to its token timeout (3 s) and consensus
// (3.6 s) to declare the node lost; Pacemaker then computes the transition, promotes
// the survivor (nbdmirror primary) and starts the file system on it
// (nbdfuse, ext4 journal replay). Measured here: 6.7 to 9 s.
const pcmkFailoverBound = 45 * time.Second

const (
	pcmkClone = "ms-r0"
	pcmkFS    = "fs"
	pcmkMnt   = "/run/nbdfs/mnt" // where nbdfs mounts ext4 in each node's mount namespace
)

// installAgent installs ocf:nbdmirror:nbdmirror into the nodes' OCF
// providers: the shim of `make install` (dist/ocf/nbdmirror.in) with a
// copy of the binary under test in a directory anyone may read, as
// /usr/sbin (ocf-tester runs meta-data as nobody).
func (c *pcmkCluster) installAgent() {
	c.t.Helper()
	shim, err := os.ReadFile("../dist/ocf/nbdmirror.in")
	if err != nil {
		c.t.Fatalf("the OCF agent's shim: %v", err)
	}
	sbin, err := os.MkdirTemp("", "nbdmirror-pcmk-sbin-")
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { os.RemoveAll(sbin) })
	if err := os.Chmod(sbin, 0o755); err != nil {
		c.t.Fatal(err)
	}
	run(c.t, time.Minute, "install", "-m", "0755", binary, filepath.Join(sbin, "nbdmirror"))
	dir := filepath.Join(c.ocfDir, "nbdmirror")
	os.MkdirAll(dir, 0o755)
	agent := strings.ReplaceAll(string(shim), "@SBINDIR@", sbin)
	if err := os.WriteFile(filepath.Join(dir, "nbdmirror"), []byte(agent), 0o755); err != nil {
		c.t.Fatal(err)
	}
}

// prepare does what an administrator does before handing r0 to
// Pacemaker: both nodes up, the initial sync skipped (new disks), with
// mkfs an ext4 file system made on alpha's export, then both down again.
func (c *pcmkCluster) prepare(mkfs bool) {
	c.t.Helper()
	for _, n := range c.nodes() {
		n.rn.must("up", "r0")
	}
	for _, n := range c.nodes() {
		n.rn.must("wait-connect", "--timeout", "60s", "r0")
	}
	c.alpha.rn.must("new-current-uuid", "--clear-bitmap", "r0")
	c.beta.rn.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	c.alpha.rn.must("primary", "r0")
	c.dataSize = c.alpha.rn.status().SizeBytes
	if mkfs {
		c.mkfs()
	}
	c.alpha.rn.demote()
	for _, n := range c.nodes() {
		n.rn.must("down", "r0")
	}
}

// mkfs makes ext4 on alpha's export, with one file.
func (c *pcmkCluster) mkfs() {
	c.t.Helper()
	fs := mountNBD(c.t, filepath.Join(c.base, "mkfs"), c.alpha.rn.uri(), true)
	if err := os.WriteFile(filepath.Join(fs.mnt, "made-by-hand"), []byte("before Pacemaker\n"), 0o644); err != nil {
		c.t.Fatal(err)
	}
	fs.release(true)
}

// ocfTester runs ocf-tester on ocf:nbdmirror:nbdmirror in alpha's
// namespaces (r0 down on alpha, up on beta), before Pacemaker manages r0:
// meta-data against the DTD, validate-all, start, monitor, promote,
// demote, stop and their repetitions. r0 is down on both nodes again
// afterwards.
func (c *pcmkCluster) ocfTester() {
	c.t.Helper()
	need(c.t, "ocf-tester", "xmllint")
	c.beta.rn.must("up", "r0")
	out, err := c.alpha.in(5*time.Minute, "ocf-tester", "-v", "-n", "r0", "-o", "resource=r0", "-o", "config="+c.conf,
		"/usr/lib/ocf/resource.d/nbdmirror/nbdmirror")
	if err != nil || !strings.Contains(out, "passed all tests") {
		c.t.Fatalf("ocf-tester: %v\n%s", err, out)
	}
	c.t.Logf("ocf-tester: %s", tail(strings.TrimSpace(out), 1))
	if st := c.alpha.rn.status(); st.Disk != "Diskless" || st.Role != "Secondary" {
		c.t.Fatalf("alpha after ocf-tester: %+v", st)
	}
	c.beta.rn.must("down", "r0")
}

// configure hands r0 to Pacemaker: the promotable clone ms-r0 of
// ocf:nbdmirror:nbdmirror and, withFS, fs (ext4 on the export) with the
// Promoted instance, after its promotion.
func (c *pcmkCluster) configure(withFS bool) {
	c.t.Helper()
	n := c.alpha
	n.cib("cibadmin", "--create", "-o", "resources", "--xml-text",
		promotableXML(pcmkClone, "r0", "ocf", "nbdmirror", "nbdmirror", map[string]string{"resource": "r0", "config": c.conf}))
	if !withFS {
		return
	}
	// fs is created stopped, and started once its constraints are in.
	n.cib("cibadmin", "--create", "-o", "resources", "--xml-text",
		`<primitive id="fs" class="ocf" provider="nbdmirror-test" type="nbdfs">`+
			instanceXML("fs", map[string]string{"uri": "nbd+unix:///r0?socket=/run/nbdmirror/nbd.sock"})+
			`<meta_attributes id="fs-meta"><nvpair id="fs-meta-target-role" name="target-role" value="Stopped"/></meta_attributes>`+
			`<operations><op id="fs-mon" name="monitor" interval="5s" timeout="20s"/></operations></primitive>`)
	n.cib("cibadmin", "--create", "-o", "constraints", "--xml-text",
		`<rsc_colocation id="fs-with-promoted" score="INFINITY" rsc="fs" with-rsc="ms-r0" with-rsc-role="Promoted"/>`)
	n.cib("cibadmin", "--create", "-o", "constraints", "--xml-text",
		`<rsc_order id="fs-after-promote" kind="Mandatory" first="ms-r0" first-action="promote" then="fs" then-action="start"/>`)
	n.cib("crm_resource", "--resource", "fs", "--meta", "--set-parameter", "target-role", "--parameter-value", "Started")
}

// promoted is the node Pacemaker promoted ("" = none).
func (v pcmkView) promoted() string {
	for nd, r := range v.roles {
		if r == "Promoted" {
			return nd
		}
	}
	return ""
}

// serving: p is Promoted with the file system, the other node is
// Unpromoted.
func serving(p, other string) func(pcmkView) bool {
	return func(v pcmkView) bool {
		return v.promoted() == p && v.fs == p && v.roles[other] == "Unpromoted" && v.online[other]
	}
}

// TestPacemaker_Failover shows the failover story end to end under a real
// Pacemaker + Corosync cluster: ms-r0, the promotable clone of
// ocf:nbdmirror:nbdmirror (protocol C), and fs, ext4 on the Promoted
// node's export (nbdfuse + loop device) with it. Pacemaker promotes one
// node and mounts the file system there; a file is written and fsynced
// through it. That node is lost as in a power loss (its link down, then
// kill -9 of its PID 1: the nbdmirror daemon, corosync and pacemakerd die
// at once); within
// pcmkFailoverBound the survivor is Promoted with the file system mounted
// and the file intact. A second file is written there. The lost node is
// booted again (new namespaces, the same disk and metadata): Pacemaker
// starts it Unpromoted, it resyncs (Connected, UpToDate/UpToDate) and its
// disk equals the survivor's, which stays Promoted.
func TestPacemaker_Failover(t *testing.T) {
	c := newPcmkCluster(t, 64*mib, "net { protocol C; }")
	c.installAgent()
	c.boot()
	c.prepare(true)
	c.ocfTester()
	c.configure(true)

	v, took := c.alpha.waitView(2*time.Minute, "a node promoted with the file system", pcmkClone, pcmkFS, func(v pcmkView) bool {
		p := v.promoted()
		return p != "" && serving(p, c.other(c.byName(p)).name)(v)
	})
	primary := c.byName(v.promoted())
	survivor := c.other(primary)
	t.Logf("%s promoted, file system mounted, %v after the resources were configured", primary.name, took.Round(time.Millisecond))
	if st := primary.rn.status(); st.Role != "Primary" || st.Disk != "UpToDate" || st.PeerDisk != "UpToDate" {
		t.Fatalf("%s: Promoted, but nbdmirror says %+v", primary.name, st)
	}
	survivor.rn.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	primary.sameBytes(pcmkMnt+"/made-by-hand", []byte("before Pacemaker\n"))

	before := randomBytes(4*mib + 4321)
	primary.writeSync(pcmkMnt+"/before-loss.bin", before)

	begin := time.Now()
	primary.loseNode(true)
	v, _ = survivor.waitView(2*pcmkFailoverBound, "the survivor promoted with the file system", pcmkClone, pcmkFS, func(v pcmkView) bool {
		return !v.online[primary.name] && v.promoted() == survivor.name && v.fs == survivor.name
	})
	failover := time.Since(begin)
	t.Logf("failover: %s lost, %s Promoted with the file system mounted %v later", primary.name, survivor.name, failover.Round(time.Millisecond))
	t.Logf("%s's daemon since the loss:\n%s", survivor.name, survivor.logSince(begin))
	if failover > pcmkFailoverBound {
		t.Errorf("failover took %v, more than %v", failover, pcmkFailoverBound)
	}
	if st := survivor.rn.status(); st.Role != "Primary" || st.Disk != "UpToDate" {
		t.Fatalf("%s: Promoted, but nbdmirror says %+v", survivor.name, st)
	}
	survivor.sameBytes(pcmkMnt+"/before-loss.bin", before)
	after := randomBytes(3*mib + 1234)
	survivor.writeSync(pcmkMnt+"/after-loss.bin", after)

	// The repaired node comes back.
	lost := primary
	begin = time.Now()
	lost.start()
	v, _ = survivor.waitView(2*time.Minute, "the returned node Unpromoted", pcmkClone, pcmkFS, serving(survivor.name, lost.name))
	st := lost.rn.waitState(2*time.Minute, "Connected", "UpToDate", "UpToDate")
	t.Logf("rejoin: %s Unpromoted and resynced %v after its boot began", lost.name, time.Since(begin).Round(time.Millisecond))
	if st.Role != "Secondary" || st.PeerRole != "Primary" {
		t.Fatalf("%s after the rejoin: %+v", lost.name, st)
	}
	// It came back as a crashed Primary and was resynced from the survivor.
	logText, _ := os.ReadFile(filepath.Join(lost.state, "log", "nbdmirror.log"))
	i := strings.LastIndex(string(logText), "daemon ready")
	if i < 0 || !strings.Contains(string(logText[i:]), "SyncTarget") {
		t.Errorf("%s's daemon log shows no resync (SyncTarget) since its restart:\n%s", lost.name, tail(string(logText), 40))
	} else {
		var changes []string
		for _, l := range strings.Split(string(logText[i:]), "\n") {
			if strings.Contains(l, "( ") || strings.Contains(l, "unclean") || strings.Contains(l, "resync") {
				changes = append(changes, l)
			}
		}
		t.Logf("%s since its restart:\n%s", lost.name, strings.Join(changes, "\n"))
	}
	if len(v.failures) > 0 {
		t.Errorf("Pacemaker recorded failed actions: %v", v.failures)
	}
	survivor.mustIn("sync")
	eventually(t, 30*time.Second, "both disks hold the same data", func() (bool, string) {
		a, b := lost.rn.dataHash(c.dataSize), survivor.rn.dataHash(c.dataSize)
		return a == b, fmt.Sprintf("%s %s, %s %s", lost.name, a, survivor.name, b)
	})
	// The Promoted node and its file system stayed where they were.
	v, _ = survivor.waitView(10*time.Second, "still serving", pcmkClone, pcmkFS, serving(survivor.name, lost.name))
	survivor.sameBytes(pcmkMnt+"/after-loss.bin", after)
	t.Logf("crm_mon at the end:\n%s", survivor.mustIn("crm_mon", "-1"))
}

// TestPacemaker_FailoverProtocolA: a node loss (kill -9 alone: the
// survivor's daemon sees the sockets close) with protocol A,
// where a write is acknowledged once it is on the local disk and sent:
// the survivor may miss the last acknowledged writes, but what it has must
// be a consistent prefix of them. The sequence writer writes through the
// Primary's export (one write at a time) until the node is lost. Pacemaker
// promotes the survivor within pcmkFailoverBound; its disk holds a
// consistent prefix. The lost node comes back Unpromoted and is resynced
// from the survivor: what it had written locally but never sent is
// replaced (its activity log's extents), and both disks are equal.
func TestPacemaker_FailoverProtocolA(t *testing.T) {
	c := newPcmkCluster(t, 32*mib, "net { protocol A; }")
	c.installAgent()
	c.boot()
	c.prepare(false)
	c.configure(false)
	v, _ := c.alpha.waitView(2*time.Minute, "a node promoted", pcmkClone, "", func(v pcmkView) bool {
		return v.promoted() != "" && v.roles[c.other(c.byName(v.promoted())).name] == "Unpromoted"
	})
	primary := c.byName(v.promoted())
	survivor := c.other(primary)
	survivor.rn.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")

	w := newSeqWriter(t, c.dataSize)
	done := make(chan uint64, 1)
	go func() { done <- w.run(primary.rn, -1) }()
	eventually(t, time.Minute, "2000 acknowledged writes", func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.acked >= 2000, fmt.Sprint(w.acked)
	})
	begin := time.Now()
	primary.loseNode(false)
	acked := <-done
	survivor.waitView(2*pcmkFailoverBound, "the survivor promoted", pcmkClone, "", func(v pcmkView) bool {
		return !v.online[primary.name] && v.promoted() == survivor.name
	})
	failover := time.Since(begin)
	if failover > pcmkFailoverBound {
		t.Errorf("failover took %v, more than %v", failover, pcmkFailoverBound)
	}
	if st := survivor.rn.status(); st.Role != "Primary" || st.Disk != "UpToDate" {
		t.Fatalf("%s: Promoted, but nbdmirror says %+v", survivor.name, st)
	}
	s := w.check(survivor.rn)
	t.Logf("failover: %s lost, %s Promoted %v later; it holds the prefix up to write %d of %d acknowledged",
		primary.name, survivor.name, failover.Round(time.Millisecond), s, acked)
	if s == 0 {
		t.Fatalf("%s holds none of the %d acknowledged writes", survivor.name, acked)
	}

	lost := primary
	begin = time.Now()
	lost.start()
	survivor.waitView(2*time.Minute, "the returned node Unpromoted", pcmkClone, "", func(v pcmkView) bool {
		return v.promoted() == survivor.name && v.roles[lost.name] == "Unpromoted"
	})
	st := lost.rn.waitState(2*time.Minute, "Connected", "UpToDate", "UpToDate")
	if st.Role != "Secondary" || st.PeerRole != "Primary" {
		t.Fatalf("%s after the rejoin: %+v", lost.name, st)
	}
	t.Logf("rejoin: %s Unpromoted and resynced %v after its boot began", lost.name, time.Since(begin).Round(time.Millisecond))
	eventually(t, 30*time.Second, "both disks hold the same data", func() (bool, string) {
		a, b := lost.rn.dataHash(c.dataSize), survivor.rn.dataHash(c.dataSize)
		return a == b, fmt.Sprintf("%s %s, %s %s", lost.name, a, survivor.name, b)
	})
	if got := w.check(lost.rn); got != s {
		t.Errorf("%s after the resync holds the prefix up to write %d, the survivor %d", lost.name, got, s)
	}
}
