package main

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// OCF exit codes (resource-agents' ocf-returncodes).
const (
	ocfSuccess          = 0
	ocfErrGeneric       = 1
	ocfErrArgs          = 2
	ocfErrUnimplemented = 3
	ocfErrPerm          = 4
	ocfErrInstalled     = 5
	ocfErrConfigured    = 6
	ocfNotRunning       = 7
	ocfRunningMaster    = 8
	ocfFailedMaster     = 9
)

// ocfError is an action's failure: its OCF exit code and the reason
// Pacemaker shows (crm_mon's "exit-reason").
type ocfError struct {
	code   int
	reason string
}

func (e *ocfError) Error() string { return e.reason }

func ocfErrorf(code int, format string, args ...any) *ocfError {
	return &ocfError{code: code, reason: fmt.Sprintf(format, args...)}
}

// ocfParams are the agent's instance parameters (OCF_RESKEY_*).
type ocfParams struct {
	resource string
	config   string
	node     string
	runDir   string
	// wfcTimeout is how long start waits for the peer connection.
	wfcTimeout time.Duration
	// scores are adjust_master_score: the promotion scores of a disk
	// that is only Consistent, of one that is not UpToDate while the
	// peer's is, of an UpToDate disk whose peer is unknown, and of an
	// UpToDate disk that is Primary or knows its peer's disk.
	scores                     [4]int
	ignoreMissingNotifications bool
}

// Parameter defaults, as the meta-data advertises them.
const (
	ocfDefaultConfig = "/etc/nbdmirror/nbdmirror.conf"
	ocfDefaultRunDir = "/run/nbdmirror"
	ocfDefaultWFC    = "5"
	ocfDefaultScores = "0 10 1000 10000"
	// ocfMaxScore is Pacemaker's INFINITY.
	ocfMaxScore = 1000000
)

