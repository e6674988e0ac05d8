package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// The Pacemaker resource agent ocf:nbdmirror:nbdmirror. A shell shim
// installed as <ocf-root>/resource.d/nbdmirror/nbdmirror runs `nbdmirror
// ocf ACTION`; the parameters come from OCF_RESKEY_*, the clone's meta
// attributes from OCF_RESKEY_CRM_meta_*. The agent talks to the node
// daemon over its control socket and records promotion scores with
// crm_attribute. Its behaviour follows LINBIT's drbd.ocf
// (shared/reference/ops.md §1).

const (
	// ocfCrmAttributeEnv names the command that records promotion
	// scores instead of crm_attribute (tests record its arguments).
	ocfCrmAttributeEnv     = "NBDMIRROR_OCF_CRM_ATTRIBUTE"
	ocfDefaultCrmAttribute = "crm_attribute"
	// ocfPromoteBackoff: a failed promotion returns no sooner than this
	// after the action began, so Pacemaker cannot retry it in a tight loop
	// (drbd.ocf's 15 s).
	ocfPromoteBackoff = 15 * time.Second
	// ocfRetry is the pause between tries of a refused state change.
	ocfRetry = time.Second
	// crmNotConnected is crm_attribute's exit code when no cluster runs
	// (CRM_EX_NOT_CONNECTED).
	crmNotConnected = 102
	ocfUsage        = "usage: nbdmirror ocf {start|stop|promote|demote|monitor|notify|validate-all|meta-data|usage}"
)

func (m *Main) ocfCommand() *cli.Command {
	return &cli.Command{
		Name:      "ocf",
		Usage:     "the Pacemaker resource agent ocf:nbdmirror:nbdmirror (run by its shim)",
		ArgsUsage: "<action>",
		Description: "Runs one OCF action (start, stop, promote, demote, monitor, notify, validate-all, " +
			"meta-data, usage) for the resource named by OCF_RESKEY_resource, with the parameters in OCF_RESKEY_* " +
			"(see 'nbdmirror ocf meta-data'), and exits with the OCF exit code. Pacemaker runs it through " +
			"/usr/lib/ocf/resource.d/nbdmirror/nbdmirror.",
		Action: m.ocf,
	}
}

// ocfAgent is one run of one action.
type ocfAgent struct {
	action string
	getenv func(string) string
	stdout io.Writer
	log    *slog.Logger
	// crmAttribute is the command that records promotion scores.
	crmAttribute string
	// promoteBackoff is how long a failed promotion takes at least.
	promoteBackoff time.Duration
	// deadline is when the action must have returned: its timeout
	// (OCF_RESKEY_CRM_meta_timeout, else the advertised one) less a margin.
	deadline time.Time
	// scoreEnd bounds the recording of a promotion score, also one made
	// after the deadline (stop's): half the margin before the timeout.
	scoreEnd time.Time

	p    ocfParams
	peer string // the peer's name in the configuration ("" if unknown)
	cl   *client
}

func (m *Main) ocf(c *cli.Context) error {
	prefix := m.Getenv("OCF_EXIT_REASON_PREFIX")
	if prefix == "" {
		prefix = "ocf-exit-reason:"
	}
	if c.NArg() != 1 {
		fmt.Fprintln(m.Stderr, ocfUsage)
		return fail(ocfErrArgs, errors.New(prefix+"expected one action"))
	}
	a := newOCFAgent(c.Args().First(), m.Getenv, m.Stdout, m.Stderr, time.Now())
	code, err := a.run(c.Context)
	var oe *ocfError
	switch {
	case errors.As(err, &oe):
		return fail(oe.code, errors.New(prefix+oe.reason))
	case err != nil:
		return fail(ocfErrGeneric, errors.New(prefix+err.Error()))
	case code != ocfSuccess: // monitor's 7 and 8 are answers, not failures
		return fail(code, fmt.Errorf("%s: %s", a.p.resource, ocfCodeName(code)))
	}
	return nil
}

