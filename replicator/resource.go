package replicator

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// Options configure a Resource.
type Options struct {
	Config *config.Resource
	Node   string // this node's name: selects the `on` section
	Minor  int    // the resource's number in the status file
	Logger *slog.Logger
	// Clients returns the NBD clients of the resource's export, by
	// address, for status; it must be cheap.
	Clients func() []string
	// HeldOpen returns who holds the resource open: the NBD clients (by
	// address) and anything else, described ("/dev/nbd0 mounted on
	// /mnt"). Demotion is refused while anyone does.
	HeldOpen func() (clients, others []string)
	// OnChange is called after every state change, without the
	// resource's state lock (an admin request may be in progress).
	OnChange func()
	// OnHandler, if set, is called at each handler's call and response
	// (handlers.go), without the resource's state lock.
	OnHandler func(HandlerEvent)
	// ConfigFile is the configuration file handlers are told of
	// (DRBD_CONF); the file that defines the resource if empty.
	ConfigFile string
}

// Resource is one replicated disk on this node: its role, its disk and
// connection states, the metadata and the write path. It satisfies
// nbd.Backend: reads and writes are served only while it is Primary.
// All methods are safe for concurrent use.
type Resource struct {
	name    string
	minor   int
	cfg     *config.Resource
	host    *config.Host
	peer    string
	log     *slog.Logger
	baseLog *slog.Logger
	clients func() []string
	held    func() (clients, others []string)
	change  func()
	// handlers runs the `handlers` section's commands; onHandler reports
	// each run.
	handlers   *handlerRunner
	onHandler  func(HandlerEvent)
	configFile string

	// admin serialises state changes (attach, detach, promote, …), which
	// may wait for I/O; mu guards the fields below and is never held
	// across I/O.
	admin sync.Mutex
	mu    sync.Mutex
	idle  sync.Cond // signalled when inflight drops to 0, or frozen is cleared
	// frozen holds new application requests back (while the bitmap is
	// cleared under them).
	frozen    int   // holds by freeze and freezeFor
	frozenBy  *peer // the session whose handshake holds requests back
	promoting bool  // a promotion or a resize is at work: a handshake waits (idle is signalled)
	role      Role
	disk      DiskState
	conn      ConnState
	// inflight counts requests between beginIO and endIO; the disk and
	// metadata stay open while it is above 0.
	inflight int
	mdev     *MetaDevice
	md       *metadisk.Meta
	dev      *blockdev.Device
	size     atomic.Int64 // bytes of data; 0 while Diskless

	written, read atomic.Uint64 // bytes written to and read from the disk, since attach
	appIO         atomic.Uint64 // bytes of application I/O on the disk (not resync): c-min-rate
	throttled     atomic.Uint64 // resync requests c-min-rate held back, since the start
	flushGap      time.Duration // the least time between two flushes at barriers (tests lengthen it)
	local         atomic.Int64  // requests in flight on the disk
	directRefused atomic.Bool   // the disk refused an O_DIRECT write (logged once)

	// The link to the peer (link.go, peer.go): the transport while not
	// StandAlone, the current session, what the peer last said.
	tr         *transport.Transport
	connCancel context.CancelFunc
	connDone   chan struct{}
	p          *peer
	peerRole   Role
	peerDisk   DiskState
	discard    bool // --discard-my-data for the next handshake
	userPaused bool // pause-sync here
	peerPaused bool // pause-sync on the peer
	lastVerify uint64
	// ovStart is the block where a verify without --start begins: where
	// the last one stopped (in memory only, as DRBD's ov_start_sector).
	ovStart uint64
	ranges  *rangeLock // application writes against resync reads

	netSent, netRecv atomic.Uint64 // bytes sent to and received from the peer
	resyncBytes      atomic.Uint64 // resync data written as SyncTarget or sent as SyncSource
	// authBefore counts the authentication failures of the transports
	// already closed (the current one's are in its Stats); under mu.
	authBefore uint64
	// Fencing (fence.go), under mu: peerOutdated mirrors the metadata's
	// peer-outdated flag (set when fence-peer outdated the peer);
	// fenceFrozen is true while resource-and-stonith holds application
	// I/O after the peer was lost (until the peer is back or resume-io);
	// unfencing while the flag is being cleared and unfence-peer run.
	peerOutdated, fenceFrozen, unfencing bool
	fenceGen                             uint64 // counts the fences (fence.go)
	// waitingIO counts application requests held back by a freeze.
	waitingIO int
	// flushFailed: a flush of the disk failed since the attach.
	flushFailed bool
	// ioErrorReported: local-io-error ran since the attach (once per
	// attach); under mu.
	ioErrorReported bool
	// Disk failures (diskfail.go): localDone counts the requests on the
	// disk that completed; detaching is true while a Failed disk is being
	// detached (by a goroutine of bg); watchStop and watchDone, under mu,
	// stop and await disk-timeout's watchdog of the current attach.
	localDone atomic.Uint64
	detaching bool
	// The diskless Primary (diskless.go), under mu: divert while the
	// switch to the peer's disk runs (divertDone is closed when it ends),
	// remote once this Primary serves from the peer; the detached disk's
	// metadata, kept open for session detachedBy until it ends.
	divert, remote bool
	divertDone     chan struct{}
	detachedMD     *metadisk.Meta
	detachedMdev   *MetaDevice
	detachedBy     *peer
	// bg owns the background work of disk failures; once stopping (under
	// bgMu) is set, it takes none.
	bg                   sync.WaitGroup
	bgMu                 sync.Mutex
	stopping             bool
	watchStop, watchDone chan struct{}

	resizing resizeState // an online resize waiting for the peer (resize.go)
	// live is the configuration in effect (conf, adjust.go); pending, under
	// mu, one that adjust keeps for the next up.
	live    atomic.Pointer[config.Resource]
	pending *config.Resource
}

