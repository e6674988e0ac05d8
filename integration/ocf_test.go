//go:build integration

package integration

// The Pacemaker resource agent as Pacemaker runs it: `nbdmirror ocf
// ACTION` with OCF_RESKEY_* parameters, against real daemons (two nodes in
// two network namespaces), with a crm_attribute that records the
// promotion scores; and the installed agent under resource-agents'
// ocf-tester, with no cluster at all.

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ocfAgent runs the agent for one node of a cluster.
type ocfAgent struct {
	t      *testing.T
	n      *rnode
	record string // the recording crm_attribute's calls
	env    []string
}

func newOCFAgent(t *testing.T, n *rnode) *ocfAgent {
	t.Helper()
	dir := t.TempDir()
	script, record := filepath.Join(dir, "crm_attribute"), filepath.Join(dir, "calls")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$*\" >> "+record+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return &ocfAgent{t: t, n: n, record: record, env: []string{
		"OCF_ROOT=/usr/lib/ocf", "OCF_RESOURCE_INSTANCE=r0", "NBDMIRROR_OCF_CRM_ATTRIBUTE=" + script,
		"OCF_RESKEY_resource=r0", "OCF_RESKEY_config=" + n.conf, "OCF_RESKEY_node=" + n.name,
		"OCF_RESKEY_run_dir=" + n.run_, "OCF_RESKEY_wfc_timeout=30",
		// A promotable clone as the README configures it.
		"OCF_RESKEY_CRM_meta_clone_max=2", "OCF_RESKEY_CRM_meta_clone_node_max=1",
		"OCF_RESKEY_CRM_meta_promoted_max=1", "OCF_RESKEY_CRM_meta_promoted_node_max=1",
		"OCF_RESKEY_CRM_meta_notify=true", "OCF_RESKEY_CRM_meta_interval=10000", "OCF_RESKEY_CRM_meta_timeout=90000",
	}}
}

// run runs one action (extra environment last, so it wins) and returns
// its exit code, stderr and duration.
func (a *ocfAgent) run(action string, env ...string) (int, string, time.Duration) {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "ocf", action)
	cmd.Env = append(append(append(os.Environ(), "GORACE=atexit_sleep_ms=0"), a.env...), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	began := time.Now()
	err := cmd.Run()
	took := time.Since(began)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, stderr.String(), took
	case errors.As(err, &ee) && ctx.Err() == nil:
		return ee.ExitCode(), stderr.String(), took
	}
	a.t.Fatalf("%s: nbdmirror ocf %s: %v\n%s", a.n.name, action, err, stderr.String())
	return -1, "", took
}

// scores returns the crm_attribute calls since the last look.
func (a *ocfAgent) scores() []string {
	a.t.Helper()
	b, err := os.ReadFile(a.record)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		a.t.Fatal(err)
	}
	os.Remove(a.record)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// TestOCF_Cluster drives the real agent on two nodes through a