func newOCFAgent(action string, getenv func(string) string, stdout, stderr io.Writer, now time.Time) *ocfAgent {
	timeout := time.Duration(ocfActionTimeout(action)) * time.Second
	if ms, err := strconv.Atoi(getenv("OCF_RESKEY_CRM_meta_timeout")); err == nil && ms > 0 {
		timeout = time.Duration(ms) * time.Millisecond
	}
	margin := max(timeout/10, 500*time.Millisecond)
	crm := getenv(ocfCrmAttributeEnv)
	if crm == "" {
		crm = ocfDefaultCrmAttribute
	}
	// Pacemaker logs an agent's stderr with its result: the progress
	// lines only with HA_debug=1 (as ocf-shellfuncs' ocf_log debug).
	level := slog.LevelWarn
	if getenv("HA_debug") == "1" {
		level = slog.LevelDebug
	}
	return &ocfAgent{
		action: action, getenv: getenv, stdout: stdout,
		log:          slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("ocf", action),
		crmAttribute: crm, promoteBackoff: ocfPromoteBackoff,
		deadline: now.Add(max(timeout-margin, 500*time.Millisecond)),
		scoreEnd: now.Add(max(timeout-margin/2, 750*time.Millisecond)),
	}
}

func ocfCodeName(code int) string {
	switch code {
	case ocfNotRunning:
		return "not running"
	case ocfRunningMaster:
		return "running as Primary"
	}
	return fmt.Sprintf("exit %d", code)
}

// probe reports whether this is a probe: a monitor with interval 0.
func (a *ocfAgent) probe() bool {
	return a.action == "monitor" && a.getenv("OCF_RESKEY_CRM_meta_interval") == "0"
}

// run runs the action and returns its exit code; an error carries the code
// (an *ocfError) and the reason.
func (a *ocfAgent) run(ctx context.Context) (int, error) {
	switch a.action {
	case "meta-data":
		return ocfSuccess, writeOCFMetaData(a.stdout)
	case "usage", "help":
		_, err := fmt.Fprintln(a.stdout, ocfUsage)
		return ocfSuccess, err
	case "start", "stop", "promote", "demote", "monitor", "notify", "validate-all":
	default:
		return 0, ocfErrorf(ocfErrUnimplemented, "action %q is not implemented (%s)", a.action, ocfUsage)
	}
	ctx, cancel := context.WithDeadline(ctx, a.deadline)
	defer cancel()
	if a.action == "stop" {
		a.validateForStop()
		return a.stop(ctx)
	}
	p, err := parseOCFParams(a.getenv)
	if err != nil {
		return 0, err
	}
	a.use(p)
	if a.peer, err = ocfConfigCheck(p); err != nil {
		if a.probe() {
			// A probe on a node without this resource: not running here,
			// unless the daemon serves it all the same (it runs on the
			// configuration it read at its start): then say what runs,
			// or Pacemaker could start it elsewhere beside it.
			if st, _, serr := a.state(ctx); serr == nil && monitorCode(st) != ocfNotRunning {
				a.log.Warn("probe: the configuration does not name the resource for this node, but the daemon runs it",
					"reason", err.reason, "state", st.String())
				return monitorCode(st), nil
			}
			a.log.Info("probe: the resource is not configured for this node", "reason", err.reason)
			return ocfNotRunning, nil
		}
		return 0, err
	}
	switch a.action {
	case "validate-all":
		_, err := a.liveState(ctx)
		return ocfSuccess, err
	case "start":
		return a.start(ctx)
	case "promote":
		return a.promote(ctx)
	case "demote":
		return a.demote(ctx)
	case "monitor":
		return a.monitor(ctx)
	}
	return a.notify(ctx)
}

func (a *ocfAgent) use(p ocfParams) {
	a.p = p
	a.log = a.log.With("resource", p.resource)
	a.cl = newOCFClient(p.runDir)
}