// New returns the resource described by o, Diskless, Secondary and
// StandAlone (down).
func New(o Options) (*Resource, error) {
	host, err := o.Config.Host(o.Node)
	if err != nil {
		return nil, err
	}
	r := &Resource{name: o.Config.Name, minor: o.Minor, cfg: o.Config, host: host, held: o.HeldOpen,
		clients: o.Clients, change: o.OnChange, onHandler: o.OnHandler, handlers: newHandlerRunner(), log: o.Logger, role: RoleSecondary, disk: Diskless, conn: StandAlone,
		peerDisk: DUnknown, ranges: newRangeLock(), flushGap: flushGap}
	if p, err := o.Config.Peer(o.Node); err == nil {
		r.peer = p.Name()
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	r.baseLog = r.log // the transport adds the resource itself
	r.log = r.log.With("resource", r.name)
	if r.held == nil {
		r.held = func() ([]string, []string) { return nil, nil }
	}
	if r.clients == nil {
		r.clients = func() []string { return nil }
	}
	if r.change == nil {
		r.change = func() {}
	}
	if r.onHandler == nil {
		r.onHandler = func(HandlerEvent) {}
	}
	if r.configFile = o.ConfigFile; r.configFile == "" {
		r.configFile = o.Config.Pos.File
	}
	if r.fencingOn() && r.cfg.Handlers["fence-peer"] == "" {
		r.log.Warn("fencing " + r.cfg.Disk.Fencing + " without a fence-peer handler: a disconnected node is not promoted " +
			"without --force, and a Primary that loses its peer leaves it unfenced")
	}
	r.idle.L = &r.mu
	r.live.Store(o.Config)
	return r, nil
}

// Name returns the resource's name.
func (r *Resource) Name() string { return r.name }

// Role returns this node's role.
func (r *Resource) Role() Role {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.role
}

// StateError is a refused state change or admin request, with DRBD's
// code and text (reference/drbd.md §11.2).
type StateError struct {
	Resource string
	Code     int    // DRBD's: negative for a state change, positive for a failure
	Text     string // DRBD's text for the code
	Detail   string // what this case adds (who holds the device, …)
}

func (e *StateError) Error() string {
	kind := "State change failed"
	if e.Code > 0 {
		kind = "Failure"
	}
	s := fmt.Sprintf("%s: %s: (%d) %s", e.Resource, kind, e.Code, e.Text)
	if e.Detail != "" {
		s += " (" + e.Detail + ")"
	}
	return s
}

// NoUpToDateData reports whether the refusal is DRBD's −2, "Need access
// to UpToDate data", or −7, a peer that fence-peer could not outdate
// (exit code 17 for both: a promotion that cannot succeed by retrying).
func (e *StateError) NoUpToDateData() bool {
	return e.Code == codeNoUpToDate || e.Code == codePrimaryNOP
}

// DRBD's codes used here (reference/drbd.md §11.2).
const (
	codeNoUpToDate     = -2
	codeDiskless       = -11
	codeInUse          = -12
	codeNeedConnection = -15
	codeAttached       = 124
	codeNoDiskConfig   = 138
)

var stateTexts = map[int]string{
	codeNoUpToDate:     "Need access to UpToDate data",
	codeDiskless:       "Device is diskless, the requested operation requires a disk",
	codeInUse:          "Device is held open by someone",
	codeNeedConnection: "Need a connection to start verify or resync",
	codeAttached:       "Device is attached to a disk (use detach first)",
	codeNoDiskConfig:   "Device does not have a disk-config",
}

func (r *Resource) refuse(code int, detail string) error {
	return &StateError{Resource: r.name, Code: code, Text: stateTexts[code], Detail: detail}
}

// setState logs a state change DRBD's way, e.g. "role( Secondary ->
// Primary ) disk( Inconsistent -> UpToDate )"; call with mu held.
func (r *Resource) setState(role Role, disk DiskState) {
	var parts []string
	if role != r.role {
		parts = append(parts, fmt.Sprintf("role( %s -> %s )", r.role, role))
	}
	if r.disk == Failed && disk != Diskless {
		// A failed disk only goes: detached (diskfail.go), never back
		// by a state change racing its failure (a resync's end, a
		// promotion).
		disk = Failed
	}
	if disk != r.disk {
		parts = append(parts, fmt.Sprintf("disk( %s -> %s )", r.disk, disk))
	}
	if len(parts) == 0 {
		return
	}
	r.role, r.disk = role, disk
	r.log.Info(strings.Join(parts, " "))
}

// Attach opens the disk and its metadata, applies the activity log if
// the last stop was unclean, and sets the disk state from the metadata
// flags (reference/drbd.md §3.3).
func (r *Resource) Attach() error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	disk, role := r.disk, r.role
	r.mu.Unlock()
	if disk != Diskless {
		return r.refuse(codeAttached, "")
	}
	if role == RolePrimary {
		return r.refuse(codeInUse, "a diskless Primary serves from its peer: demote it first; attached then, the disk is resynced as SyncTarget")
	}
	r.applyPending() // what adjust kept for down/up
	r.mu.Lock()
	r.setState(r.role, Attaching)
	r.mu.Unlock()
	err := r.attach()
	if err != nil {
		r.mu.Lock()
		r.setState(r.role, Diskless)
		r.mu.Unlock()
	}
	r.change()
	return err
}

