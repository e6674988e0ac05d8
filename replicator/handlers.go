package replicator

// Handlers (reference/ops.md §4): the `handlers { … }` commands DRBD's
// kernel module runs through drbdadm, run here by the daemon itself with
// /bin/sh -c, with a timeout and DRBD's environment variables (plus
// NBDMIRROR_* names). Handlers whose exit code decides something
// (fence-peer, before-resync-target/-source) run where the decision is
// taken and block it; the others are queued and run in order, one at a
// time, by one goroutine of the resource, so that a notification script
// never holds the replication up. fence-peer and unfence-peer exclude each
// other, so that an unfence never overtakes a newer fence.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// HandlerEvent reports one handler run: its call, then its response.
type HandlerEvent struct {
	Handler  string
	Command  string
	Response bool // false: the call; true: the response
	// Status is the exit code; -1 if the command did not exit by itself
	// (killed at the timeout or at the resource's stop, or not started).
	Status   int
	Err      string        // why Status is -1
	Duration time.Duration // with the response
}

// handlerOutputMax bounds the output of a handler kept for the log.
const handlerOutputMax = 4096

// handlerPath is the PATH handlers get, as the kernel's helpers.
const handlerPath = "/sbin:/usr/sbin:/bin:/usr/bin"

// handlerRunner runs a resource's queued handlers in order, by a
// goroutine that lives while the queue is not empty; blocking ones run in
// their caller.
type handlerRunner struct {
	ctx    context.Context // cancelled when the resource stops: runs are killed
	cancel context.CancelFunc
	fence  sync.Mutex // held by a fence-peer or unfence-peer run
	wg     sync.WaitGroup

	mu      sync.Mutex // guards queue, running, stopped and runs
	queue   []func()
	running bool
	stopped bool // no more jobs
	runs    map[handlerResult]uint64
}

// HandlerRuns counts one handler's runs that ended with one exit code
// (−1: killed or not started).
type HandlerRuns struct {
	Handler string
	Status  int
	Runs    uint64
}

type handlerResult struct {
	name   string
	status int
}

// count records a run's result.
func (h *handlerRunner) count(name string, status int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.runs == nil {
		h.runs = map[handlerResult]uint64{}
	}
	h.runs[handlerResult{name, status}]++
}

// counts returns the counts, by handler name and exit code.
func (h *handlerRunner) counts() []HandlerRuns {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]HandlerRuns, 0, len(h.runs))
	for k, n := range h.runs {
		out = append(out, HandlerRuns{Handler: k.name, Status: k.status, Runs: n})
	}
	slices.SortFunc(out, func(a, b HandlerRuns) int {
		if c := strings.Compare(a.Handler, b.Handler); c != 0 {
			return c
		}
		return a.Status - b.Status
	})
	return out
}

func newHandlerRunner() *handlerRunner {
	ctx, cancel := context.WithCancel(context.Background())
	return &handlerRunner{ctx: ctx, cancel: cancel}
}

// enqueue runs job after the jobs queued before it.
func (h *handlerRunner) enqueue(job func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return
	}
	h.queue = append(h.queue, job)
	if h.running {
		return
	}
	h.running = true
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			h.mu.Lock()
			if len(h.queue) == 0 {
				h.running = false
				h.mu.Unlock()
				return
			}
			job := h.queue[0]
			h.queue = h.queue[1:]
			h.mu.Unlock()
			job()
		}
	}()
}

// stop kills a handler that runs, takes no more jobs, and waits for the
// queue's goroutine (jobs already queued run, their handlers refused at
// once).
func (h *handlerRunner) stop() {
	h.mu.Lock()
	h.stopped = true
	h.mu.Unlock()
	h.cancel()
	h.wg.Wait()
}

// handlerEnv is what a handler learns of the resource, taken when the
// event happens (a queued handler may run later).
type handlerEnv struct {
	name                string
	cstate              ConnState
	role, peerRole      Role
	disk, peerDisk      DiskState
	extra               []string // NAME=value pairs of this event
	timeout             time.Duration
	command, configFile string
}

// handlerEnv takes the resource's state for a run of handler name.
func (r *Resource) handlerEnv(name string, extra ...string) handlerEnv {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.handlerEnvLocked(name, extra...)
}

func (r *Resource) handlerEnvLocked(name string, extra ...string) handlerEnv {
	conf := r.conf() // handlers change live (adjust.go)
	return handlerEnv{name: name, cstate: r.conn, role: r.role, peerRole: r.peerRole, disk: r.disk,
		peerDisk: r.peerDisk, extra: extra, timeout: conf.HandlerTimeout, command: conf.Handlers[name],
		configFile: r.configFile}
}

