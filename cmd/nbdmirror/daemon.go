package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/nbdmirror/nbdmirror/metrics"
	"github.com/nbdmirror/nbdmirror/nbd"
	"github.com/nbdmirror/nbdmirror/replicator"
	"github.com/nbdmirror/nbdmirror/replicator/config"
	"github.com/nbdmirror/nbdmirror/transport"
)

func (m *Main) daemonCommand() *cli.Command {
	return &cli.Command{
		Name:      "daemon",
		Usage:     "run the node daemon in the foreground",
		ArgsUsage: " ",
		Description: "Serves every configured resource of this node: the control socket " +
			"<run-dir>/control.sock for the admin verbs, the status file <run-dir>/status, and NBD " +
			"exports named after the resources while they are Primary. Resources start down unless " +
			"--up names them. SIGINT or SIGTERM stops gracefully (requests in flight finish, disks are " +
			"flushed, bitmaps written, metadata marked clean); a second signal stops at once, leaving " +
			"the metadata to be recovered from the activity log.",
		Flags: append([]cli.Flag{
			&cli.StringSliceFlag{Name: "nbd-listen", EnvVars: []string{"NBDMIRROR_NBD_LISTEN"},
				Usage: "serve NBD on `ADDR`: unix:PATH or HOST:PORT (repeatable; default unix:<run-dir>/nbd.sock)"},
			&cli.StringSliceFlag{Name: "up", Usage: "bring `RES` up at start (repeatable; all for every resource)"},
			&cli.StringFlag{Name: "metrics-listen", EnvVars: []string{"NBDMIRROR_METRICS_LISTEN"},
				Usage: "serve Prometheus metrics at http://`HOST:PORT`/metrics (default: none)"},
			&cli.StringFlag{Name: "control-group", EnvVars: []string{"NBDMIRROR_CONTROL_GROUP"},
				Usage: "let members of `GROUP` use the control socket (mode 0660; default: root only, 0600)"},
		}, nbdLimitFlags()...),
		Action: m.daemon,
	}
}

// daemon is the node daemon: resources, the NBD server, the control
// socket, the status file and the event stream.
type daemon struct {
	log    *slog.Logger
	cfg    *config.Config
	node   string
	runDir string
	res    []*resource // in configuration order
	srv    *nbd.Server
	// metricsL and metrics: --metrics-listen's listener and handler (nil
	// without it).
	metricsL net.Listener
	metrics  http.Handler
	events   broadcaster
	kick     chan struct{} // the status file is due
	ready    func()        // Main.Ready
	access   controlAccess // who may use the control socket

	// ops counts admin requests in progress; stopping (under ops's write
	// lock) refuses new ones, so a stop never races an attach.
	ops      sync.RWMutex
	stopping bool
}

// resource is one configured resource in the daemon.
type resource struct {
	*replicator.Resource
	cfg    *config.Resource
	export *nbd.Export
	device string // kernel NBD device attached while Primary ("" = none)

	// verb serialises the daemon-level verbs of this resource (promote
	// with its kernel device, demote, down), which take several steps.
	verb   sync.Mutex
	mu     sync.Mutex
	attach *nbd.Attachment
}