func (r *Resource) attach() (err error) {
	mdev, err := OpenMetaDevice(r.host, true)
	if err != nil {
		return fmt.Errorf("%s: attach: %w", r.name, err)
	}
	defer func() {
		if err != nil {
			mdev.Close()
		}
	}()
	md, err := metadisk.Open(watchedDevice{mdev.File, r}, mdev.Layout, metadisk.Options{Logger: r.log,
		ALExtents: r.cfg.Disk.ALExtents, NoFlush: !r.cfg.Disk.MDFlushes})
	if err != nil {
		return fmt.Errorf("%s: attach: metadata on %s: %w", r.name, mdev.Path, err)
	}
	defer func() {
		if err != nil {
			md.Abandon()
		}
	}()
	if sb := md.Superblock(); sb.Resource != r.name {
		return fmt.Errorf("%s: attach: %w: the metadata on %s belongs to resource %s", r.name, metadisk.ErrMismatch, mdev.Path, sb.Resource)
	}
	// The data disk is checked before anything is written to the metadata.
	dev, err := blockdev.Open(r.host.Disk, false)
	if err != nil {
		return fmt.Errorf("%s: attach: %w", r.name, err)
	}
	// The size last agreed, which the metadata covers; a disk grown
	// since is used only after a resize.
	size := md.Layout().DataSize
	if dev.Size() < size {
		dev.Close()
		return fmt.Errorf("%s: attach: %s holds %d bytes, the metadata describes %d: %w", r.name, r.host.Disk, dev.Size(), size, metadisk.ErrMismatch)
	}
	if !mdev.Spec.Internal && r.cfg.Disk.DiskFlushes {
		// The metadata's flushes do not reach this disk: the activity
		// log flushes it before it lets extents go.
		md.SetDataSync(func() error {
			r.localBegin()
			defer r.localEnd()
			return dev.Flush()
		})
	}
	if err := md.Activate(); err != nil {
		dev.Close()
		return fmt.Errorf("%s: attach: metadata on %s: %w", r.name, mdev.Path, err)
	}
	if rec := md.Recovery(); rec.Applied {
		r.log.Warn("the last stop was unclean: activity log applied", "extents", len(rec.ALActive),
			"blocks_marked", rec.AppliedBlocks, "al_transaction", rec.ALSeq)
	}
	// The node attaches as Secondary: the role flag and the role bit of a
	// crashed Primary go (crashed-primary, set by the recovery, stays).
	if sb := md.Superblock(); sb.Flags&metadisk.FlagPrimary != 0 || sb.UUIDs.Current&1 != 0 {
		if err := md.UpdateSuperblock(clearPrimary); err != nil {
			dev.Close()
			return fmt.Errorf("%s: attach: metadata on %s: %w", r.name, mdev.Path, err)
		}
	}
	sb := md.Superblock()
	disk := Outdated
	switch {
	case sb.Flags&metadisk.FlagConsistent == 0:
		disk = Inconsistent
	case sb.Flags&metadisk.FlagWasUpToDate != 0:
		disk = Consistent
		// With fencing dont-care (the default) a Consistent disk is
		// UpToDate at once, as DRBD's; otherwise only when the peer is
		// known to be outdated.
		if f := r.cfg.Disk.Fencing; f == "" || f == "dont-care" || sb.Flags&metadisk.FlagPeerOutdated != 0 {
			disk = UpToDate
		}
	}
	r.mu.Lock()
	r.mdev, r.md, r.dev = mdev, md, dev
	r.peerOutdated = sb.Flags&metadisk.FlagPeerOutdated != 0
	r.ioErrorReported, r.flushFailed = false, false
	r.startWatchLocked()
	r.written.Store(0)
	r.read.Store(0)
	r.size.Store(size)
	r.setState(r.role, disk)
	r.mu.Unlock()
	r.log.Info("attached", "disk", r.host.Disk, "meta_disk", mdev.Path, "size", size,
		"out_of_sync_bytes", md.OutOfSync()*4096)
	return nil
}

// Detach closes the disk cleanly: in-flight requests finish, the bitmap is
// written and the metadata marked clean. A Primary cannot detach: without
// a peer it would have no data.
func (r *Resource) Detach() error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	role := r.role
	r.mu.Unlock()
	if role != RolePrimary {
		// Diskless nodes are not supported: a detached node is StandAlone.
		r.disconnect("detach")
	}
	return r.detach()
}

