package main

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// st builds a state from its names: role, cstate, disk/peer disk.
func st(t *testing.T, role, cstate, disk, peerDisk string) ocfState {
	t.Helper()
	s, err := newOCFState(replicator.StatusJSON{Role: role, PeerRole: "Unknown", CState: cstate, Disk: disk, PeerDisk: peerDisk})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestOCF_StateMapping: each state's monitor exit code and promotion
// score (drbd.ocf's shape, with adjust_master_score's default and another
// set of numbers).
func TestOCF_StateMapping(t *testing.T) {
	const keep = -1 // the score is left alone
	const del = 0   // the score is deleted
	tests := []struct {
		role, cstate, disk, peerDisk string
		code                         int
		score                        int // with "0 10 1000 10000"
		score2                       int // with "5 20 300 4000"
	}{
		// Down: before up, after down.
		{"Secondary", "StandAlone", "Diskless", "DUnknown", ocfNotRunning, del, del},
		// Secondary.
		{"Secondary", "WFConnection", "UpToDate", "DUnknown", ocfSuccess, 1000, 300},
		{"Secondary", "StandAlone", "UpToDate", "DUnknown", ocfSuccess, 1000, 300},
		{"Secondary", "Connected", "UpToDate", "UpToDate", ocfSuccess, 10000, 4000},
		{"Secondary", "Connected", "UpToDate", "Inconsistent", ocfSuccess, 10000, 4000},
		{"Secondary", "SyncSource", "UpToDate", "Inconsistent", ocfSuccess, 10000, 4000},
		{"Secondary", "SyncTarget", "Inconsistent", "UpToDate", ocfSuccess, 10, 20},
		{"Secondary", "Connected", "Outdated", "UpToDate", ocfSuccess, 10, 20},
		{"Secondary", "Behind", "Outdated", "UpToDate", ocfSuccess, 10, 20},
		{"Secondary", "WFConnection", "Consistent", "DUnknown", ocfSuccess, del, 5},
		{"Secondary", "WFConnection", "Outdated", "DUnknown", ocfSuccess, del, del},
		{"Secondary", "WFConnection", "Inconsistent", "DUnknown", ocfSuccess, del, del},
		{"Secondary", "Connected", "Inconsistent", "Inconsistent", ocfSuccess, del, del},
		{"Secondary", "WFConnection", "Attaching", "DUnknown", ocfSuccess, keep, keep},
		{"Secondary", "WFConnection", "Negotiating", "DUnknown", ocfSuccess, keep, keep},
		{"Secondary", "StandAlone", "Failed", "DUnknown", ocfSuccess, del, del},
		// Primary.
		{"Primary", "WFConnection", "UpToDate", "DUnknown", ocfRunningMaster, 10000, 4000},
		{"Primary", "StandAlone", "UpToDate", "DUnknown", ocfRunningMaster, 10000, 4000},
		{"Primary", "Connected", "UpToDate", "UpToDate", ocfRunningMaster, 10000, 4000},
		{"Primary", "SyncSource", "UpToDate", "Inconsistent", ocfRunningMaster, 10000, 4000},
		{"Primary", "Ahead", "UpToDate", "Consistent", ocfRunningMaster, 10000, 4000},
		// A Primary without UpToDate data: failed, unless the connected
		// peer's data is.
		{"Primary", "StandAlone", "Failed", "DUnknown", ocfFailedMaster, del, del},
		{"Primary", "StandAlone", "Diskless", "DUnknown", ocfFailedMaster, del, del},
		{"Primary", "WFConnection", "Inconsistent", "DUnknown", ocfFailedMaster, del, del},
		{"Primary", "Connected", "Failed", "Inconsistent", ocfFailedMaster, del, del},
		{"Primary", "Connected", "Diskless", "UpToDate", ocfRunningMaster, 10, 20},
	}
	scores := [4]int{0, 10, 1000, 10000}
	scores2 := [4]int{5, 20, 300, 4000}
	for _, tc := range tests {
		name := fmt.Sprintf("%s %s %s/%s", tc.role, tc.cstate, tc.disk, tc.peerDisk)
		s := st(t, tc.role, tc.cstate, tc.disk, tc.peerDisk)
		if got := monitorCode(s); got != tc.code {
			t.Errorf("%s: monitor %d, want %d", name, got, tc.code)
		}
		for _, c := range []struct {
			scores [4]int
			want   int
		}{{scores, tc.score}, {scores2, tc.score2}} {
			score, k := promotionScore(s, c.scores)
			got := score
			if k {
				got = keep
			} else if score <= 0 {
				got = del
			}
			if got != c.want {
				t.Errorf("%s with %v: score %d (keep %v), want %d", name, c.scores, score, k, c.want)
			}
		}
	}
	if _, err := newOCFState(replicator.StatusJSON{Role: "Secondary", CState: "Bogus", Disk: "UpToDate", PeerDisk: "DUnknown"}); err == nil {
		t.Error("an unknown connection state was accepted")
	}
}

// TestOCF_MetaData: the meta-data parses, carries the DOCTYPE ocf-tester
// needs, and lists every parameter and action with the timeouts
// drbd.ocf advertises.
func TestOCF_MetaData(t *testing.T) {
	code, out, errOut := runMain(t, "ocf", "meta-data")
	if code != 0 || errOut != "" {
		t.Fatalf("ocf meta-data: exit %d: %s", code, errOut)
	}
	if !strings.HasPrefix(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE resource-agent SYSTEM \"ra-api-1.dtd\">\n<resource-agent ") {
		t.Errorf("meta-data does not start with the XML declaration and DOCTYPE:\n%.200s", out)
	}
	var md struct {
		Name       string `xml:"name,attr"`
		Version    string `xml:"version"`
		ShortDesc  string `xml:"shortdesc"`
		LongDesc   string `xml:"longdesc"`
		Parameters []struct {
			Name      string `xml:"name,attr"`
			Required  string `xml:"required,attr"`
			Unique    string `xml:"unique,attr"`
			ShortDesc string `xml:"shortdesc"`
			LongDesc  string `xml:"longdesc"`
			Content   struct {
				Type    string `xml:"type,attr"`
				Default string `xml:"default,attr"`
			} `xml:"content"`
		} `xml:"parameters>parameter"`
		Actions []struct {
			Name     string `xml:"name,attr"`
			Timeout  string `xml:"timeout,attr"`
			Interval string `xml:"interval,attr"`
			Role     string `xml:"role,attr"`
		} `xml:"actions>action"`
	}
	if err := xml.Unmarshal([]byte(out), &md); err != nil {
		t.Fatalf("meta-data is not XML: %v\n%s", err, out)
	}
	if md.Name != "nbdmirror" || md.Version != "1.0" || md.ShortDesc == "" || md.LongDesc == "" {
		t.Errorf("resource-agent name %q, version %q, descriptions %q / %q", md.Name, md.Version, md.ShortDesc, md.LongDesc)
	}
	wantParams := []string{
		"resource required=1 unique=1 string ",
		"config required=0 unique=0 string /etc/nbdmirror/nbdmirror.conf",
		"node required=0 unique=0 string ",
		"run_dir required=0 unique=0 string /run/nbdmirror",
		"wfc_timeout required=0 unique=0 integer 5",
		"adjust_master_score required=0 unique=0 string 0 10 1000 10000",
		"ignore_missing_notifications required=0 unique=0 boolean false",
	}
	var gotParams []string
	for _, p := range md.Parameters {
		gotParams = append(gotParams, fmt.Sprintf("%s required=%s unique=%s %s %s", p.Name, p.Required, p.Unique, p.Content.Type, p.Content.Default))
		if p.ShortDesc == "" || p.LongDesc == "" {
			t.Errorf("parameter %s lacks a description", p.Name)
		}
	}
	if !slices.Equal(gotParams, wantParams) {
		t.Errorf("parameters:\n%s\nwant:\n%s", strings.Join(gotParams, "\n"), strings.Join(wantParams, "\n"))
	}
	wantActions := []string{
		"start 240s", "promote 90s", "demote 90s", "notify 90s", "stop 100s",
		"monitor 20s interval=20s role=Slave", "monitor 20s interval=10s role=Master",
		"meta-data 5s", "validate-all 30s",
	}
	var gotActions []string
	for _, a := range md.Actions {
		s := a.Name + " " + a.Timeout
		if a.Interval != "" {
			s += " interval=" + a.Interval + " role=" + a.Role
		}
		gotActions = append(gotActions, s)
	}
	if !slices.Equal(gotActions, wantActions) {
		t.Errorf("actions:\n%s\nwant:\n%s", strings.Join(gotActions, "\n"), strings.Join(wantActions, "\n"))
	}
}

// TestOCF_Validation: bad parameters and clone meta attributes are
// OCF_ERR_CONFIGURED with a reason naming them; good ones pass.
func TestOCF_Validation(t *testing.T) {
	clone := map[string]string{"CRM_meta_clone_max": "2", "CRM_meta_clone_node_max": "1",
		"CRM_meta_promoted_max": "1", "CRM_meta_promoted_node_max": "1", "CRM_meta_notify": "true"}
	with := func(base map[string]string, kv ...string) map[string]string {
		m := map[string]string{"resource": "r0", "node": "alpha"}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	tests := []struct {
		name   string
		env    map[string]string
		reason string // "" = valid
	}{
		{"defaults", with(nil), ""},
		{"clone", with(clone), ""},
		{"legacy master-max", with(clone, "CRM_meta_promoted_max", "", "CRM_meta_master_max", "1", "CRM_meta_promoted_node_max", "", "CRM_meta_master_node_max", "1"), ""},
		{"all parameters", with(nil, "config", "/etc/x/y.conf", "run_dir", "/run/x", "wfc_timeout", "0", "adjust_master_score", "5 20 300 4000", "ignore_missing_notifications", "yes"), ""},
		{"wfc duration", with(nil, "wfc_timeout", "1500ms"), ""},
		{"no resource", with(nil, "resource", ""), "the required parameter resource is not set"},
		{"resource all", with(nil, "resource", "all"), "resource=all: name one resource"},
		{"resource chars", with(nil, "resource", "r0;reboot"), `resource="r0;reboot": only letters, digits and _ . + - are allowed`},
		{"resource dash", with(nil, "resource", "-r0"), `resource="-r0"`},
		{"node chars", with(nil, "node", "al pha"), `node="al pha": only letters`},
		{"relative config", with(nil, "config", "etc/nbdmirror.conf"), `config="etc/nbdmirror.conf": want an absolute path`},
		{"config chars", with(nil, "config", "/etc/$(reboot)"), `config="/etc/$(reboot)"`},
		{"run_dir chars", with(nil, "run_dir", "/run/a b"), `run_dir="/run/a b"`},
		{"wfc", with(nil, "wfc_timeout", "soon"), `wfc_timeout="soon": want a number of seconds`},
		{"wfc negative", with(nil, "wfc_timeout", "-1"), `wfc_timeout="-1"`},
		{"three scores", with(nil, "adjust_master_score", "0 10 1000"), "want four numbers"},
		{"negative score", with(nil, "adjust_master_score", "-5 10 1000 10000"), `"-5" is not a number from 0 to 1000000`},
		{"huge score", with(nil, "adjust_master_score", "0 10 1000 1000001"), `"1000001" is not a number`},
		{"bad bool", with(nil, "ignore_missing_notifications", "maybe"), `ignore_missing_notifications="maybe": want true or false`},
		{"clone-max 3", with(clone, "CRM_meta_clone_max", "3"), "clone-max=3: want at most 2"},
		{"clone-node-max 2", with(clone, "CRM_meta_clone_node_max", "2"), "clone-node-max=2: want clone-node-max=1"},
		{"promoted-max 2", with(clone, "CRM_meta_promoted_max", "2"), "promoted-max=2: want at most 1"},
		{"master-max 2", with(clone, "CRM_meta_promoted_max", "", "CRM_meta_master_max", "2"), "master-max=2: want at most 1"},
		{"promoted-node-max 2", with(clone, "CRM_meta_promoted_node_max", "2"), "promoted-node-max=2: want promoted-node-max=1"},
		{"bad number", with(clone, "CRM_meta_clone_node_max", "x"), `clone-node-max="x" is not a number`},
		{"notify false", with(clone, "CRM_meta_notify", "false"), "the clone needs notify=true"},
		{"notify unset", with(clone, "CRM_meta_notify", ""), "the clone needs notify=true"},
		{"notify ignored", with(clone, "CRM_meta_notify", "false", "ignore_missing_notifications", "true"), ""},
	}
	for _, tc := range tests {
		getenv := func(k string) string {
			if name, ok := strings.CutPrefix(k, "OCF_RESKEY_"); ok {
				return tc.env[name]
			}
			return ""
		}
		p, err := parseOCFParams(getenv)
		switch {
		case tc.reason == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.reason != "" && err == nil:
			t.Errorf("%s: accepted (%+v), want %q", tc.name, p, tc.reason)
		case tc.reason != "" && (err.code != ocfErrConfigured || !strings.Contains(err.reason, tc.reason)):
			t.Errorf("%s: %d %q, want %d %q", tc.name, err.code, err.reason, ocfErrConfigured, tc.reason)
		}
	}
	p, err := parseOCFParams(func(k string) string {
		return map[string]string{"OCF_RESKEY_resource": "r0", "OCF_RESKEY_wfc_timeout": "1500ms"}[k]
	})
	host, _ := os.Hostname()
	if err != nil || p.config != ocfDefaultConfig || p.runDir != ocfDefaultRunDir || p.node != host ||
		p.wfcTimeout != 1500*time.Millisecond || p.scores != [4]int{0, 10, 1000, 10000} {
		t.Errorf("defaults: %+v %v", p, err)
	}
}

// TestOCF_ConfigCheck: the resource must be in the configuration, with an
// `on` section for this node; else OCF_ERR_INSTALLED.
func TestOCF_ConfigCheck(t *testing.T) {
	_, conf := offlineSetup(t)
	bad := filepath.Join(t.TempDir(), "bad.conf")
	os.WriteFile(bad, []byte("resource r0 { frobnicate; }\n"), 0o644)
	tests := []struct {
		p      ocfParams
		peer   string
		reason string
	}{
		{ocfParams{resource: "r0", config: conf, node: "alpha"}, "beta", ""},
		{ocfParams{resource: "r1", config: conf, node: "beta"}, "alpha", ""},
		{ocfParams{resource: "r9", config: conf, node: "alpha"}, "", `no resource "r9" in ` + conf},
		{ocfParams{resource: "r0", config: conf, node: "gamma"}, "", "resource r0 has no 'on gamma' section"},
		{ocfParams{resource: "r0", config: "/nonexistent/nbdmirror.conf", node: "alpha"}, "", "/nonexistent/nbdmirror.conf"},
		{ocfParams{resource: "r0", config: bad, node: "alpha"}, "", bad + ":1:"},
	}
	for _, tc := range tests {
		peer, err := ocfConfigCheck(tc.p)
		switch {
		case tc.reason == "" && (err != nil || peer != tc.peer):
			t.Errorf("%+v: peer %q, %v; want %q", tc.p, peer, err, tc.peer)
		case tc.reason != "" && (err == nil || err.code != ocfErrInstalled || !strings.Contains(err.reason, tc.reason)):
			t.Errorf("%+v: %v, want exit %d %q", tc.p, err, ocfErrInstalled, tc.reason)
		}
	}
}

// fakeCrmAttribute writes a script that records its arguments, one call a
// line, and returns the script and the record's path.
func fakeCrmAttribute(t *testing.T, exit int) (script, record string) {
	t.Helper()
	dir := t.TempDir()
	script, record = filepath.Join(dir, "crm_attribute"), filepath.Join(dir, "calls")
	src := fmt.Sprintf("#!/bin/sh\necho \"$OCF_RESOURCE_INSTANCE $*\" >> %s\nexit %d\n", record, exit)
	if err := os.WriteFile(script, []byte(src), 0o755); err != nil {
		t.Fatal(err)
	}
	return script, record
}

// calls returns the calls recorded since the last look, and forgets them.
func calls(t *testing.T, record string) []string {
	t.Helper()
	b, err := os.ReadFile(record)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(record)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// ocfRun runs one action in-process with the environment env.
type ocfRun struct {
	t      *testing.T
	env    map[string]string
	record string
}

func (r *ocfRun) run(action string, kv ...string) (code int, reason, log string) {
	r.t.Helper()
	env := map[string]string{}
	for k, v := range r.env {
		env[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		env[kv[i]] = kv[i+1]
	}
	var out, errOut bytes.Buffer
	a := newOCFAgent(action, func(k string) string { return env[k] }, &out, &errOut, time.Now())
	a.promoteBackoff = 300 * time.Millisecond
	code, err := a.run(context.Background())
	if err != nil {
		oe, ok := err.(*ocfError)
		if !ok {
			r.t.Fatalf("%s: %v is not an *ocfError", action, err)
		}
		return oe.code, oe.reason, errOut.String()
	}
	return code, "", errOut.String()
}

// TestOCF_Agent drives the agent in-process through a resource's life
// with a daemon running in-process (one node, its peer absent), and
// without one; the scores go to a script that records them.
func TestOCF_Agent(t *testing.T) {
	d := startDaemon(t)
	crm, record := fakeCrmAttribute(t, 0)
	r := &ocfRun{t: t, record: record, env: map[string]string{
		"OCF_RESKEY_resource": "r0", "OCF_RESKEY_config": d.conf, "OCF_RESKEY_node": "alpha",
		"OCF_RESKEY_run_dir": d.runDir, "OCF_RESKEY_wfc_timeout": "0", "OCF_RESKEY_CRM_meta_interval": "20000",
		"OCF_RESKEY_CRM_meta_timeout": "20000", "OCF_RESOURCE_INSTANCE": "ms_r0", ocfCrmAttributeEnv: crm,
	}}
	const set, del = "ms_r0 --promotion -l reboot -v ", "ms_r0 --promotion -l reboot -D"
	steps := []struct {
		action string
		env    []string
		code   int
		reason string
		calls  []string
		cli    []string // then run this admin command
	}{
		{action: "validate-all", code: ocfSuccess},
		{action: "monitor", env: []string{"OCF_RESKEY_CRM_meta_interval", "0"}, code: ocfNotRunning}, // probe: score alone
		{action: "monitor", code: ocfNotRunning, calls: []string{del}},
		{action: "stop", code: ocfSuccess, calls: []string{del}},
		// Fresh metadata: Inconsistent, no peer: no score; promote refused.
		{action: "start", code: ocfSuccess, calls: []string{del}},
		{action: "monitor", code: ocfSuccess, calls: []string{del}},
		{action: "start", code: ocfSuccess, calls: []string{del}},
		{action: "promote", code: ocfErrGeneric, reason: "promote: r0: State change failed: (-2) Need access to UpToDate data", cli: []string{"primary", "--force", "r0"}},
		// primary --force: UpToDate Primary.
		{action: "monitor", code: ocfRunningMaster, calls: []string{set + "10000"}},
		{action: "promote", code: ocfSuccess, calls: []string{set + "10000"}},
		{action: "demote", code: ocfSuccess, calls: []string{set + "1000"}},
		{action: "demote", code: ocfSuccess, calls: []string{set + "1000"}},
		{action: "monitor", code: ocfSuccess, calls: []string{set + "1000"}},
		{action: "notify", env: []string{"OCF_RESKEY_CRM_meta_notify_type", "post", "OCF_RESKEY_CRM_meta_notify_operation", "start"},
			code: ocfSuccess, calls: []string{set + "1000"}, cli: []string{"disconnect", "r0"}},
		// StandAlone: a peer's start notification reconnects.
		{action: "notify", env: []string{"OCF_RESKEY_CRM_meta_notify_type", "pre", "OCF_RESKEY_CRM_meta_notify_operation", "start"}, code: ocfSuccess},
		{action: "reload", code: ocfErrUnimplemented, reason: `action "reload" is not implemented`},
		{action: "promote", code: ocfSuccess, calls: []string{set + "10000"}},
		// A probe with a configuration that cannot be read still sees
		// what the daemon runs (and leaves the score alone).
		{action: "monitor", env: []string{"OCF_RESKEY_config", "/nonexistent.conf", "OCF_RESKEY_CRM_meta_interval", "0"}, code: ocfRunningMaster},
		// Start of a Primary demotes it.
		{action: "start", code: ocfSuccess, calls: []string{set + "1000"}, cli: []string{"primary", "r0"}},
		{action: "stop", code: ocfSuccess, calls: []string{del}},
		{action: "monitor", code: ocfNotRunning, calls: []string{del}},
		{action: "stop", code: ocfSuccess, calls: []string{del}},
		// Stop with a broken configuration still stops.
		{action: "start", code: ocfSuccess, calls: []string{set + "1000"}},
		{action: "stop", env: []string{"OCF_RESKEY_config", "/nonexistent.conf", "OCF_RESKEY_wfc_timeout", "x"}, code: ocfSuccess, calls: []string{del}},
		{action: "monitor", code: ocfNotRunning, calls: []string{del}},
		{action: "stop", env: []string{"OCF_RESKEY_resource", "bad name"}, code: ocfSuccess},
		// Not this node's resource: a probe says not running, others fail.
		{action: "monitor", env: []string{"OCF_RESKEY_resource", "r9", "OCF_RESKEY_CRM_meta_interval", "0"}, code: ocfNotRunning},
		{action: "monitor", env: []string{"OCF_RESKEY_resource", "r9"}, code: ocfErrInstalled, reason: `no resource "r9" in`},
		{action: "start", env: []string{"OCF_RESKEY_node", "gamma"}, code: ocfErrInstalled, reason: "resource r0 has no 'on gamma' section"},
		{action: "start", env: []string{"OCF_RESKEY_node", "beta"}, code: ocfErrInstalled,
			reason: "serves r0 with the peer beta, but " + d.conf + " gives node beta the peer alpha"},
		{action: "start", env: []string{"OCF_RESKEY_resource", "r0;x"}, code: ocfErrConfigured, reason: `resource="r0;x"`},
		{action: "migrate_to", code: ocfErrUnimplemented, reason: `action "migrate_to" is not implemented`},
	}
	for i, s := range steps {
		code, reason, log := r.run(s.action, s.env...)
		if code != s.code || !strings.Contains(reason, s.reason) || (s.reason == "") != (reason == "") {
			t.Fatalf("step %d: %s %v: exit %d %q, want %d %q\n%s", i, s.action, s.env, code, reason, s.code, s.reason, log)
		}
		if got := calls(t, record); !slices.Equal(got, s.calls) {
			t.Fatalf("step %d: %s %v: crm_attribute calls %q, want %q\n%s", i, s.action, s.env, got, s.calls, log)
		}
		if s.cli != nil {
			d.must(s.cli...)
		}
	}

	// Without the daemon: monitor says not running, stop succeeds,
	// validation, start and promote name the run dir and the unit.
	d.stop()
	for _, s := range []struct {
		action string
		code   int
		reason string
	}{
		{"monitor", ocfNotRunning, ""},
		{"stop", ocfSuccess, ""},
		{"demote", ocfSuccess, ""},
		{"notify", ocfSuccess, ""},
		{"validate-all", ocfErrInstalled, "the nbdmirror daemon does not answer at " + filepath.Join(d.runDir, "control.sock") + ": start nbdmirror.service"},
		{"start", ocfErrInstalled, "start nbdmirror.service"},
		{"promote", ocfErrGeneric, "start nbdmirror.service"},
	} {
		code, reason, log := r.run(s.action)
		if code != s.code || !strings.Contains(reason, s.reason) {
			t.Errorf("no daemon: %s: exit %d %q, want %d %q\n%s", s.action, code, reason, s.code, s.reason, log)
		}
		calls(t, record)
	}
}

// TestOCF_NoCluster: crm_attribute failing as it does without a cluster
// (exit 102), or missing, or without OCF_RESOURCE_INSTANCE, is logged and
// the action goes on.
func TestOCF_NoCluster(t *testing.T) {
	d := startDaemon(t)
	notConnected, record := fakeCrmAttribute(t, crmNotConnected)
	broken, _ := fakeCrmAttribute(t, 1)
	base := map[string]string{"OCF_RESKEY_resource": "r0", "OCF_RESKEY_config": d.conf, "OCF_RESKEY_node": "alpha",
		"OCF_RESKEY_run_dir": d.runDir, "OCF_RESKEY_wfc_timeout": "0", "OCF_RESOURCE_INSTANCE": "r0"}
	tests := []struct {
		env []string
		log string
	}{
		{[]string{ocfCrmAttributeEnv, notConnected}, `msg="no cluster is running: promotion score not recorded" ocf=start resource=r0 score=delete`},
		{[]string{ocfCrmAttributeEnv, filepath.Join(t.TempDir(), "crm_attribute")}, `msg="recording the promotion score failed"`},
		{[]string{ocfCrmAttributeEnv, "nbdmirror-no-such-crm_attribute"}, `msg="crm_attribute is not installed: promotion score not recorded"`},
		{[]string{ocfCrmAttributeEnv, broken}, `msg="recording the promotion score failed" ocf=start resource=r0 score=delete err="exit status 1"`},
		{[]string{ocfCrmAttributeEnv, notConnected, "OCF_RESOURCE_INSTANCE", ""}, `msg="no OCF_RESOURCE_INSTANCE (not run by Pacemaker): promotion score not recorded"`},
	}
	for _, tc := range tests {
		r := &ocfRun{t: t, env: base}
		code, reason, log := r.run("start", tc.env...)
		if code != ocfSuccess || !strings.Contains(log, tc.log) {
			t.Errorf("%v: start: exit %d %q, want 0 and a log with %q:\n%s", tc.env, code, reason, tc.log, log)
		}
		if code, _, log := r.run("stop", tc.env...); code != ocfSuccess {
			t.Errorf("%v: stop: exit %d\n%s", tc.env, code, log)
		}
	}
	if got := calls(t, record); len(got) != 2 {
		t.Errorf("the crm_attribute that exits 102 ran %d times, want 2 (start, stop): %q", len(got), got)
	}
}

// TestOCF_Exit: through the command line, a failure's reason carries
// OCF_EXIT_REASON_PREFIX; answers (not running) do not.
func TestOCF_Exit(t *testing.T) {
	run := func(env map[string]string, args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		m := &Main{Stdout: &out, Stderr: &errOut, Getenv: func(k string) string { return env[k] }}
		code := m.Run(context.Background(), append([]string{"nbdmirror", "ocf"}, args...))
		return code, out.String(), errOut.String()
	}
	code, _, errOut := run(nil, "start")
	if code != ocfErrConfigured || errOut != "ocf-exit-reason:the required parameter resource is not set (the nbdmirror resource name)\n" {
		t.Errorf("start without resource: %d %q", code, errOut)
	}
	code, _, errOut = run(map[string]string{"OCF_EXIT_REASON_PREFIX": "REASON: ", "OCF_RESKEY_resource": "r0;"}, "validate-all")
	if code != ocfErrConfigured || !strings.HasPrefix(errOut, "REASON: resource=\"r0;\"") {
		t.Errorf("validate-all with a bad name: %d %q", code, errOut)
	}
	code, out, _ := run(nil, "usage")
	if code != 0 || !strings.HasPrefix(out, "usage: nbdmirror ocf {start|stop|promote|demote|monitor|notify|validate-all|meta-data|usage}") {
		t.Errorf("usage: %d %q", code, out)
	}
	if code, _, errOut = run(nil); code != ocfErrArgs || !strings.Contains(errOut, "ocf-exit-reason:expected one action") {
		t.Errorf("no action: %d %q", code, errOut)
	}
	code, _, errOut = run(map[string]string{"OCF_RESKEY_resource": "r0", "OCF_RESKEY_config": "/nonexistent.conf",
		"OCF_RESKEY_node": "alpha", "OCF_RESKEY_CRM_meta_interval": "0"}, "monitor")
	if code != ocfNotRunning || errOut != "r0: not running\n" {
		t.Errorf("probe without config: %d %q (progress lines only with HA_debug=1)", code, errOut)
	}
	code, _, errOut = run(map[string]string{"OCF_RESKEY_resource": "r0", "OCF_RESKEY_config": "/nonexistent.conf",
		"OCF_RESKEY_node": "alpha", "OCF_RESKEY_CRM_meta_interval": "0", "HA_debug": "1"}, "monitor")
	if code != ocfNotRunning || !strings.Contains(errOut, "level=INFO msg=\"probe: the resource is not configured for this node\"") || !strings.HasSuffix(errOut, "\nr0: not running\n") {
		t.Errorf("probe without config, HA_debug=1: %d %q", code, errOut)
	}
}

// TestOCF_HeldOpen: while an NBD client holds the Primary's export, stop
// and demote retry the refusal until the action's timeout, then fail with
// it (Pacemaker escalates; the agent does not pretend); once the client
// is gone, both succeed.
func TestOCF_HeldOpen(t *testing.T) {
	d := startDaemon(t)
	crm, record := fakeCrmAttribute(t, 0)
	r := &ocfRun{t: t, record: record, env: map[string]string{
		"OCF_RESKEY_resource": "r0", "OCF_RESKEY_config": d.conf, "OCF_RESKEY_node": "alpha",
		"OCF_RESKEY_run_dir": d.runDir, "OCF_RESKEY_wfc_timeout": "0", "OCF_RESKEY_CRM_meta_timeout": "2500",
		"OCF_RESOURCE_INSTANCE": "r0", ocfCrmAttributeEnv: crm,
	}}
	if code, reason, log := r.run("start"); code != ocfSuccess {
		t.Fatalf("start: %d %q\n%s", code, reason, log)
	}
	d.must("primary", "--force", "r0")
	conn, err := nbdGo(t, filepath.Join(d.runDir, "nbd.sock"), "r0")
	if err != nil {
		t.Fatal(err)
	}
	// The server counts a client once it enters transmission, a moment
	// after the client's negotiation has ended.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if strings.Contains(d.must("status", "--json", "r0"), `"clients": [`+"\n") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon never counted the NBD client:\n%s", d.must("status", "--json", "r0"))
		}
	}
	for _, action := range []string{"stop", "demote"} {
		began := time.Now()
		code, reason, log := r.run(action)
		took := time.Since(began)
		if code != ocfErrGeneric || !strings.Contains(reason, "r0 still") || !strings.Contains(reason, "at the timeout") ||
			!strings.Contains(reason, "(-12) Device is held open by someone (1 NBD client") || took < 2*time.Second || took > 5*time.Second {
			t.Errorf("%s while held open: exit %d after %v: %q\n%s", action, code, took, reason, log)
		}
	}
	calls(t, record)
	conn.Close()
	// The daemon sees the client go a moment later: the retries wait.
	r.env["OCF_RESKEY_CRM_meta_timeout"] = "20000"
	if code, reason, log := r.run("demote"); code != ocfSuccess {
		t.Fatalf("demote: %d %q\n%s", code, reason, log)
	}
	if code, reason, log := r.run("stop"); code != ocfSuccess {
		t.Fatalf("stop: %d %q\n%s", code, reason, log)
	}
	if got := calls(t, record); !slices.Equal(got, []string{"r0 --promotion -l reboot -v 1000", "r0 --promotion -l reboot -D"}) {
		t.Errorf("scores: %q", got)
	}
}

// TestOCF_CompletionActions: the bash completion offers after `ocf`
// exactly the actions the meta-data advertises, and usage.
func TestOCF_CompletionActions(t *testing.T) {
	var want []string
	for _, a := range ocfMetaData().Actions {
		want = append(want, a.Name)
	}
	want = append(want, "usage")
	slices.Sort(want)
	want = slices.Compact(want)
	got := strings.Fields(positionalWords["ocf"])
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("completion offers %v after ocf, the meta-data's actions are %v", got, want)
	}
}