// resource's life as Pacemaker would: probes, start (the second start
// connects), a promotion refused without UpToDate data (after drbd.ocf's
// 15 s against a tight loop), both UpToDate, promote, a promotion refused
// while the peer is Primary (retried until the timeout), switchover,
// stop of a Primary, stop again, a reconnect on the peer's start
// notification, and the daemon gone. Each action's exit code and the
// promotion scores it records are checked.
func TestOCF_Cluster(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; }")
	alpha, beta := newOCFAgent(t, c.alpha), newOCFAgent(t, c.beta)
	const del = "--promotion -l reboot -D"
	set := func(n int) string { return fmt.Sprintf("--promotion -l reboot -v %d", n) }
	type step struct {
		a      *ocfAgent
		action string
		env    []string
		code   int
		reason string   // in stderr
		scores []string // crm_attribute calls
	}
	do := func(steps ...step) {
		t.Helper()
		for _, s := range steps {
			code, stderr, took := s.a.run(s.action, s.env...)
			got := s.a.scores()
			if code != s.code || !strings.Contains(stderr, s.reason) || !slices.Equal(got, s.scores) {
				t.Fatalf("%s: ocf %s %v: exit %d after %v, scores %q; want %d with %q, scores %q\n%s",
					s.a.n.name, s.action, s.env, code, took.Round(time.Millisecond), got, s.code, s.reason, s.scores, stderr)
			}
		}
	}
	probe := []string{"OCF_RESKEY_CRM_meta_interval=0"}
	do(
		step{a: alpha, action: "monitor", env: probe, code: 7},
		step{a: beta, action: "monitor", env: probe, code: 7},
		step{a: alpha, action: "validate-all", code: 0},
		// alpha alone: it waits wfc_timeout for the peer, then starts.
		step{a: alpha, action: "start", env: []string{"OCF_RESKEY_wfc_timeout=1"}, code: 0,
			reason: "not connected to the peer yet: going on (wfc_timeout)", scores: []string{del}},
		step{a: beta, action: "start", code: 0, scores: []string{del}},
		step{a: alpha, action: "monitor", code: 0, scores: []string{del}},
		step{a: beta, action: "monitor", env: probe, code: 0, scores: []string{del}},
	)
	if st := c.beta.status(); st.CState != "Connected" || st.Disk != "Inconsistent" || st.PeerDisk != "Inconsistent" {
		t.Fatalf("beta after start: %+v", st)
	}
	// Two new disks: neither has UpToDate data.
	code, stderr, took := alpha.run("promote")
	if code != 1 || !strings.Contains(stderr, "ocf-exit-reason:promote: r0: State change failed: (-2) Need access to UpToDate data") ||
		took < 14*time.Second || took > 40*time.Second {
		t.Fatalf("promote without UpToDate data: exit %d after %v (want 1 after about 15 s)\n%s", code, took, stderr)
	}
	alpha.scores()

	c.alpha.must("new-current-uuid", "--clear-bitmap", "r0")
	c.alpha.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	c.beta.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	do(
		step{a: alpha, action: "monitor", code: 0, scores: []string{set(10000)}},
		step{a: beta, action: "monitor", code: 0, scores: []string{set(10000)}},
		step{a: alpha, action: "promote", code: 0, scores: []string{set(10000)}},
		step{a: alpha, action: "promote", code: 0, scores: []string{set(10000)}},
		step{a: alpha, action: "monitor", code: 8, scores: []string{set(10000)}},
		step{a: beta, action: "monitor", code: 0, scores: []string{set(10000)}},
	)
	c.dataSize = c.alpha.status().SizeBytes
	c.alpha.writeAt(1*mib, bytes.Repeat([]byte("ocf!"), 4096))
	// beta cannot be promoted while alpha is Primary: retried until the
	// timeout (4.5 s of 5), then failed.
	code, stderr, took = beta.run("promote", "OCF_RESKEY_CRM_meta_timeout=5000")
	if code != 1 || !strings.Contains(stderr, "ocf-exit-reason:promote: r0: State change failed: (-1) Multiple primaries not allowed") ||
		took < 4*time.Second || took > 8*time.Second {
		t.Fatalf("promote while the peer is Primary: exit %d after %v (want 1 after 4.5 s)\n%s", code, took, stderr)
	}
	beta.scores()
	// Switchover.
	do(
		step{a: alpha, action: "demote", code: 0, scores: []string{set(10000)}},
		step{a: alpha, action: "demote", code: 0, scores: []string{set(10000)}},
		step{a: alpha, action: "monitor", code: 0, scores: []string{set(10000)}},
		step{a: beta, action: "promote", code: 0, scores: []string{set(10000)}},
		step{a: beta, action: "monitor", code: 8, scores: []string{set(10000)}},
		step{a: alpha, action: "notify", env: []string{"OCF_RESKEY_CRM_meta_notify_type=post", "OCF_RESKEY_CRM_meta_notify_operation=promote"},
			code: 0, scores: []string{set(10000)}},
		// Stop of a Primary demotes it first; alpha loses its peer.
		step{a: beta, action: "stop", code: 0, scores: []string{del}},
		step{a: beta, action: "monitor", code: 7, scores: []string{del}},
		step{a: beta, action: "stop", code: 0, scores: []string{del}},
		step{a: beta, action: "demote", code: 0},
	)
	c.sameData()
	c.alpha.waitState(30*time.Second, "WFConnection", "UpToDate", "DUnknown")
	do(step{a: alpha, action: "monitor", code: 0, scores: []string{set(1000)}})
	// alpha gave up connecting (StandAlone): beta's start notification
	// makes it connect again.
	c.alpha.must("disconnect", "r0")
	do(
		step{a: alpha, action: "notify", env: []string{"OCF_RESKEY_CRM_meta_notify_type=pre", "OCF_RESKEY_CRM_meta_notify_operation=start"}, code: 0},
		step{a: beta, action: "start", code: 0, scores: []string{set(10000)}},
	)
	c.alpha.waitState(30*time.Second, "Connected", "UpToDate", "UpToDate")
	do(step{a: alpha, action: "notify", env: []string{"OCF_RESKEY_CRM_meta_notify_type=post", "OCF_RESKEY_CRM_meta_notify_operation=start"},
		code: 0, scores: []string{set(10000)}})
	if st := c.alpha.status(); st.CState != "Connected" || st.Role != "Secondary" {
		t.Fatalf("alpha after beta's start: %+v", st)
	}

	// beta's daemon dies: its resource is not running, stop succeeds,
	// start and validation fail naming the socket and the unit.
	c.beta.kill()
	sock := filepath.Join(c.beta.run_, "control.sock")
	noDaemon := "ocf-exit-reason:the nbdmirror daemon does not answer at " + sock + ": start nbdmirror.service"
	do(
		step{a: beta, action: "monitor", env: probe, code: 7},
		step{a: beta, action: "monitor", code: 7, scores: []string{del}},
		step{a: beta, action: "stop", code: 0, scores: []string{del}},
		step{a: beta, action: "start", code: 5, reason: noDaemon},
		step{a: beta, action: "validate-all", code: 5, reason: noDaemon},
		step{a: alpha, action: "stop", code: 0, scores: []string{del}},
		step{a: alpha, action: "stop", code: 0, scores: []string{del}},
		step{a: alpha, action: "monitor", code: 7, scores: []string{del}},
	)
	// A resource this node's configuration lacks: probes say not running,
	// everything else is not installed here; a bad parameter is a
	// configuration error.
	do(
		step{a: alpha, action: "monitor", env: []string{"OCF_RESKEY_resource=r7", "OCF_RESKEY_CRM_meta_interval=0"}, code: 7},
		step{a: alpha, action: "start", env: []string{"OCF_RESKEY_resource=r7"}, code: 5, reason: `ocf-exit-reason:no resource "r7" in ` + c.alpha.conf},
		step{a: alpha, action: "start", env: []string{"OCF_RESKEY_CRM_meta_promoted_max=2"}, code: 6, reason: "ocf-exit-reason:clone meta attribute promoted-max=2"},
		step{a: alpha, action: "stop", env: []string{"OCF_RESKEY_CRM_meta_notify=false"}, code: 0, scores: []string{del}},
	)
}