func (m *Main) daemon(c *cli.Context) error {
	if c.NArg() > 0 {
		return failf(ExitUsage, "nbdmirror daemon: unexpected argument %q (resources to bring up go with --up)", c.Args().First())
	}
	log, err := m.logger(c)
	if err != nil {
		return err
	}
	cfg, node, err := m.loadConfig(c)
	if err != nil {
		return err
	}
	d := &daemon{log: log, cfg: cfg, node: node, runDir: c.String("run-dir"), kick: make(chan struct{}, 1),
		ready: m.Ready}
	d.srv = &nbd.Server{Catalog: d, Logger: log}
	if err := nbdLimits(c, d.srv); err != nil {
		return err
	}
	d.access = controlAccess{uid: os.Geteuid(), gid: -1}
	if g := c.String("control-group"); g != "" {
		gid, err := lookupGroup(g)
		if err != nil {
			return failf(ExitUsage, "nbdmirror daemon: --control-group %s: %v", g, err)
		}
		d.access.gid, d.access.group = gid, g
	}
	ioFlusher(log)
	// Handlers run in /: they are told the configuration's absolute path.
	confPath, err := filepath.Abs(cfg.Files[0])
	if err != nil {
		return fail(ExitFailed, fmt.Errorf("nbdmirror daemon: %w", err))
	}
	for i, rc := range cfg.Resources {
		host, err := rc.Host(node)
		if err != nil {
			return fail(ExitConfigInvalid, err)
		}
		dr := &resource{cfg: rc, device: host.Device}
		dr.Resource, err = replicator.New(replicator.Options{Config: rc, Node: node, Minor: i, Logger: log,
			HeldOpen:   func() ([]string, []string) { return d.heldOpen(dr) },
			Clients:    func() []string { return d.clients(dr) },
			OnChange:   func() { d.changed(dr) },
			OnHandler:  func(e replicator.HandlerEvent) { d.events.publish(handlerLine(dr.Snapshot(), e)) },
			ConfigFile: confPath})
		if err != nil {
			return fail(ExitConfigInvalid, err)
		}
		dr.export = &nbd.Export{Name: rc.Name, Backend: dr.Resource, MultiConn: true,
			Description: "nbdmirror resource " + rc.Name}
		d.res = append(d.res, dr)
	}
	up := c.StringSlice("up")
	for _, name := range up {
		if name != "all" && d.lookup(name) == nil {
			return failf(ExitConfigInvalid, "nbdmirror daemon: --up %s: no resource %s in %s", name, name, cfg.Files[0])
		}
	}
	if err := os.MkdirAll(d.runDir, 0o755); err != nil {
		return failf(ExitFailed, "nbdmirror daemon: run directory: %v", err)
	}
	// The control socket is created 0600 (umask), never readable by
	// others even for an instant.
	old := unix.Umask(0o177)
	ctlPath := filepath.Join(d.runDir, "control.sock")
	ctl, err := listenUnix(ctlPath)
	unix.Umask(old)
	if err != nil {
		return failf(ExitFailed, "nbdmirror daemon: control socket: %v", err)
	}
	if err := d.access.restrictSocket(ctlPath); err != nil {
		ctl.Close()
		return failf(ExitFailed, "nbdmirror daemon: %v", err)
	}
	addrs := c.StringSlice("nbd-listen")
	if len(addrs) == 0 {
		addrs = []string{"unix:" + filepath.Join(d.runDir, "nbd.sock")}
	}
	var nbdLs []net.Listener
	for _, a := range addrs {
		l, err := listen(a)
		if err != nil {
			ctl.Close()
			for _, l := range nbdLs {
				l.Close()
			}
			return failf(ExitFailed, "nbdmirror daemon: NBD: %v", err)
		}
		nbdLs = append(nbdLs, l)
	}
	if addr := c.String("metrics-listen"); addr != "" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			ctl.Close()
			for _, l := range nbdLs {
				l.Close()
			}
			return failf(ExitFailed, "nbdmirror daemon: --metrics-listen %s: %v (give a free HOST:PORT, e.g. 127.0.0.1:9942)", addr, err)
		}
		mx := metrics.New(version(), d.snapshots)
		d.srv.Observer = mx
		d.metricsL, d.metrics = l, mx.Handler()
	}
	return d.run(c.Context, ctl, nbdLs, up)
}