// validateForStop validates as far as it can: a stop must not fail
// because of a configuration mistake (the node would be fenced), so it
// goes on with the resource name and run directory it has.
func (a *ocfAgent) validateForStop() {
	p, err := parseOCFParams(a.getenv)
	if err == nil {
		a.use(p)
		if _, cerr := ocfConfigCheck(p); cerr != nil {
			a.log.Warn("stopping anyway", "validation", cerr.reason)
		}
		return
	}
	name, nerr := ocfResourceName(a.getenv)
	if nerr != nil {
		a.log.Warn("no valid resource name: nothing can have been started under it", "validation", nerr.reason)
		return
	}
	dir, _ := ocfRunDir(a.getenv)
	a.use(ocfParams{resource: name, runDir: dir})
	a.log.Warn("stopping anyway", "validation", err.reason)
}

func newOCFClient(runDir string) *client {
	sock := filepath.Join(runDir, "control.sock")
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &client{sock: sock, http: &http.Client{Transport: tr}}
}

// cliCode returns the nbdmirror exit code an error carries (0 for nil).
func cliCode(err error) int {
	var ee *exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	}
	return ExitFailed
}

// timedOut replaces a request's error by ExitTimeout once the action's
// deadline has passed: a request cut short is no sign of a missing daemon.
func timedOut(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return failf(ExitTimeout, "the action's timeout passed: %v", err)
	}
	return err
}

// state asks the daemon for the resource's state. Its errors carry the
// CLI's exit codes: ExitNoDaemon when the daemon does not answer,
// ExitConfigInvalid when it does not serve the resource.
func (a *ocfAgent) state(ctx context.Context) (ocfState, replicator.StatusJSON, error) {
	resp, err := a.cl.do(ctx, http.MethodGet, "/status?res="+url.QueryEscape(a.p.resource), nil)
	if err != nil {
		return ocfState{}, replicator.StatusJSON{}, timedOut(ctx, err)
	}
	defer resp.Body.Close()
	var out []replicator.StatusJSON
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || len(out) != 1 {
		return ocfState{}, replicator.StatusJSON{}, failf(ExitFailed, "unreadable status answer from the daemon (%d resources): %v", len(out), err)
	}
	st, err := newOCFState(out[0])
	return st, out[0], err
}

// liveState is state for the actions that need the daemon: its absence,
// or a daemon serving another configuration, is OCF_ERR_INSTALLED.
func (a *ocfAgent) liveState(ctx context.Context) (ocfState, error) {
	st, js, err := a.state(ctx)
	switch cliCode(err) {
	case 0:
		if a.peer != "" && js.Peer != "" && js.Peer != a.peer {
			return st, ocfErrorf(ocfErrInstalled, "the daemon at %s serves %s with the peer %s, but %s gives node %s the peer %s: "+
				"the daemon runs with another --config or --node than the parameters config and node", a.cl.sock, a.p.resource,
				js.Peer, a.p.config, a.p.node, a.peer)
		}
		return st, nil
	case ExitNoDaemon:
		return st, ocfErrorf(ocfErrInstalled, "the nbdmirror daemon does not answer at %s: start nbdmirror.service "+
			"(systemctl enable --now nbdmirror.service), or set run_dir to the daemon's --run-dir", a.cl.sock)
	case ExitConfigInvalid:
		return st, ocfErrorf(ocfErrInstalled, "the daemon at %s does not serve %s: it was started with another configuration "+
			"than %s, or before %s was added (restart nbdmirror.service)", a.cl.sock, a.p.resource, a.p.config, a.p.resource)
	}
	return st, ocfErrorf(ocfErrGeneric, "status of %s: %v", a.p.resource, err)
}

// verb runs an admin verb on the resource; the error carries the CLI's
// exit code.
func (a *ocfAgent) verb(ctx context.Context, name string) error {
	resp, err := a.cl.do(ctx, http.MethodPost, "/resources/"+url.PathEscape(a.p.resource)+"/"+name, verbRequest{})
	if err != nil {
		return timedOut(ctx, err)
	}
	defer resp.Body.Close()
	var vr verbResponse
	if err := json.NewDecoder(resp.Body).Decode(&vr); err != nil {
		return failf(ExitFailed, "unreadable answer from the daemon: %v", err)
	}
	for _, r := range vr.Results {
		if r.Code != 0 {
			return fail(r.Code, errors.New(r.Error))
		}
	}
	a.log.Info("done", "verb", name)
	return nil
}