// TestOCF_Tester runs resource-agents' ocf-tester on the agent `make
// install` installs, against a real resource of one node (its peer
// absent), in a network namespace of its own so that no cluster can be
// reached: every promotion score is logged as not recorded, and the
// agent passes every test.
func TestOCF_Tester(t *testing.T) {
	needRoot(t) // ocf-tester checks the permissions as nobody
	need(t, "/usr/sbin/ocf-tester", "xmllint", "crm_attribute", "unshare", "make")
	if _, err := os.Stat("/usr/share/resource-agents/ra-api-1.dtd"); err != nil {
		unavailable(t, "needs resource-agents' ra-api-1.dtd: %v", err)
	}
	root := t.TempDir()
	// nobody must reach the agent and the binary (t.TempDir is 0700).
	for d := root; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	prefix := filepath.Join(root, "usr")
	if out, err := exec.Command("make", "-C", "..", "install", "PREFIX="+prefix).CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	agent := filepath.Join(prefix, "lib/ocf/resource.d/nbdmirror/nbdmirror")

	n := newNode(t, 16*mib, 7)
	d := n.daemon(nil)
	defer d.stop(syscall.SIGTERM)
	// UpToDate data, so that the tester's promotions succeed; then down,
	// as the tester expects to find the resource stopped or to stop it.
	n.must("up", "r0")
	n.must("primary", "--force", "r0")
	n.must("down", "r0")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--net", "/usr/sbin/ocf-tester", "-v", "-n", "r0",
		"-o", "resource=r0", "-o", "config="+n.conf, "-o", "node=alpha", "-o", "run_dir="+n.runDir,
		"-o", "wfc_timeout=1", agent)
	cmd.Env = append(os.Environ(), "OCF_ROOT=/usr/lib/ocf")
	began := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("ocf-tester took %v", time.Since(began).Round(time.Millisecond))
	if err != nil || !strings.Contains(string(out), agent+" passed all tests") {
		t.Fatalf("ocf-tester: %v\n%s", err, out)
	}
	for _, want := range []string{
		`msg="no cluster is running: promotion score not recorded" ocf=start resource=r0 score=1000`,
		`msg="no cluster is running: promotion score not recorded" ocf=promote resource=r0 score=10000`,
		`msg="no cluster is running: promotion score not recorded" ocf=stop resource=r0 score=delete`,
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("ocf-tester's output lacks %q:\n%s", want, out)
		}
	}
	if st := n.status(); st.Role != "Secondary" || st.Disk != "Diskless" || st.CState != "StandAlone" {
		t.Errorf("after ocf-tester: %+v, want the resource down", st)
	}
}