// run serves until a signal, then stops.
func (d *daemon) run(ctx context.Context, ctl net.Listener, nbdLs []net.Listener, up []string) error {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	var wg sync.WaitGroup
	errc := make(chan error, len(nbdLs)+2)
	for _, l := range nbdLs {
		wg.Go(func() { errc <- d.srv.Serve(l) })
	}
	api := &http.Server{Handler: closeAfterReply(d.access.guard(d.log, d.handler())), ConnContext: d.access.connContext,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)}
	wg.Go(func() { errc <- api.Serve(ctl) })
	var metricsSrv *http.Server
	metricsAddr := ""
	if d.metricsL != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", d.metrics)
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
			ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)}
		metricsAddr = "http://" + d.metricsL.Addr().String() + "/metrics"
		wg.Go(func() { errc <- metricsSrv.Serve(d.metricsL) })
	}
	stopStatus := make(chan struct{})
	wg.Go(func() { d.statusLoop(stopStatus) })

	for _, name := range up {
		for _, r := range d.select_(name) {
			if err := r.up(); err != nil {
				d.log.Error("bringing the resource up failed", "resource", r.Name(), "err", err)
			}
		}
	}
	listen := make([]string, 0, len(nbdLs))
	for _, l := range nbdLs {
		listen = append(listen, l.Addr().Network()+":"+l.Addr().String())
	}
	d.log.Info("daemon ready", "node", d.node, "resources", len(d.res), "control", ctl.Addr().String(),
		"nbd", strings.Join(listen, ","), "metrics", metricsAddr, "version", version())
	notify(d.log, "READY=1\nSTATUS=serving "+fmt.Sprint(len(d.res))+" resources")
	if d.ready != nil {
		d.ready()
	}

	var serveErr error
	select {
	case sig := <-sigs:
		d.log.Info("shutting down", "signal", sig.String())
	case <-ctx.Done():
	case serveErr = <-errc:
		d.log.Error("a listener failed; shutting down", "err", serveErr)
	}
	notify(d.log, "STOPPING=1")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	hard := make(chan struct{})
	stopWatch := make(chan struct{})
	wg.Go(func() {
		select {
		case sig := <-sigs:
			d.log.Warn("second signal: stopping at once, leaving the metadata to the activity log", "signal", sig.String())
			signal.Reset(syscall.SIGINT, syscall.SIGTERM) // a third one kills
			close(hard)
			cancel()
		case <-stopWatch:
		}
	})
	// No new admin request; those running finish (a stop never races an
	// attach); event and wait streams end.
	ctl.Close()
	d.ops.Lock()
	d.stopping = true
	d.ops.Unlock()
	d.events.close()
	// A handler still running (a fence-peer holding a promotion or the
	// application's requests) is killed before the servers are waited for.
	for _, r := range d.res {
		r.StopHandlers()
	}
	if err := api.Shutdown(sctx); err != nil {
		api.Close()
	}
	if metricsSrv != nil {
		if err := metricsSrv.Shutdown(sctx); err != nil {
			metricsSrv.Close()
		}
	}
	for _, r := range d.res {
		if clients, others := d.heldOpen(r); len(others) > 0 {
			d.log.Warn("stopping with the kernel device in use", "resource", r.Name(), "held_by", strings.Join(others, "; "),
				"nbd_clients", len(clients))
		}
		r.detachDevice(sctx, d.log)
	}
	if err := d.srv.Shutdown(sctx); err != nil {
		d.log.Warn("graceful NBD shutdown cut short", "err", err)
	}
	var stopErr error
	for _, r := range d.res {
		select {
		case <-hard:
			r.Abandon()
			continue
		default:
		}
		if err := r.Stop(); err != nil {
			d.log.Error("stopping the resource failed", "resource", r.Name(), "err", err)
			stopErr = err
		}
	}
	close(stopWatch)
	close(stopStatus)
	wg.Wait()
	os.Remove(filepath.Join(d.runDir, "status"))
	if serveErr != nil && !errors.Is(serveErr, nbd.ErrServerClosed) && !errors.Is(serveErr, http.ErrServerClosed) {
		return failf(ExitFailed, "nbdmirror daemon: %v", serveErr)
	}
	if stopErr != nil {
		return failf(ExitFailed, "nbdmirror daemon: %v", stopErr)
	}
	select {
	case <-hard:
		return failf(ExitFailed, "nbdmirror daemon: stopped at once by a second signal: the metadata is left unclean (the next attach applies the activity log)")
	default:
	}
	d.log.Info("stopped")
	return nil
}

// lookup returns the named resource, or nil.
func (d *daemon) lookup(name string) *resource {
	for _, r := range d.res {
		if r.Name() == name {
			return r
		}
	}
	return nil
}

// select_ resolves RES or all.
func (d *daemon) select_(name string) []*resource {
	if name == "all" {
		return d.res
	}
	if r := d.lookup(name); r != nil {
		return []*resource{r}
	}
	return nil
}