// pause waits d, or until the deadline; it reports whether there is time
// left.
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// start brings the resource up as Secondary (demoting it if it is
// Primary), waits up to wfc_timeout for the peer and sets the promotion
// score.
func (a *ocfAgent) start(ctx context.Context) (int, error) {
	st, err := a.liveState(ctx)
	if err != nil {
		return 0, err
	}
	if st.primary {
		a.log.Warn("found Primary at start: demoting")
		if err := a.demoteLoop(ctx); err != nil {
			return 0, err
		}
		if st, err = a.liveState(ctx); err != nil {
			return 0, err
		}
	}
	switch {
	case !st.running():
		err = a.verb(ctx, "up")
	case st.conn == replicator.StandAlone && st.disk != replicator.Diskless:
		err = a.verb(ctx, "connect")
	}
	if err != nil {
		return 0, ocfErrorf(ocfErrGeneric, "start: %v", err)
	}
	if st, err = a.liveState(ctx); err != nil {
		return 0, err
	}
	if !st.running() {
		return 0, ocfErrorf(ocfErrGeneric, "start: %s is still down after up", a.p.resource)
	}
	if !st.connected() && st.conn != replicator.StandAlone && a.p.wfcTimeout > 0 {
		wait := min(a.p.wfcTimeout, time.Until(a.deadline)-time.Second)
		if wait > 0 {
			a.waitConnect(ctx, wait)
		}
		if st, err = a.liveState(ctx); err != nil {
			return 0, err
		}
	}
	a.log.Info("started", "state", st.String())
	a.updateScore(ctx, st)
	return ocfSuccess, nil
}

// waitConnect waits up to d for the connection; not connecting in time is
// no failure (the peer may be down).
func (a *ocfAgent) waitConnect(ctx context.Context, d time.Duration) {
	q := url.Values{"res": {a.p.resource}, "for": {"connect"}, "timeout": {d.String()}}
	resp, err := a.cl.do(ctx, http.MethodGet, "/wait?"+q.Encode(), nil)
	if err != nil {
		a.log.Warn("waiting for the peer", "err", err)
		return
	}
	defer resp.Body.Close()
	var vr verbResponse
	if err := json.NewDecoder(resp.Body).Decode(&vr); err != nil {
		a.log.Warn("waiting for the peer: unreadable answer", "err", err)
		return
	}
	for _, r := range vr.Results {
		if r.Code != 0 {
			a.log.Warn("not connected to the peer yet: going on (wfc_timeout)", "waited", d, "state", r.Error)
		}
	}
}

// stop demotes and takes the resource down. A resource that is down, or
// whose daemon does not run, is stopped. Refusals (the device is held
// open) are retried until the deadline.
func (a *ocfAgent) stop(ctx context.Context) (int, error) {
	if a.cl == nil { // no valid resource name
		return ocfSuccess, nil
	}
	defer a.recordScore(context.WithoutCancel(ctx), 0)
	var last error
	for {
		st, _, err := a.state(ctx)
		switch cliCode(err) {
		case 0:
		case ExitNoDaemon:
			a.log.Info("the daemon does not run: stopped", "err", err)
			return ocfSuccess, nil
		case ExitConfigInvalid:
			a.log.Info("the daemon does not serve the resource: stopped", "err", err)
			return ocfSuccess, nil
		case ExitTimeout:
		default:
			last = err
		}
		if err == nil {
			if !st.running() {
				return ocfSuccess, nil
			}
			if st.primary {
				err = a.verb(ctx, "secondary")
			}
			if err == nil {
				err = a.verb(ctx, "down")
			}
			if err == nil {
				continue // check that it is down
			}
			if cliCode(err) != ExitTimeout {
				last = err
				a.log.Warn("stop refused: retrying", "err", err)
			}
		}
		if !pause(ctx, ocfRetry) {
			return 0, ocfErrorf(ocfErrGeneric, "stop: %s still up at the timeout: %v", a.p.resource, last)
		}
	}
}