// TestOCF_ShimWithoutBinary: the installed shim whose nbdmirror binary is
// gone answers a probe "not running", a stop or demote "stopped" when no
// daemon listens (a failed stop gets the node fenced) and "failed" when
// one does, and anything else "not installed", with a reason.
func TestOCF_ShimWithoutBinary(t *testing.T) {
	src, err := os.ReadFile("../dist/ocf/nbdmirror.in")
	if err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "sbin")
	shim := filepath.Join(t.TempDir(), "nbdmirror")
	if err := os.WriteFile(shim, bytes.ReplaceAll(src, []byte("@SBINDIR@"), []byte(missing)), 0o755); err != nil {
		t.Fatal(err)
	}
	idle, live := t.TempDir(), t.TempDir()
	l, err := net.Listen("unix", filepath.Join(live, "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, tc := range []struct {
		action   string
		interval string
		runDir   string
		code     int
	}{
		{"monitor", "0", idle, 7},
		{"monitor", "10000", idle, 5},
		{"start", "0", idle, 5},
		{"stop", "0", idle, 0},
		{"demote", "0", idle, 0},
		{"stop", "0", live, 1},
		{"demote", "0", live, 1},
		{"meta-data", "0", idle, 5},
	} {
		cmd := exec.Command(shim, tc.action)
		cmd.Env = append(os.Environ(), "OCF_RESKEY_CRM_meta_interval="+tc.interval, "OCF_EXIT_REASON_PREFIX=why:",
			"OCF_RESKEY_run_dir="+tc.runDir)
		out, err := cmd.CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.code || string(out) != "why:"+missing+"/nbdmirror is not installed\n" {
			t.Errorf("%s (interval %s, run dir %s): exit %d %q, want exit %d", tc.action, tc.interval, tc.runDir, code, out, tc.code)
		}
	}
}

// graphAction is an action of a Pacemaker transition graph (crm_simulate
// -G): a resource operation, a pseudo-event or a cluster event.
type graphAction struct {
	ID   string `xml:"id,attr"`
	Key  string `xml:"operation_key,attr"`
	Node string `xml:"on_node,attr"`
}

type transitionGraph struct {
	Synapses []struct {
		Actions struct {
			List []graphAction `xml:",any"`
		} `xml:"action_set"`
		Inputs struct {
			Triggers []struct {
				List []graphAction `xml:",any"`
			} `xml:"trigger"`
		} `xml:"inputs"`
	} `xml:"synapse"`
}