// environ is the handler's environment: a fixed base as the kernel's
// helpers get, DRBD's variables (so that drbd-utils' scripts work) and
// nbdmirror's own.
func (r *Resource) environ(e handlerEnv) []string {
	env := []string{"HOME=/", "TERM=linux", "PATH=" + handlerPath,
		"DRBD_RESOURCE=" + r.name, "NBDMIRROR_RESOURCE=" + r.name,
		"NBDMIRROR_HANDLER=" + e.name,
		"DRBD_CONF=" + e.configFile, "NBDMIRROR_CONFIG=" + e.configFile,
		"DRBD_MINOR=" + strconv.Itoa(r.minor), "DRBD_VOLUME=0",
		"DRBD_BACKING_DEV=" + r.host.Disk, "DRBD_LL_DISK=" + r.host.Disk, "NBDMIRROR_DISK=" + r.host.Disk,
		"DRBD_CSTATE=" + e.cstate.String(), "NBDMIRROR_CSTATE=" + e.cstate.String(),
		"NBDMIRROR_ROLE=" + e.role.String(), "NBDMIRROR_PEER_ROLE=" + e.peerRole.String(),
		"NBDMIRROR_DISK_STATE=" + e.disk.String(), "NBDMIRROR_PEER_DISK_STATE=" + e.peerDisk.String(),
	}
	if dev := r.host.Device; dev != "" {
		env = append(env, "NBDMIRROR_DEVICE="+dev)
	}
	// Node ids are the `on` sections' places in the resource, as DRBD 9's
	// node-id when none is given.
	upToDate := 0
	for i, h := range r.cfg.Hosts {
		env = append(env, fmt.Sprintf("DRBD_NODE_ID_%d=%s", i, strings.Join(h.Names, " ")))
		switch {
		case h == r.host:
			env = append(env, "DRBD_MY_NODE_ID="+strconv.Itoa(i),
				"DRBD_MY_ADDRESS="+h.Address.Host, "DRBD_MY_AF="+h.Address.Family,
				"NBDMIRROR_MY_ADDRESS="+h.Address.String())
			if e.disk == UpToDate {
				upToDate |= 1 << i
			}
		case h.Name() == r.peer:
			env = append(env, "DRBD_PEER_NODE_ID="+strconv.Itoa(i), "DRBD_PEER="+h.Name(), "NBDMIRROR_PEER="+h.Name(),
				"DRBD_PEER_ADDRESS="+h.Address.Host, "DRBD_PEER_AF="+h.Address.Family,
				"NBDMIRROR_PEER_ADDRESS="+h.Address.String())
			if e.peerDisk == UpToDate {
				upToDate |= 1 << i
			}
		}
	}
	if e.name == "fence-peer" || e.name == "unfence-peer" {
		env = append(env, fmt.Sprintf("UP_TO_DATE_NODES=0x%x", upToDate))
	}
	return append(env, e.extra...)
}

// runHandler runs handler e.name now and returns its exit code: 0 if none
// is configured (as drbdadm's), -1 if it did not exit by itself. Call
// without r.mu (its events read the resource's state).
func (r *Resource) runHandler(e handlerEnv) int {
	if e.command == "" {
		return 0
	}
	h := r.handlers
	ev := HandlerEvent{Handler: e.name, Command: e.command}
	r.log.Info("calling handler", "handler", e.name, "command", e.command)
	r.onHandler(ev)
	start := time.Now()
	status, out, err := execHandler(h.ctx, e.command, r.environ(e), e.timeout)
	ev.Response, ev.Status, ev.Duration = true, status, time.Since(start)
	h.count(e.name, status)
	attrs := []any{"handler", e.name, "exit_code", status, "duration", ev.Duration.Round(time.Millisecond)}
	if out != "" {
		attrs = append(attrs, "output", out)
	}
	switch {
	case err != nil:
		ev.Err = err.Error()
		r.log.Error("handler failed", append(attrs, "err", err)...)
	case status != 0:
		r.log.Warn("handler returned", attrs...)
	default:
		r.log.Info("handler returned", attrs...)
	}
	r.onHandler(ev)
	return status
}

// spawnHandler queues handler e.name; its exit code is only logged.
func (r *Resource) spawnHandler(e handlerEnv) {
	if e.command == "" {
		return
	}
	r.handlers.enqueue(func() { r.runHandler(e) })
}

// errHandlerTimeout: the handler was killed at handler-timeout.
var errHandlerTimeout = errors.New("killed at handler-timeout")

// execHandler runs command with /bin/sh -c in its own process group,
// which is killed at the timeout or when ctx ends. It returns the exit
// code (-1 with an error if there is none) and the output, bounded.
func execHandler(ctx context.Context, command string, env []string, timeout time.Duration) (int, string, error) {
	if ctx.Err() != nil {
		return -1, "", errors.New("not run: the resource is stopping")
	}
	tctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(tctx, "/bin/sh", "-c", command)
	cmd.Env, cmd.Dir = env, "/"
	out := &boundedBuffer{max: handlerOutputMax}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Children that outlive the shell with its output open do not hold
	// the run up past this.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	text := strings.TrimSpace(out.String())
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, text, nil
	case tctx.Err() != nil && ctx.Err() == nil:
		return -1, text, fmt.Errorf("%w (%v)", errHandlerTimeout, timeout)
	case ctx.Err() != nil:
		return -1, text, errors.New("killed: the resource stopped")
	case errors.As(err, &exit) && exit.ExitCode() >= 0:
		return exit.ExitCode(), text, nil
	case errors.Is(err, exec.ErrWaitDelay):
		return 0, text, nil // the shell exited 0; a child kept the output open
	}
	return -1, text, err
}

// boundedBuffer keeps the first max bytes written to it.
type boundedBuffer struct {
	mu   sync.Mutex
	b    bytes.Buffer
	max  int
	more bool
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.b.Len(); room < len(p) {
		b.b.Write(p[:max(room, 0)])
		b.more = true
	} else {
		b.b.Write(p)
	}
	return len(p), nil
}

func (b *boundedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.more {
		return b.b.String() + "…"
	}
	return b.b.String()
}