// demoteLoop runs secondary until the resource is Secondary (or down),
// retrying refusals until the deadline.
func (a *ocfAgent) demoteLoop(ctx context.Context) error {
	var last error
	for {
		st, err := a.liveState(ctx)
		if err != nil && ctx.Err() == nil {
			return err
		}
		if err == nil && !st.primary {
			return nil
		}
		if err == nil {
			err = a.verb(ctx, "secondary")
			if err == nil {
				continue
			}
			if cliCode(err) != ExitTimeout {
				last = err
				a.log.Warn("demote refused: retrying", "err", err)
			}
		}
		if !pause(ctx, ocfRetry) {
			return ocfErrorf(ocfErrGeneric, "demote: %s still Primary at the timeout: %v", a.p.resource, last)
		}
	}
}

func (a *ocfAgent) demote(ctx context.Context) (int, error) {
	st, _, err := a.state(ctx)
	switch {
	case cliCode(err) == ExitNoDaemon:
		a.log.Warn("the daemon does not run: not Primary", "err", err)
		return ocfSuccess, nil
	case err == nil && !st.running():
		a.log.Warn("demote of a resource that is not running")
		return ocfSuccess, nil
	}
	if err := a.demoteLoop(ctx); err != nil {
		return 0, err
	}
	if st, err := a.liveState(ctx); err == nil {
		a.updateScore(ctx, st)
	}
	return ocfSuccess, nil
}

// promote makes the resource Primary. A refusal for lack of UpToDate data
// (exit 17) ends it at once; others are retried until the deadline. A
// failed promotion returns no sooner than promoteBackoff after it began.
func (a *ocfAgent) promote(ctx context.Context) (int, error) {
	began := time.Now()
	var last error
	for ctx.Err() == nil {
		st, err := a.liveState(ctx)
		if err != nil && ctx.Err() != nil {
			break
		}
		if err != nil {
			var oe *ocfError
			if errors.As(err, &oe) && oe.code == ocfErrInstalled {
				oe.code = ocfErrGeneric // promote of an instance whose daemon went away
			}
			return 0, err
		}
		if !st.running() {
			return 0, ocfErrorf(ocfErrGeneric, "promote: %s is not started", a.p.resource)
		}
		if st.primary {
			a.updateScore(ctx, st)
			return ocfSuccess, nil
		}
		err = a.verb(ctx, "primary")
		if err == nil {
			continue
		}
		if cliCode(err) == ExitTimeout {
			break
		}
		last = err
		if cliCode(err) == ExitNoUpToDateData {
			a.log.Error("refusing to promote without UpToDate data", "err", err)
			break
		}
		a.log.Warn("promote refused: retrying", "err", err)
		if !pause(ctx, ocfRetry) {
			break
		}
	}
	if rest := a.promoteBackoff - time.Since(began); rest > 0 {
		a.log.Warn("promotion failed: waiting before returning, against a tight recovery loop", "wait", rest.Round(time.Millisecond))
		pause(ctx, rest)
	}
	if last == nil {
		return 0, ocfErrorf(ocfErrGeneric, "promote: %s not Primary at the action's timeout", a.p.resource)
	}
	return 0, ocfErrorf(ocfErrGeneric, "promote: %v", last)
}