func (r *Resource) detach() error {
	r.mu.Lock()
	switch {
	case r.disk == Diskless:
		r.mu.Unlock()
		return r.refuse(codeDiskless, "")
	case r.role == RolePrimary:
		r.mu.Unlock()
		return r.refuse(codeNoUpToDate, "a Primary without a peer cannot give up its disk: demote it first")
	}
	r.mu.Unlock()
	r.stopWatch() // not across mu: the watchdog takes it
	r.mu.Lock()
	for r.inflight > 0 {
		r.idle.Wait()
	}
	md, dev, mdev := r.md, r.dev, r.mdev
	r.md, r.dev, r.mdev = nil, nil, nil
	r.size.Store(0)
	// A flush of this disk failed since the attach: writes it had
	// acknowledged may be lost, and a later flush would not say so
	// (Linux reports a writeback error once).
	lost := r.flushFailed
	r.setState(r.role, Diskless)
	r.mu.Unlock()
	defer r.change()
	// The data first: clean metadata must never describe data that a
	// power loss could still take back.
	errFlush := dev.Flush()
	var errMD error
	switch {
	case errFlush != nil:
		errMD = errors.New("not closed: the disk flush failed")
		md.Abandon() // left unclean: the activity log covers the writes
	case lost:
		r.log.Warn("metadata left unclean: a flush of the disk failed since the attach; the next attach marks the activity log's extents")
		md.Abandon()
	default:
		errMD = md.Close()
	}
	errDev := dev.Close()
	mdev.Close()
	if err := errors.Join(errFlush, errMD, errDev); err != nil {
		return fmt.Errorf("%s: detach: %w", r.name, err)
	}
	r.log.Info("detached")
	return nil
}

// Down demotes (refused while the device is held open) and detaches; a
// resource already down stays down.
func (r *Resource) Down() error {
	r.admin.Lock()
	defer r.admin.Unlock()
	if err := r.secondary(); err != nil {
		return err
	}
	r.disconnect("down")
	r.mu.Lock()
	disk := r.disk
	r.mu.Unlock()
	if disk == Diskless {
		return nil
	}
	return r.detach()
}

// Primary promotes this node. Without a peer, the disk must be UpToDate;
// force makes an Inconsistent, Outdated or Consistent disk UpToDate
// (DRBD's `primary --force`). Promotion while disconnected starts a new
// data generation (a new current UUID) unless the bitmap UUID is set.
func (r *Resource) Primary(force bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	if err := r.waitPeerNotPrimary(); err != nil {
		return err
	}
	r.mu.Lock()
	role, disk, md, conn, p, peerDisk, peerOutdated := r.role, r.disk, r.md, r.conn, r.p, r.peerDisk, r.peerOutdated
	if role == RolePrimary {
		r.mu.Unlock()
		return nil
	}
	switch conn {
	case WFReportParams, WFBitMapT, WFSyncUUID:
		// The handshake or a resync toward this node is starting: its
		// decision was made with this node Secondary.
		r.mu.Unlock()
		return r.refuse(codeTransient, fmt.Sprintf("%s: this node is about to be resynced from the peer", conn))
	case SyncTarget, PausedSyncT, Behind:
		r.mu.Unlock()
		return r.refuse(codeNoUpToDate, fmt.Sprintf("%s: local disk %s until the resync from the peer ends", conn, disk))
	}
	// No handshake starts until the promotion is done (runSession waits).
	release := r.holdHandshakesLocked()
	r.mu.Unlock()
	defer release()
	connected := p != nil && conn >= Connected
	promotable := disk == UpToDate || disk == Consistent || force && disk >= Inconsistent && disk <= Consistent
	if !connected && r.fencingOn() && !peerOutdated && promotable {
		// The peer might be promoted meanwhile with its own data: it is
		// fenced first (fence.go), as DRBD's SS_PRIMARY_NOP.
		out := r.fencePeer(r.handlerEnv("fence-peer"), disk == UpToDate)
		switch {
		case out.fenced:
			if disk == Consistent {
				disk = UpToDate // the newest data now
			}
		case out.outdateSelf && !force:
			if err := r.outdateSelf(); err != nil {
				return fmt.Errorf("%s: promote: write the metadata: %w", r.name, err)
			}
			return r.refuse(codeNoUpToDate, "fence-peer returned 6: the peer is Primary or has newer data; this disk is now Outdated")
		case force:
			r.log.Warn("Forced into split brain situation!")
			if err := r.setPeerOutdated(); err != nil {
				return fmt.Errorf("%s: promote: write the metadata: %w", r.name, err)
			}
		default:
			return r.refuse(codePrimaryNOP, fmt.Sprintf("fence-peer returned %d: the peer is not fenced; fix the handler, or 'primary --force' to promote anyway", out.status))
		}
	}
	forced := false
	switch {
	case disk == UpToDate:
	case force && connected && peerDisk == UpToDate:
		return r.refuse(codeNoUpToDate, fmt.Sprintf("local disk %s, the peer's is UpToDate: promote the peer, or wait for the resync", disk))
	case force && connected && conn != Connected:
		return r.refuse(codeAlreadyActive, fmt.Sprintf("%s: wait for it to end", conn))
	case force && disk >= Inconsistent && disk <= Consistent:
		forced = true
		r.log.Warn("Forced to consider local data as UpToDate!")
	default:
		detail := fmt.Sprintf("local disk %s, no peer", disk)
		if connected {
			detail = fmt.Sprintf("local disk %s, peer disk %s", disk, peerDisk)
		}
		switch {
		case connected && peerDisk == UpToDate:
			detail += "; the peer has the data: promote it, or wait for the resync"
		case disk >= Inconsistent && disk <= Consistent:
			detail += "; 'primary --force' makes this node's data the valid copy"
		}
		return r.refuse(codeNoUpToDate, detail)
	}
	err := md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		// A new data generation: the bitmap now tracks changes against
		// the old one (DRBD's drbd_uuid_new_current, which overwrites a
		// bitmap UUID already set, with a warning). Connected to an
		// UpToDate peer, both go on with the same generation.
		if forced || (sb.UUIDs.Bitmap == 0 && !connected) {
			if sb.UUIDs.Bitmap != 0 {
				r.log.Warn("bitmap UUID was already set", "bitmap_uuid", fmt.Sprintf("%016X", sb.UUIDs.Bitmap))
			}
			sb.UUIDs.Bitmap = sb.UUIDs.Current
			sb.UUIDs.Current = randomUUID()
		}
		sb.UUIDs.Current |= 1
		sb.Flags |= metadisk.FlagPrimary | metadisk.FlagConsistent | metadisk.FlagWasUpToDate
	})
	if err != nil {
		return fmt.Errorf("%s: promote: write the metadata: %w", r.name, err)
	}
	if connected {
		// The peer hears of the promotion before any write of the new
		// Primary: both go in order on the data stream.
		p.tl.send.Lock()
	}
	r.mu.Lock()
	r.setState(RolePrimary, UpToDate)
	r.mu.Unlock()
	if connected {
		if p.hello {
			if err := p.send(transport.Data, p.myState()); err != nil {
				p.fail(err)
			}
		}
		p.tl.send.Unlock()
	}
	r.change()
	if !connected {
		return nil
	}
	if forced {
		// The peer's data is replaced by this node's: a full sync.
		if err := p.startSync(true, true, &wire.Command{Code: wire.CmdInvalidateRemote}); err != nil {
			return fmt.Errorf("%s: promote: start the full sync: %w", r.name, err)
		}
	}
	return nil
}