var (
	// ocfNameRE whitelists resource and node names before they go into a
	// request path or a command line.
	ocfNameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$`)
	// ocfPathRE whitelists the config and run_dir paths.
	ocfPathRE = regexp.MustCompile(`^/[A-Za-z0-9_./+@:-]*$`)
)

// ocfResourceName checks the resource parameter alone: stop needs it even
// when the rest of the configuration is wrong.
func ocfResourceName(getenv func(string) string) (string, *ocfError) {
	name := getenv("OCF_RESKEY_resource")
	switch {
	case name == "":
		return "", ocfErrorf(ocfErrConfigured, "the required parameter resource is not set (the nbdmirror resource name)")
	case name == "all":
		return "", ocfErrorf(ocfErrConfigured, "resource=all: name one resource; one cluster resource manages one nbdmirror resource")
	case !ocfNameRE.MatchString(name):
		return "", ocfErrorf(ocfErrConfigured, "resource=%q: only letters, digits and _ . + - are allowed", name)
	}
	return name, nil
}

// ocfRunDir returns the run_dir parameter, or its default when it is
// unset or invalid (stop still reaches the daemon then).
func ocfRunDir(getenv func(string) string) (string, *ocfError) {
	dir := getenv("OCF_RESKEY_run_dir")
	if dir == "" {
		return ocfDefaultRunDir, nil
	}
	if !ocfPathRE.MatchString(dir) {
		return ocfDefaultRunDir, ocfErrorf(ocfErrConfigured, "run_dir=%q: want an absolute path of letters, digits and _ . / + @ : -", dir)
	}
	return dir, nil
}

// parseOCFParams reads and checks the parameters and, when the agent runs
// as a clone, the clone's meta attributes. Every error is
// OCF_ERR_CONFIGURED: the resource definition is wrong, on every node.
func parseOCFParams(getenv func(string) string) (ocfParams, *ocfError) {
	var p ocfParams
	var err *ocfError
	if p.resource, err = ocfResourceName(getenv); err != nil {
		return p, err
	}
	if p.runDir, err = ocfRunDir(getenv); err != nil {
		return p, err
	}
	p.config = getenv("OCF_RESKEY_config")
	if p.config == "" {
		p.config = ocfDefaultConfig
	}
	if !ocfPathRE.MatchString(p.config) {
		return p, ocfErrorf(ocfErrConfigured, "config=%q: want an absolute path of letters, digits and _ . / + @ : -", p.config)
	}
	p.node = getenv("OCF_RESKEY_node")
	if p.node == "" {
		h, herr := os.Hostname()
		if herr != nil {
			return p, ocfErrorf(ocfErrConfigured, "cannot read the host name (%v): set the parameter node", herr)
		}
		p.node = h
	}
	if !ocfNameRE.MatchString(p.node) {
		return p, ocfErrorf(ocfErrConfigured, "node=%q: only letters, digits and _ . + - are allowed (set the parameter node to this node's name in the config)", p.node)
	}
	wfc := getenv("OCF_RESKEY_wfc_timeout")
	if wfc == "" {
		wfc = ocfDefaultWFC
	}
	if p.wfcTimeout, err = parseOCFSeconds("wfc_timeout", wfc); err != nil {
		return p, err
	}
	scores := getenv("OCF_RESKEY_adjust_master_score")
	if scores == "" {
		scores = ocfDefaultScores
	}
	if p.scores, err = parseOCFScores(scores); err != nil {
		return p, err
	}
	if v := getenv("OCF_RESKEY_ignore_missing_notifications"); v != "" {
		b, ok := ocfBool(v)
		if !ok {
			return p, ocfErrorf(ocfErrConfigured, "ignore_missing_notifications=%q: want true or false", v)
		}
		p.ignoreMissingNotifications = b
	}
	return p, checkOCFCloneMeta(getenv, p.ignoreMissingNotifications)
}

// parseOCFSeconds reads a number of seconds, or a Go duration ("1500ms").
func parseOCFSeconds(name, v string) (time.Duration, *ocfError) {
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, ocfErrorf(ocfErrConfigured, "%s=%q: want a number of seconds", name, v)
	}
	return d, nil
}

func parseOCFScores(v string) ([4]int, *ocfError) {
	var s [4]int
	f := strings.Fields(v)
	if len(f) != 4 {
		return s, ocfErrorf(ocfErrConfigured, "adjust_master_score=%q: want four numbers (default %q)", v, ocfDefaultScores)
	}
	for i, w := range f {
		n, err := strconv.Atoi(w)
		if err != nil || n < 0 || n > ocfMaxScore {
			return s, ocfErrorf(ocfErrConfigured, "adjust_master_score=%q: %q is not a number from 0 to %d", v, w, ocfMaxScore)
		}
		s[i] = n
	}
	return s, nil
}

// ocfBool reads a boolean as ocf-shellfuncs' ocf_is_true does (and its
// false values).
func ocfBool(v string) (value, ok bool) {
	switch strings.ToLower(v) {
	case "yes", "true", "1", "on":
		return true, true
	case "no", "false", "0", "off":
		return false, true
	}
	return false, false
}

// checkOCFCloneMeta checks the clone's meta attributes when Pacemaker runs
// the agent as a clone (it then passes clone-max): two nodes at most, one
// instance per node, one Primary (nbdmirror never has two), and
// notifications on.
func checkOCFCloneMeta(getenv func(string) string, ignoreMissingNotifications bool) *ocfError {
	if getenv("OCF_RESKEY_CRM_meta_clone_max") == "" {
		return nil // not a clone: ocf-tester, or another manager running the agent
	}
	meta := func(names ...string) (string, string) {
		for _, n := range names {
			if v := getenv("OCF_RESKEY_CRM_meta_" + n); v != "" {
				return strings.ReplaceAll(n, "_", "-"), v
			}
		}
		return "", ""
	}
	checks := []struct {
		names []string
		max   int
		exact bool
	}{
		{[]string{"clone_max"}, 2, false},
		{[]string{"clone_node_max"}, 1, true},
		{[]string{"promoted_max", "master_max"}, 1, false},
		{[]string{"promoted_node_max", "master_node_max"}, 1, true},
	}
	for _, c := range checks {
		name, v := meta(c.names...)
		if v == "" {
			continue
		}
		n, err := strconv.Atoi(v)
		switch {
		case err != nil:
			return ocfErrorf(ocfErrConfigured, "clone meta attribute %s=%q is not a number", name, v)
		case c.exact && n != c.max:
			return ocfErrorf(ocfErrConfigured, "clone meta attribute %s=%d: want %s=%d", name, n, name, c.max)
		case !c.exact && n > c.max:
			return ocfErrorf(ocfErrConfigured, "clone meta attribute %s=%d: want at most %d (nbdmirror replicates between two nodes, with one Primary)", name, n, c.max)
		}
	}
	if notify, _ := ocfBool(getenv("OCF_RESKEY_CRM_meta_notify")); !notify && !ignoreMissingNotifications {
		return ocfErrorf(ocfErrConfigured, "the clone needs notify=true (a node that comes back reconnects on the peer's start notification); or set ignore_missing_notifications=true")
	}
	return nil
}

// ocfConfigCheck checks that the configuration file defines the resource
// for this node and returns the peer's name. Its errors are
// OCF_ERR_INSTALLED: the file is this node's.
func ocfConfigCheck(p ocfParams) (peer string, _ *ocfError) {
	cfg, err := config.Load(p.config)
	if err != nil {
		return "", ocfErrorf(ocfErrInstalled, "%s", firstLine(err.Error()))
	}
	r, err := cfg.Resource(p.resource)
	if err != nil {
		return "", ocfErrorf(ocfErrInstalled, "%v", err)
	}
	if _, err := r.Host(p.node); err != nil {
		return "", ocfErrorf(ocfErrInstalled, "%v", err)
	}
	if h, err := r.Peer(p.node); err == nil {
		peer = h.Name()
	}
	return peer, nil
}

// ocfState is what the agent reads from a resource's status.
type ocfState struct {
	primary        bool
	conn           replicator.ConnState
	disk, peerDisk replicator.DiskState
}

// newOCFState parses the state names of a status answer.
func newOCFState(s replicator.StatusJSON) (ocfState, error) {
	st := ocfState{primary: s.Role == replicator.RolePrimary.String()}
	var ok1, ok2, ok3 bool
	st.conn, ok1 = stateByName(replicator.ConnStates(), s.CState)
	st.disk, ok2 = stateByName(replicator.DiskStates(), s.Disk)
	st.peerDisk, ok3 = stateByName(replicator.DiskStates(), s.PeerDisk)
	if !ok1 || !ok2 || !ok3 {
		return st, fmt.Errorf("unknown state in the daemon's answer: cstate %q, disk %q/%q", s.CState, s.Disk, s.PeerDisk)
	}
	return st, nil
}

func stateByName[T fmt.Stringer](all []T, name string) (T, bool) {
	for _, v := range all {
		if v.String() == name {
			return v, true
		}
	}
	var zero T
	return zero, false
}

// running reports whether the resource is up: anything but the state a
// resource is in before `up` and after `down` (Secondary, StandAlone,
// Diskless; the status file's cs:Unconfigured).
func (s ocfState) running() bool {
	return s.primary || s.conn != replicator.StandAlone || s.disk != replicator.Diskless
}

// connected reports whether the peer is connected (its disk state is
// current).
func (s ocfState) connected() bool { return s.conn >= replicator.Connected }

func (s ocfState) String() string {
	role := "Secondary"
	if s.primary {
		role = "Primary"
	}
	if !s.running() {
		return "not running (down)"
	}
	return fmt.Sprintf("%s, %s, disk %s/%s", role, s.conn, s.disk, s.peerDisk)
}

// monitorCode maps a state to monitor's exit code: not running 7,
// Secondary 0, Primary 8, and 9 for a Primary without access to UpToDate
// data (its disk failed or is gone, and no connected peer is UpToDate).
func monitorCode(s ocfState) int {
	switch {
	case !s.running():
		return ocfNotRunning
	case !s.primary:
		return ocfSuccess
	case s.disk == replicator.UpToDate, s.connected() && s.peerDisk == replicator.UpToDate:
		return ocfRunningMaster
	}
	return ocfFailedMaster
}

// promotionScore is the promotion score of a state, shaped like
// drbd.ocf's: an UpToDate disk that is Primary or knows its peer's disk
// gets scores[3], an UpToDate disk whose peer is unknown scores[2], a disk
// that is not UpToDate while the connected peer's is scores[1], a disk
// that is only Consistent (after a crash of both nodes, with fencing)
// scores[0]. keep is true in the transitional states (attaching), where
// the score is left as it is. A score of 0 or less means: delete the
// score (never a negative one: old Pacemaker answered those with
// stop/start loops).
func promotionScore(s ocfState, scores [4]int) (score int, keep bool) {
	switch {
	case !s.running():
		return 0, false
	case s.disk == replicator.UpToDate && (s.primary || s.peerDisk != replicator.DUnknown):
		return scores[3], false
	case s.disk == replicator.UpToDate:
		return scores[2], false
	case s.disk == replicator.Attaching || s.disk == replicator.Negotiating:
		return 0, true
	case s.connected() && s.peerDisk == replicator.UpToDate:
		return scores[1], false
	case s.disk == replicator.Consistent:
		return scores[0], false
	}
	return 0, false
}