// Lookup is the NBD catalog: a resource's export exists only while the
// resource is Primary here.
func (d *daemon) Lookup(name string) (*nbd.Export, error) {
	if name == "" && len(d.res) == 1 {
		name = d.res[0].Name()
	}
	r := d.lookup(name)
	if r == nil {
		return nil, fmt.Errorf("no resource %q on node %s", name, d.node)
	}
	if role := r.Role(); role != replicator.RolePrimary {
		return nil, fmt.Errorf("resource %s is %s on node %s: promote it with 'nbdmirror primary %s'", name, role, d.node, name)
	}
	return r.export, nil
}

// List offers the exports of the Primary resources.
func (d *daemon) List() []*nbd.Export {
	var out []*nbd.Export
	for _, r := range d.res {
		if r.Role() == replicator.RolePrimary {
			out = append(out, r.export)
		}
	}
	return out
}

// clients lists the NBD clients of a resource's export.
func (d *daemon) clients(r *resource) []string {
	var by []string
	if d.srv == nil {
		return by
	}
	for _, c := range d.srv.Conns() {
		switch {
		case c.Export != r.Name():
		case c.Remote == "@" || c.Remote == "":
			by = append(by, "Unix socket")
		default:
			by = append(by, c.Remote)
		}
	}
	return by
}

// heldOpen lists who holds a resource open: its NBD clients, and whoever
// has its kernel device mounted, claimed or open.
func (d *daemon) heldOpen(r *resource) (clients, others []string) {
	r.mu.Lock()
	a := r.attach
	r.mu.Unlock()
	if a != nil {
		others = deviceHolders(a.Path())
	}
	return d.clients(r), others
}

// changed is called after every state change of r.
func (d *daemon) changed(r *resource) {
	d.events.publish(eventLine("change", r.Snapshot()))
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// up brings a resource up: attach (connect comes with replication).
// up attaches the disk and, if the resource has a peer, starts connecting.
func (r *resource) up() error {
	if err := r.Attach(); err != nil {
		return err
	}
	if r.HasPeer() {
		return r.Connect(false)
	}
	return nil
}

// promote makes the resource Primary and attaches its kernel device; if
// the device cannot be attached, the resource goes back to Secondary.
func (r *resource) promote(force bool, log *slog.Logger) error {
	r.verb.Lock()
	defer r.verb.Unlock()
	if err := r.Primary(force); err != nil {
		return err
	}
	r.mu.Lock()
	attached := r.attach != nil
	r.mu.Unlock()
	if r.device == "" || attached {
		return nil
	}
	a, err := nbd.Attach(r.device, r.export, nbd.AttachOptions{Logger: log})
	if err != nil {
		if serr := r.Secondary(); serr != nil {
			log.Error("demoting after the failed device attach failed", "resource", r.Name(), "err", serr)
		}
		return fmt.Errorf("%s: attaching %s failed, so the resource stays Secondary: %w", r.Name(), r.device, err)
	}
	r.mu.Lock()
	r.attach = a
	r.mu.Unlock()
	return nil
}

// demote makes the resource Secondary (refused while anyone holds it
// open, the kernel device included) and detaches its kernel device.
func (r *resource) demote(ctx context.Context, log *slog.Logger) error {
	r.verb.Lock()
	defer r.verb.Unlock()
	if err := r.Secondary(); err != nil {
		return err
	}
	r.detachDevice(ctx, log)
	return nil
}

// down demotes, detaches the kernel device and takes the resource down.
func (r *resource) down(ctx context.Context, log *slog.Logger) error {
	if err := r.demote(ctx, log); err != nil {
		return err
	}
	r.verb.Lock()
	defer r.verb.Unlock()
	return r.Down()
}

// detachDevice disconnects the kernel device, if attached.
func (r *resource) detachDevice(ctx context.Context, log *slog.Logger) {
	r.mu.Lock()
	a := r.attach
	r.attach = nil
	r.mu.Unlock()
	if a == nil {
		return
	}
	if err := a.Detach(ctx); err != nil {
		log.Error("detaching the kernel device failed", "resource", r.Name(), "device", a.Path(), "err", err)
	}
}

// statusLoop rewrites <run-dir>/status on every state change and at least
// once a second.
func (d *daemon) statusLoop(stop <-chan struct{}) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if err := d.writeStatusFile(); err != nil {
			d.log.Warn("writing the status file failed", "err", err)
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		case <-d.kick:
		}
	}
}