// holdHandshakesLocked keeps a new session's handshake from starting
// (runSession waits) until release is called; call with r.mu held.
func (r *Resource) holdHandshakesLocked() (release func()) {
	r.promoting = true
	return func() {
		r.mu.Lock()
		r.promoting = false
		r.idle.Broadcast()
		r.mu.Unlock()
	}
}

// waitPeerNotPrimary refuses a promotion while the connected peer is
// Primary, after waiting once for ping-timeout (at least 1 s) in case the
// peer is on its way down (DRBD's retry of −1).
func (r *Resource) waitPeerNotPrimary() error {
	deadline := time.Now().Add(max(r.conf().Net.PingTimeout, time.Second))
	for {
		r.mu.Lock()
		peerPri := r.p != nil && r.peerRole == RolePrimary
		r.mu.Unlock()
		if !peerPri {
			return nil
		}
		if time.Now().After(deadline) {
			return r.refuse(codeTwoPrimaries, "the peer is Primary: demote it first")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Secondary demotes this node; refused while anyone holds the device open.
func (r *Resource) Secondary() error {
	r.admin.Lock()
	defer r.admin.Unlock()
	return r.secondary()
}

func (r *Resource) secondary() error {
	r.mu.Lock()
	role := r.role
	r.mu.Unlock()
	if role != RolePrimary {
		return nil
	}
	if clients, others := r.held(); len(clients)+len(others) > 0 {
		return r.refuse(codeInUse, heldBy(clients, others))
	}
	r.mu.Lock()
	r.setState(RoleSecondary, r.disk)
	for r.inflight > 0 {
		r.idle.Wait()
	}
	md, dev := r.md, r.dev
	failed := r.disk == Failed
	var remote *peer
	if r.remote {
		// A diskless Primary demoted: its session ends (a diskless
		// Secondary does not replicate) once the peer knows, and the
		// node connects again when a disk is attached.
		r.remote, remote = false, r.p
	}
	r.mu.Unlock()
	defer r.change()
	if remote != nil {
		r.demotePeerSync()
		remote.fail(errors.New("the node is diskless: it reconnects once a disk is attached"))
		// Ended before this returns: an attach may follow at once, and
		// the session still holds the detached disk's metadata.
		r.mu.Lock()
		for r.p == remote || r.detachedBy == remote {
			r.idle.Wait()
		}
		r.mu.Unlock()
	}
	if failed {
		// A disk that failed under the Primary: detached now, with
		// nothing more asked of it here (the attach clears the role),
		// once the peer knows of the demotion.
		r.demotePeerSync()
		r.mu.Lock()
		r.startDetachFailedLocked()
		r.mu.Unlock()
		return nil
	}
	if md == nil {
		return nil
	}
	// What the clients wrote is made durable before they lose the device.
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("%s: demote: flush the disk: %w", r.name, err)
	}
	if err := md.UpdateSuperblock(clearPrimary); err != nil {
		return fmt.Errorf("%s: demote: write the metadata: %w", r.name, err)
	}
	// The peer learns of the demotion before this returns, so it can be
	// promoted at once.
	r.demotePeerSync()
	return nil
}

// clearPrimary records the node as not Primary.
func clearPrimary(sb *metadisk.Superblock) {
	sb.UUIDs.Current &^= 1
	sb.Flags &^= metadisk.FlagPrimary
}

// heldBy describes who holds the device: "3 NBD clients: 10.0.0.5:51234,
// Unix socket ×2; /dev/nbd0 mounted on /mnt". Repeated client addresses
// are counted, not repeated.
func heldBy(clients, others []string) string {
	var parts []string
	if len(clients) > 0 {
		n := map[string]int{}
		var order []string
		for _, c := range clients {
			if n[c]++; n[c] == 1 {
				order = append(order, c)
			}
		}
		for i, c := range order {
			if n[c] > 1 {
				order[i] = fmt.Sprintf("%s ×%d", c, n[c])
			}
		}
		noun := "NBD clients"
		if len(clients) == 1 {
			noun = "NBD client"
		}
		parts = append(parts, fmt.Sprintf("%d %s: %s", len(clients), noun, strings.Join(order, ", ")))
	}
	return strings.Join(append(parts, others...), "; ")
}

// NewCurrentUUID starts a new data generation (DRBD's new-current-uuid):
// the bitmap UUID goes to the history, the current one becomes the
// bitmap UUID and a fresh current UUID is drawn. With clearBitmap every
// block is then marked in sync; application requests are held back
// meanwhile, so no write in flight loses its mark.
func (r *Resource) NewCurrentUUID(clearBitmap bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	md, p, conn := r.md, r.p, r.conn
	r.mu.Unlock()
	if md == nil {
		return r.refuse(codeNoDiskConfig, "attach it first")
	}
	if p != nil && conn >= WFReportParams {
		// Connected, only the skip of the initial sync of two fresh nodes
		// is allowed (reference/drbd.md §4.2, §6.7).
		if !clearBitmap || conn != Connected || md.Superblock().UUIDs.Current&^1 != metadisk.UUIDJustCreated {
			return r.refuse(codeNeedStandAloneF, "connected, only '--clear-bitmap' on two freshly created nodes skips the initial sync; disconnect first")
		}
		if err := p.skipInitialSync(); err != nil {
			return fmt.Errorf("%s: new-current-uuid: %w", r.name, err)
		}
		return nil
	}
	if err := md.UpdateSuperblock(newCurrent); err != nil {
		return fmt.Errorf("%s: new-current-uuid: %w", r.name, err)
	}
	defer r.change()
	if !clearBitmap {
		return nil
	}
	r.freeze()
	defer r.thaw()
	if n := md.MarkInSync(0, r.size.Load()); n > 0 {
		r.log.Warn("bitmap cleared: blocks marked in sync", "blocks", n)
	}
	if err := md.FlushBitmap(); err != nil {
		return fmt.Errorf("%s: new-current-uuid: %w", r.name, err)
	}
	return nil
}

// freeze holds new application requests back and waits for those in
// flight; thaw lets them go.
func (r *Resource) freeze() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.frozen++
	for r.inflight > 0 {
		r.idle.Wait()
	}
}

func (r *Resource) thaw() {
	r.mu.Lock()
	r.frozen--
	r.idle.Broadcast()
	r.mu.Unlock()
}

// freezeFor holds application requests back during p's handshake;
// thawIfFrozenBy lets them go (once, whichever of handshake and session
// end comes first).
func (r *Resource) freezeFor(p *peer) {
	r.freeze()
	r.mu.Lock()
	r.frozenBy = p
	r.mu.Unlock()
}

func (r *Resource) thawIfFrozenBy(p *peer) {
	r.mu.Lock()
	mine := r.frozenBy == p
	if mine {
		r.frozenBy = nil
	}
	r.mu.Unlock()
	if mine {
		r.thaw()
	}
}

// diskSize is the usable size of the attached disk, measured now: the
// most data the disk and its metadata device can hold (0 if Diskless).
func (r *Resource) diskSize() int64 {
	l, err := r.capacity()
	if err != nil {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.md == nil {
			return 0
		}
		r.log.Warn("measuring the disk failed; offering the peer the current size", "err", err)
		return r.md.Layout().DataSize
	}
	return l.DataSize
}

// newCurrent rotates the UUIDs as DRBD's new-current-uuid does (the
// bitmap UUID to the history, the current to the bitmap, a new current)
// and keeps the role bit (bit 0) of the current UUID.
func newCurrent(sb *metadisk.Superblock) {
	u := &sb.UUIDs
	if u.Bitmap != 0 {
		u.History[1], u.History[0] = u.History[0], u.Bitmap
	}
	u.Bitmap = u.Current
	u.Current = randomUUID() | u.Current&1
}

// newGeneration starts a new data generation (newCurrent) unless one is
// already under way (a bitmap UUID is set): what a node does once its copy
// is the only good one. It reports whether it started one.
func newGeneration(md *metadisk.Meta) (bool, error) {
	var started bool
	err := md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		if sb.UUIDs.Bitmap == 0 {
			newCurrent(sb)
			started = true
		}
	})
	return started, err
}