// TestOCF_PacemakerConfig checks the README's cibadmin configuration with
// Pacemaker's own tools, without a cluster: crm_verify accepts it, and the
// scheduler (crm_simulate) promotes the node with the higher promotion
// score, starts the other, and starts the file system on the promoted node
// only after the promotion; with no score anywhere (two Inconsistent
// disks) it promotes nothing and leaves the file system stopped; a score
// of 0 is promoted, which is why the agent deletes the score instead.
func TestOCF_PacemakerConfig(t *testing.T) {
	need(t, "crm_verify", "crm_simulate")
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n### Running with Pacemaker\n")
	section, _, _ = strings.Cut(section, "\n### ")
	parts := map[string]string{}
	for _, m := range regexp.MustCompile(`(?s)cibadmin --create -o (resources|constraints) --xml-text '([^']*)'`).FindAllStringSubmatch(section, -1) {
		parts[m[1]] += m[2]
	}
	if !strings.Contains(parts["resources"], `<clone id="r0-clone">`) || !strings.Contains(parts["constraints"], "<rsc_order") {
		t.Fatalf("no cibadmin configuration in the README's Running with Pacemaker:\n%q", parts)
	}
	cib := func(alpha, beta string) string {
		attr := func(id, v string) string {
			if v == "" {
				return ""
			}
			return fmt.Sprintf(`<transient_attributes id="%[1]s"><instance_attributes id="status-%[1]s">`+
				`<nvpair id="status-%[1]s-master-r0" name="master-r0" value="%[2]s"/></instance_attributes></transient_attributes>`, id, v)
		}
		return `<cib have-quorum="1" dc-uuid="1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0"><configuration>
<crm_config><cluster_property_set id="options"><nvpair id="options-stonith" name="stonith-enabled" value="false"/></cluster_property_set></crm_config>
<nodes><node id="1" uname="alpha"/><node id="2" uname="beta"/></nodes>
<resources>` + parts["resources"] + `</resources>
<constraints>` + parts["constraints"] + `</constraints>
</configuration><status>
<node_state id="1" uname="alpha" in_ccm="true" crmd="online" join="member" expected="member">` + attr("1", alpha) + `</node_state>
<node_state id="2" uname="beta" in_ccm="true" crmd="online" join="member" expected="member">` + attr("2", beta) + `</node_state>
</status></cib>`
	}
	dir := t.TempDir()
	tests := []struct {
		alpha, beta string // promotion scores ("" = none)
		promoted    string // "" = nobody
	}{
		{"10000", "1000", "alpha"}, // UpToDate and connected / peer unknown
		{"10", "10000", "beta"},    // SyncTarget / SyncSource
		{"1000", "", "alpha"},      // only alpha has UpToDate data
		{"", "", ""},               // two Inconsistent disks
		{"0", "", "alpha"},         // a score of 0 is promoted
	}
	for i, tc := range tests {
		file := filepath.Join(dir, fmt.Sprintf("cib%d.xml", i))
		if err := os.WriteFile(file, []byte(cib(tc.alpha, tc.beta)), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("crm_verify", "--xml-file", file).CombinedOutput(); err != nil || len(out) != 0 {
			t.Fatalf("crm_verify: %v\n%s", err, out)
		}
		graphFile := filepath.Join(dir, fmt.Sprintf("graph%d.xml", i))
		if out, err := exec.Command("crm_simulate", "--xml-file", file, "--save-graph", graphFile).CombinedOutput(); err != nil {
			t.Fatalf("crm_simulate: %v\n%s", err, out)
		}
		b, err := os.ReadFile(graphFile)
		if err != nil {
			t.Fatal(err)
		}
		var g transitionGraph
		if err := xml.Unmarshal(b, &g); err != nil {
			t.Fatalf("transition graph: %v\n%s", err, b)
		}
		deps := map[string][]string{} // action id → the ids it waits for
		var promote, fsStart graphAction
		starts := map[string]bool{}
		for _, s := range g.Synapses {
			for _, a := range s.Actions.List {
				for _, tr := range s.Inputs.Triggers {
					for _, in := range tr.List {
						deps[a.ID] = append(deps[a.ID], in.ID)
					}
				}
				switch {
				case regexp.MustCompile(`^r0:\d+_promote_0$`).MatchString(a.Key):
					promote = a
				case regexp.MustCompile(`^r0:\d+_start_0$`).MatchString(a.Key):
					starts[a.Node] = true
				case a.Key == "fs_r0_start_0":
					fsStart = a
				}
			}
		}
		var after func(id, target string, seen map[string]bool) bool
		after = func(id, target string, seen map[string]bool) bool {
			if id == target {
				return true
			}
			if seen[id] {
				return false
			}
			seen[id] = true
			for _, d := range deps[id] {
				if after(d, target, seen) {
					return true
				}
			}
			return false
		}
		name := fmt.Sprintf("scores alpha %q beta %q", tc.alpha, tc.beta)
		switch {
		case !starts["alpha"] || !starts["beta"]:
			t.Errorf("%s: r0 started on %v, want both nodes", name, starts)
		case promote.Node != tc.promoted:
			t.Errorf("%s: promoted on %q, want %q", name, promote.Node, tc.promoted)
		case tc.promoted == "" && fsStart.ID != "":
			t.Errorf("%s: fs_r0 starts on %s with nothing promoted", name, fsStart.Node)
		case tc.promoted != "" && (fsStart.Node != tc.promoted || !after(fsStart.ID, promote.ID, map[string]bool{})):
			t.Errorf("%s: fs_r0 starts on %q (want %s), after the promotion: %v", name, fsStart.Node, tc.promoted,
				after(fsStart.ID, promote.ID, map[string]bool{}))
		}
	}
}