// snapshots returns the state of every resource (status file, metrics).
func (d *daemon) snapshots() []replicator.Snapshot {
	out := make([]replicator.Snapshot, 0, len(d.res))
	for _, r := range d.res {
		out = append(out, r.Snapshot())
	}
	return out
}

// procInfo is the status file's header.
func procInfo() replicator.ProcInfo {
	return replicator.ProcInfo{Version: version(), API: 1, ProtoMin: transport.VersionMin, ProtoMax: transport.VersionMax,
		Build: buildLine()}
}

// buildLine is the status file's second line, in DRBD's git form when the
// binary records its VCS revision ("GIT-hash: <hash> build by nbdmirror,
// <time>"), else "srcversion: <version>".
func buildLine() string {
	var rev, at string
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.time":
				if t, err := time.Parse(time.RFC3339, s.Value); err == nil {
					at = t.UTC().Format(time.DateTime)
				}
			}
		}
	}
	if rev == "" {
		return "srcversion: " + version()
	}
	return fmt.Sprintf("GIT-hash: %s build by nbdmirror, %s", rev, at)
}

// writeStatusFile writes the /proc/drbd-style file atomically: a
// temporary file renamed over the old one, so a reader sees one or the
// other, whole.
func (d *daemon) writeStatusFile() error {
	var b bytes.Buffer
	if err := replicator.WriteProc(&b, procInfo(), d.snapshots()); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(d.runDir, "status"), b.Bytes(), 0o644)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// event is one line of the event stream: a resource's state, with what
// happened ("exists" for the initial dump of events --now, "change").
type event struct {
	Event string    `json:"event"`
	Time  time.Time `json:"time"`
	replicator.StatusJSON
}

// helperEvent is a handler's part of a "call" or "response" event line
// (drbdsetup events2's call helper / response helper).
type helperEvent struct {
	Name       string `json:"name"`
	Command    string `json:"command"`
	Status     *int   `json:"status,omitempty"` // the exit code, with the response (-1: did not exit by itself)
	Error      string `json:"error,omitempty"`
	DurationMS *int64 `json:"duration_ms,omitempty"`
}

func handlerLine(s replicator.Snapshot, e replicator.HandlerEvent) []byte {
	ev := struct {
		event
		Helper helperEvent `json:"helper"`
	}{event: event{Event: "call", Time: time.Now().UTC(), StatusJSON: replicator.NewStatusJSON(s)},
		Helper: helperEvent{Name: e.Handler, Command: e.Command}}
	if e.Response {
		ms := e.Duration.Milliseconds()
		ev.Event, ev.Helper.Status, ev.Helper.Error, ev.Helper.DurationMS = "response", &e.Status, e.Err, &ms
	}
	b, _ := json.Marshal(ev)
	return append(b, '\n')
}

func eventLine(kind string, s replicator.Snapshot) []byte {
	b, _ := json.Marshal(event{Event: kind, Time: time.Now().UTC(), StatusJSON: replicator.NewStatusJSON(s)})
	return append(b, '\n')
}

// broadcaster fans event lines out to subscribers. A subscriber that does
// not keep up loses its subscription (its stream ends), never blocking
// state changes.
type broadcaster struct {
	mu     sync.Mutex
	subs   map[chan []byte]struct{}
	closed bool
}

func (b *broadcaster) subscribe() chan []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	ch := make(chan []byte, 256)
	if b.closed {
		close(ch)
		return ch
	}
	if b.subs == nil {
		b.subs = map[chan []byte]struct{}{}
	}
	b.subs[ch] = struct{}{}
	return ch
}

func (b *broadcaster) unsubscribe(ch chan []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[ch]; ok {
		delete(b.subs, ch)
		close(ch)
	}
}

func (b *broadcaster) publish(line []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- line:
		default: // fell behind: its stream ends with an overflow line
			delete(b.subs, ch)
			close(ch)
		}
	}
}

// stopped reports whether close was called.
func (b *broadcaster) stopped() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

func (b *broadcaster) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for ch := range b.subs {
		close(ch)
	}
	b.subs = nil
}

// notify sends a systemd notification when NOTIFY_SOCKET is set.
func notify(log *slog.Logger, state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		log.Warn("systemd notification failed", "err", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		log.Warn("systemd notification failed", "err", err)
	}
}