func randomUUID() uint64 {
	for {
		var b [8]byte
		rand.Read(b[:])
		// Bit 0 is the role; 0 and UUIDJustCreated mean something else.
		if v := binary.BigEndian.Uint64(b[:]) &^ 1; v > metadisk.UUIDJustCreated {
			return v
		}
	}
}

// Invalidate discards this node's data (DRBD's invalidate). Connected,
// the disk becomes Inconsistent and a resync from the peer replaces every
// block (with resetBitmap false, only the blocks already marked, e.g. by
// verify); without a connection every block is marked out of sync, to be
// fully resynchronised at the next connect. A Primary cannot be the
// target of a resync here: demote it first.
func (r *Resource) Invalidate(resetBitmap bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	md, role, conn, p, peerDisk := r.md, r.role, r.conn, r.p, r.peerDisk
	r.mu.Unlock()
	switch {
	case md == nil:
		return r.refuse(codeDiskless, "")
	case conn.Syncing() || conn >= WFBitMapS && conn <= WFSyncUUID:
		return r.refuse(codeAlreadyActive, "")
	case role == RolePrimary:
		return r.refuse(codeNeedConnection, "a Primary's data cannot be replaced under its clients here: demote it first")
	}
	if p != nil && conn == Connected {
		if peerDisk != UpToDate {
			return r.refuse(codeNoUpToDate, fmt.Sprintf("the peer's disk is %s", peerDisk))
		}
		r.log.Warn("invalidated: this node's data is replaced by a resync from the peer", "full", resetBitmap)
		if err := p.startSync(false, resetBitmap, nil); err != nil {
			return fmt.Errorf("%s: invalidate: %w", r.name, err)
		}
		if err := p.send(transport.Data, wire.Command{Code: wire.CmdInvalidate, Arg: keepArg(resetBitmap)}); err != nil {
			return fmt.Errorf("%s: invalidate: %w", r.name, err)
		}
		return nil
	}
	// Inconsistent is durable before the bitmap is set, as DRBD orders
	// it: a crash in between leaves a disk that cannot be promoted
	// without --force, never an UpToDate one with a full bitmap.
	if err := md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		sb.Flags &^= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
	}); err != nil {
		return fmt.Errorf("%s: invalidate: %w", r.name, err)
	}
	r.mu.Lock()
	r.setState(r.role, Inconsistent)
	r.mu.Unlock()
	defer r.change()
	var n uint64
	if resetBitmap {
		n = md.MarkOutOfSync(0, r.size.Load())
	}
	if err := md.FlushBitmap(); err != nil {
		return fmt.Errorf("%s: invalidate: %w", r.name, err)
	}
	if resetBitmap {
		r.log.Warn("invalidated: every block marked out of sync, for a full resync at the next connect", "blocks_newly_marked", n)
	} else {
		r.log.Warn("invalidated: the blocks already marked are resynced at the next connect", "blocks", md.OutOfSync())
	}
	return nil
}