// monitor maps the state to 7, 0, 8 or 9 and updates the promotion score;
// a probe that finds the resource not running leaves the score alone.
func (a *ocfAgent) monitor(ctx context.Context) (int, error) {
	st, _, err := a.state(ctx)
	switch cliCode(err) {
	case 0:
	case ExitNoDaemon, ExitConfigInvalid:
		a.log.Info("not running", "why", err)
		if !a.probe() {
			a.recordScore(ctx, 0)
		}
		return ocfNotRunning, nil
	default:
		return 0, ocfErrorf(ocfErrGeneric, "monitor: %v", err)
	}
	code := monitorCode(st)
	if !(code == ocfNotRunning && a.probe()) {
		a.updateScore(ctx, st)
	}
	if code == ocfFailedMaster {
		return 0, ocfErrorf(ocfFailedMaster, "%s is Primary without access to UpToDate data (%s)", a.p.resource, st)
	}
	return code, nil
}

// notify reconnects a StandAlone resource when the peer starts and
// recomputes the score after every operation. It never fails.
func (a *ocfAgent) notify(ctx context.Context) (int, error) {
	typ := a.getenv("OCF_RESKEY_CRM_meta_notify_type")
	op := a.getenv("OCF_RESKEY_CRM_meta_notify_operation")
	st, _, err := a.state(ctx)
	if err != nil {
		a.log.Info("notification ignored", "type", typ, "operation", op, "err", err)
		return ocfSuccess, nil
	}
	if op == "start" && (typ == "pre" || typ == "post") {
		a.reconnect(ctx, st)
	}
	if typ == "post" {
		if st, _, err = a.state(ctx); err == nil && st.running() {
			a.updateScore(ctx, st)
		}
	}
	return ocfSuccess, nil
}

// reconnect connects a resource that is up but StandAlone.
func (a *ocfAgent) reconnect(ctx context.Context, st ocfState) {
	if st.conn != replicator.StandAlone || st.disk == replicator.Diskless {
		return
	}
	if err := a.verb(ctx, "connect"); err != nil {
		a.log.Warn("reconnecting to the peer", "err", err)
	}
}

// updateScore records the promotion score of a state.
func (a *ocfAgent) updateScore(ctx context.Context, st ocfState) {
	score, keep := promotionScore(st, a.p.scores)
	if keep {
		a.log.Info("promotion score left as it is", "state", st.String())
		return
	}
	a.recordScore(ctx, score)
}

// recordScore sets the promotion score, or deletes it when score ≤ 0,
// with crm_attribute. It never fails the action: without a cluster (no
// OCF_RESOURCE_INSTANCE, crm_attribute missing or unable to connect) it
// logs that the score was not recorded, as drbd.ocf does.
func (a *ocfAgent) recordScore(ctx context.Context, score int) {
	args := []string{"--promotion", "-l", "reboot", "-D"}
	what := "delete"
	if score > 0 {
		args = []string{"--promotion", "-l", "reboot", "-v", strconv.Itoa(score)}
		what = strconv.Itoa(score)
	}
	inst := a.getenv("OCF_RESOURCE_INSTANCE")
	if inst == "" {
		a.log.Warn("no OCF_RESOURCE_INSTANCE (not run by Pacemaker): promotion score not recorded", "score", what)
		return
	}
	end := time.Now().Add(30 * time.Second)
	if a.scoreEnd.Before(end) {
		end = a.scoreEnd
	}
	ctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), end)
	defer cancel()
	cmd := exec.CommandContext(ctx, a.crmAttribute, args...)
	cmd.Env = append(os.Environ(), "OCF_RESOURCE_INSTANCE="+inst)
	out, err := cmd.CombinedOutput()
	msg := strings.TrimSpace(firstLine(string(out)))
	var ee *exec.ExitError
	switch {
	case err == nil:
		a.log.Info("promotion score recorded", "score", what)
	case errors.As(err, &ee) && ee.ExitCode() == crmNotConnected:
		a.log.Warn("no cluster is running: promotion score not recorded", "score", what, "crm_attribute", msg)
	case errors.Is(err, exec.ErrNotFound):
		a.log.Warn("crm_attribute is not installed: promotion score not recorded", "score", what, "err", err)
	default:
		a.log.Error("recording the promotion score failed", "score", what, "err", err, "crm_attribute", msg)
	}
}