// InvalidateRemote replaces the peer's data with this node's (DRBD's
// invalidate-remote): connected, a resync to the peer of every block
// (with resetBitmap false, of the blocks already marked); on a
// StandAlone Primary, every block is marked for the next connect.
func (r *Resource) InvalidateRemote(resetBitmap bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	md, role, disk, conn, p, peerRole := r.md, r.role, r.disk, r.conn, r.p, r.peerRole
	r.mu.Unlock()
	switch {
	case md == nil:
		return r.refuse(codeDiskless, "")
	case conn.Syncing() || conn >= WFBitMapS && conn <= WFSyncUUID:
		return r.refuse(codeAlreadyActive, "")
	case disk != UpToDate:
		return r.refuse(codeNoUpToDate, fmt.Sprintf("local disk %s", disk))
	case p != nil && conn == Connected:
		if peerRole == RolePrimary {
			return r.refuse(codeNeedConnection, "the peer is Primary: its data cannot be replaced under its clients; demote it first")
		}
		r.log.Warn("invalidate-remote: the peer's data is replaced by a resync from this node", "full", resetBitmap)
		cmd := wire.Command{Code: wire.CmdInvalidateRemote, Arg: keepArg(resetBitmap)}
		if err := p.startSync(true, resetBitmap, &cmd); err != nil {
			return fmt.Errorf("%s: invalidate-remote: %w", r.name, err)
		}
		return nil
	case role == RolePrimary && conn < Connected:
		n := md.MarkOutOfSync(0, r.size.Load())
		if err := md.FlushBitmap(); err != nil {
			return fmt.Errorf("%s: invalidate-remote: %w", r.name, err)
		}
		r.log.Warn("invalidate-remote: every block marked out of sync for the next connect", "blocks_newly_marked", n)
		r.change()
		return nil
	}
	return r.refuse(codeNeedConnection, "")
}

// keepArg is the argument of an invalidate command: 1 when the resync
// covers only the blocks already marked.
func keepArg(resetBitmap bool) uint64 {
	if resetBitmap {
		return 0
	}
	return 1
}

// PauseSync holds the resync (DRBD's pause-sync; the user flag).
func (r *Resource) PauseSync() error { return r.setPause(true) }

// ResumeSync lets a paused resync go on.
func (r *Resource) ResumeSync() error { return r.setPause(false) }

func (r *Resource) setPause(pause bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	was, p := r.userPaused, r.p
	if was == pause {
		r.mu.Unlock()
		if pause {
			return r.refuse(codePauseSet, "")
		}
		return r.refuse(codePauseClear, "")
	}
	r.userPaused = pause
	r.mu.Unlock()
	r.change()
	if p != nil {
		code := uint8(wire.CmdResumeSync)
		if pause {
			code = wire.CmdPauseSync
		}
		// Before the handshake's end the peer learns it there.
		p.sendAfterHello(func() wire.Message { return wire.Command{Code: code} })
	}
	return nil
}

// Snapshot returns the resource's state now.
func (r *Resource) Snapshot() Snapshot {
	r.mu.Lock()
	s := Snapshot{Name: r.name, Minor: r.minor, Peer: r.peer, Role: r.role, PeerRole: r.peerRole,
		Conn: r.conn, Disk: r.disk, PeerDisk: r.peerDisk, UserISP: r.userPaused, PeerISP: r.peerPaused,
		Suspended: r.fenceFrozen}
	md, inflight, p := r.md, r.inflight, r.p
	var rs *resync
	if p != nil {
		rs = p.rs
	}
	r.mu.Unlock()
	s.SentBytes, s.ReceivedBytes = r.netSent.Load(), r.netRecv.Load()
	s.WrittenBytes, s.ReadBytes = r.written.Load(), r.read.Load()
	s.ResyncBytes = r.resyncBytes.Load()
	s.AuthFailures = r.authFailures()
	s.HandlerRuns = r.handlers.counts()
	s.Counters = Counters{NS: s.SentBytes / 1024, NR: s.ReceivedBytes / 1024,
		DW: s.WrittenBytes / 1024, DR: s.ReadBytes / 1024,
		LO: r.local.Load(), AP: int64(inflight), EP: 1, WO: 'f'}
	conf := r.conf()
	if !conf.Disk.DiskFlushes {
		s.Counters.WO = 'n' // nothing orders epochs but their flushes
	}
	if p != nil {
		s.Counters.PE = p.tl.entriesInFlight()
		s.Counters.EP = p.epochsAlive()
		s.PendingBytes, s.Lag = p.tl.backlog(time.Now())
	}
	if s.Conn >= Unconnected {
		s.Protocol = conf.Net.Protocol
	}
	if s.Conn == Ahead {
		s.Congestion = 'a'
	}
	if md != nil {
		st := md.Stats()
		s.Counters.AL, s.Counters.BM = st.ALTransactions, st.BitmapWrites
		s.OutOfSyncBytes = md.OutOfSync() * 4096
		sb := md.Superblock()
		s.UUIDs = UUIDs{Current: sb.UUIDs.Current, Bitmap: sb.UUIDs.Bitmap, History: sb.UUIDs.History}
		s.SizeBytes = r.size.Load()
	}
	if rs != nil && s.Conn.Syncing() {
		left := s.OutOfSyncBytes / 4096
		if rs.verify {
			rs.mu.Lock()
			left = rs.total - min(rs.done, rs.total)
			rs.mu.Unlock()
		}
		s.Resync = rs.progress(left, time.Now())
		if s.UserISP || s.PeerISP {
			switch s.Conn {
			case SyncSource:
				s.Conn = PausedSyncS
			case SyncTarget:
				s.Conn = PausedSyncT
			}
		}
	}
	s.Clients = r.clients()
	return s
}

// StopHandlers kills a handler that runs and runs no more (handlers.go):
// a daemon that stops does not wait for a fence-peer's timeout. Stop and
// Abandon call it; a daemon calls it first, before it waits for its
// servers' requests (which a fence-peer run may hold).
func (r *Resource) StopHandlers() { r.handlers.stop() }

// Stop takes the resource down for a daemon shutdown: whoever holds it
// open, it stops taking requests, waits for those in flight, flushes the
// disk, writes the bitmap and marks the metadata clean. The role is
// recorded as Secondary: the next start comes up Secondary, as DRBD does.
func (r *Resource) Stop() error {
	r.StopHandlers()
	r.bgMu.Lock()
	r.stopping = true // no new background work (diskfail.go)
	r.bgMu.Unlock()
	r.bg.Wait() // a failed disk's detach
	defer r.closeDetached(nil)
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	if r.role == RolePrimary {
		r.setState(RoleSecondary, r.disk)
	}
	r.thawFencingLocked() // the requests held get ErrNotPrimary
	for r.inflight > 0 {
		r.idle.Wait()
	}
	md, dev := r.md, r.dev
	r.mu.Unlock()
	// A connected peer gets every write and the demotion before the
	// session ends, as after `secondary`: nothing is left for it to miss.
	if dev != nil {
		if err := dev.Flush(); err != nil {
			r.log.Error("flushing the disk at stop failed", "err", err)
		}
	}
	r.demotePeerSync()
	r.disconnect("the daemon stops")
	if md == nil {
		return nil
	}
	var errs []error
	if err := md.UpdateSuperblock(clearPrimary); err != nil {
		errs = append(errs, err)
	}
	if err := r.detach(); err != nil { // flushes the disk, then the metadata
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: stop: %w", r.name, err)
	}
	return nil
}

// Abandon drops the disk and the metadata at once, writing nothing, as a
// crash would: the next attach applies the activity log. Requests in
// flight finish first. It is the second-signal stop of the daemon.
func (r *Resource) Abandon() {
	r.StopHandlers()
	// The session goes first: its goroutines use the disk.
	r.mu.Lock()
	cancel, p, done := r.connCancel, r.p, r.connDone
	r.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if p != nil {
		p.s.Close("hard stop")
	}
	if done != nil {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			r.log.Error("the session did not end within 10 s of a hard stop")
		}
	}
	r.bgMu.Lock()
	r.stopping = true
	r.bgMu.Unlock()
	// A failed disk's detach, which the session's end lets go on; it may
	// wait on a disk that hangs, which a hard stop does not.
	bgDone := make(chan struct{})
	go func() {
		r.bg.Wait()
		close(bgDone)
	}()
	select {
	case <-bgDone:
	case <-time.After(10 * time.Second):
		r.log.Error("a failed disk's detach did not end within 10 s of a hard stop")
	}
	r.closeDetached(nil)
	r.stopWatch()
	r.mu.Lock()
	r.role = RoleSecondary // no new requests
	r.thawFencingLocked()
	for r.inflight > 0 { // the disk stays open under those in flight
		r.idle.Wait()
	}
	md, dev, mdev := r.md, r.dev, r.mdev
	r.md, r.dev, r.mdev = nil, nil, nil
	r.size.Store(0)
	r.role, r.disk = RoleSecondary, Diskless
	r.mu.Unlock()
	if md == nil {
		return
	}
	md.Abandon()
	dev.Close()
	mdev.Close()
	r.log.Warn("abandoned: the metadata is left unclean; the activity log is applied at the next attach")
}
