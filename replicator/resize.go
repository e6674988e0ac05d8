package replicator

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
)

// agreedSize is a session's agreed size in bytes: set by the handshake,
// changed by an online resize while the session's goroutines read it.
type agreedSize = atomic.Int64

// DRBD's resize refusals (reference/drbd.md §11.2).
const (
	codeResizeResync = 130
	codeNeedPrimary  = 131
)

func init() {
	stateTexts[codeResizeResync] = "Resize not allowed during resync."
	stateTexts[codeNeedPrimary] = "Need one Primary node to resize."
}

// ResizeOptions are the flags of `nbdmirror resize`.
type ResizeOptions struct {
	// Size is --size: the new size in bytes (a multiple of 4096); 0 takes
	// the most both disks hold.
	Size int64
	// AssumePeerHasSpace lets a Primary without a connected peer grow:
	// the peer's disk must hold the new size when it connects, or the
	// connection is refused ("The peer's disk size is too small!").
	AssumePeerHasSpace bool
	// AssumeClean skips the resync of the grown area: both disks are known
	// to hold the same there (zeroes, say).
	AssumeClean bool
	// AllowShrink permits a smaller Size; a filesystem found on the device
	// still bounds it.
	AllowShrink bool
}

// ErrResize is wrapped by resize refusals that are not DRBD state errors
// (exit code 20 in the CLI, as theirs).
var ErrResize = errors.New("resize refused")

// resizeWait bounds the wait for the peer's answers to a resize.
const resizeWait = 60 * time.Second

// resizeState is the Primary's side of a resize in progress: where the
// data loop hands the peer's answers.
type resizeState struct {
	mu      sync.Mutex
	waiting chan wire.Sizes // nil unless a resize waits for an answer
}

// Resize agrees a new size with the peer and grows (or, with AllowShrink
// and an explicit Size, shrinks) the metadata on both nodes, as
// `drbdadm resize`. It runs on the Primary. Connected, the peer is asked
// how much its disk holds, the new size is the smaller of both disks (or
// Size), the peer resizes first, then this node, and then the grown area
// is resynced from this node (unless AssumeClean). Disconnected, only
// with AssumePeerHasSpace: this node grows alone and marks the new area,
// and the peer takes the size at the next connect. Application I/O is held
// while the size changes. The result says what was done, in one line.
func (r *Resource) Resize(o ResizeOptions) (string, error) {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	md, dev, mdev, role, conn, p := r.md, r.dev, r.mdev, r.role, r.conn, r.p
	// No new session starts until this resize is done (its handshake
	// would agree a size while it changes, or the old size after the
	// session in use was lost midway).
	release := r.holdHandshakesLocked()
	r.mu.Unlock()
	defer release()
	switch {
	case md == nil:
		return "", r.refuse(codeDiskless, "")
	case role != RolePrimary:
		return "", r.refuse(codeNeedPrimary, fmt.Sprintf("this node is %s: run resize on the Primary", role))
	case p != nil && conn >= WFReportParams && conn != Connected:
		return "", r.refuse(codeResizeResync, fmt.Sprintf("%s: wait for it to end", conn))
	case o.Size < 0 || o.Size%bitmap.BlockSize != 0:
		return "", fmt.Errorf("%s: %w: --size %d is not a multiple of 4096 bytes", r.name, ErrResize, o.Size)
	}
	connected := p != nil && conn == Connected
	if connected && p.s.Version() < wire.SizesVersion {
		return "", fmt.Errorf("%s: %w: the peer speaks peer protocol %d, which has no online resize (%d and newer): upgrade it, or disconnect, resize with --assume-peer-has-space, and connect",
			r.name, ErrResize, p.s.Version(), wire.SizesVersion)
	}
	if err := dev.Refresh(); err != nil {
		return "", fmt.Errorf("%s: resize: %w", r.name, err)
	}
	target, capped, err := layoutOf(r.host, mdev.File)
	if err != nil {
		return "", fmt.Errorf("%s: resize: %w", r.name, err)
	}
	mine := target.DataSize
	theirs := int64(-1)
	if connected {
		a, err := p.askSizes(wire.Sizes{Kind: wire.SizesQuery, Disk: uint64(mine), Size: uint64(r.size.Load())}, wire.SizesReply)
		if err != nil {
			return "", fmt.Errorf("%s: resize: %w", r.name, err)
		}
		theirs = int64(a.Disk)
	} else if !o.AssumePeerHasSpace {
		return "", fmt.Errorf("%s: %w: the peer is not connected, so the size its disk holds is unknown: connect it first, or give --assume-peer-has-space (the peer must then hold the new size to connect)",
			r.name, ErrResize)
	}
	most := mine
	if theirs >= 0 {
		most = min(mine, theirs)
	}
	cur := r.size.Load()
	size := o.Size
	if size == 0 {
		size = most
	}
	if size > most {
		why := fmt.Sprintf("this node holds %d bytes", mine)
		if theirs >= 0 {
			why += fmt.Sprintf(", the peer %d", theirs)
		}
		if capped != nil && mine < size {
			why += fmt.Sprintf(" (%v: grow the metadata device, or move to meta-disk internal, then retry)", capped)
		}
		return "", fmt.Errorf("%s: %w: --size %d is more than the disks hold: %s", r.name, ErrResize, size, why)
	}
	if size == cur {
		msg := fmt.Sprintf("%s: the size stays %d bytes", r.name, cur)
		if o.Size == 0 {
			msg += fmt.Sprintf(" (the most both disks hold: here %d", mine)
			if theirs >= 0 {
				msg += fmt.Sprintf(", on the peer %d", theirs)
			}
			msg += "); grow the backing disks first"
			if capped != nil && size == mine {
				msg += fmt.Sprintf(" (%v)", capped)
			}
		}
		return msg, nil
	}
	if size < cur {
		if err := r.checkShrink(o, cur, size); err != nil {
			return "", err
		}
	}
	// This node's metadata must take the size before the peer is asked
	// to (internal metadata moved over itself is refused).
	if err := md.CheckResize(target, size); err != nil {
		return "", fmt.Errorf("%s: resize: metadata on %s: %w", r.name, mdev.Path, err)
	}
	grow := size > cur
	markNew := grow && !o.AssumeClean

	peerMarked := false // the peer marked blocks (its old internal metadata area)
	// No application request runs from here until the size has changed.
	r.freeze()
	defer r.thaw()
	if connected {
		// Every write still in the transfer log holds its extents until
		// the peer acks its epoch: close the epoch and wait.
		if done := p.tl.barrierNow(false, true); done != nil {
			select {
			case <-done:
			case <-p.ctx.Done():
				return "", fmt.Errorf("%s: resize: the connection was lost; retry", r.name)
			case <-time.After(resizeWait):
				return "", fmt.Errorf("%s: resize: the peer did not ack the writes before the resize within %v; retry", r.name, resizeWait)
			}
		}
		set := wire.Sizes{Kind: wire.SizesSet, Disk: uint64(mine), Size: uint64(size)}
		if o.AssumeClean {
			set.Flags = wire.SizesAssumeClean
		}
		a, err := p.askSizes(set, wire.SizesDone)
		if err != nil {
			return "", fmt.Errorf("%s: resize: %w", r.name, err)
		}
		if a.Status == wire.SizesFailed || a.Size != uint64(size) {
			return "", fmt.Errorf("%s: resize: the peer could not resize its metadata to %d bytes (see its log: busy with an administrative command, retry; or its disk); nothing changed here", r.name, size)
		}
		peerMarked = a.Status == wire.SizesMarked
		r.mu.Lock()
		current := p.current()
		r.mu.Unlock()
		if !current {
			return "", fmt.Errorf("%s: %w: the connection was lost after the peer resized to %d bytes, before this node did: nothing changed here; run resize again with --size %d (and --assume-peer-has-space while disconnected) so that both nodes agree",
				r.name, ErrResize, size, size)
		}
	}
	if err := md.Resize(target, size, markNew); err != nil {
		return "", fmt.Errorf("%s: resize: metadata on %s: %w", r.name, mdev.Path, err)
	}
	r.size.Store(size)
	if p != nil {
		p.size.Store(size)
	}
	r.log.Info("resized", "bytes", size, "was", cur, "connected", connected, "new_area_marked", markNew)
	r.change()
	msg := fmt.Sprintf("%s: resized from %d to %d bytes", r.name, cur, size)
	if capped != nil && size == mine && o.Size == 0 {
		msg += fmt.Sprintf(" (all the metadata can describe: %v; grow the metadata device to go further)", capped)
	}
	switch {
	case !grow:
	case connected && (markNew || peerMarked || md.OutOfSync() > 0):
		// DRBD's resync after an online grow: this node is SyncSource.
		if err := p.startSync(true, false, &wire.Command{Code: wire.CmdInvalidateRemote, Arg: 1}); err != nil {
			return "", fmt.Errorf("%s: resize: the size changed, but the resync of the new area did not start: %w", r.name, err)
		}
		msg += "; the new area is being synced to the peer"
	case connected:
		msg += "; the new area is taken as equal on both nodes (--assume-clean)"
	case markNew:
		msg += "; the new area is marked out of sync for the peer's next connect"
	default:
		msg += "; the peer takes the new size at its next connect, where it marks the new area and is resynced there from this node (--assume-clean spares that only in a connected resize)"
	}
	return msg + "; NBD clients see the new size when they reconnect", nil
}

// checkShrink refuses a shrink that was not asked for explicitly, or that
// would cut off part of an ext2/3/4 filesystem found on the device.
func (r *Resource) checkShrink(o ResizeOptions, cur, size int64) error {
	if o.Size == 0 || !o.AllowShrink {
		return fmt.Errorf("%s: %w: this would shrink the device from %d to %d bytes (the disks hold no more): shrinking needs an explicit --size and --allow-shrink",
			r.name, ErrResize, cur, size)
	}
	fs, err := r.extSize()
	if err != nil {
		return fmt.Errorf("%s: resize: read the device's first blocks: %w", r.name, err)
	}
	if fs > size {
		return fmt.Errorf("%s: %w: shrinking below the filesystem is refused: an ext filesystem of %d bytes starts at offset 0; shrink it first (resize2fs), then resize to at least its size",
			r.name, ErrResize, fs)
	}
	return nil
}

// extSize returns the size of the ext2/3/4 filesystem whose superblock
// lies at offset 1024 of the device, or 0 if there is none.
func (r *Resource) extSize() (int64, error) {
	r.mu.Lock()
	dev := r.dev
	r.mu.Unlock()
	if dev == nil {
		return 0, nil
	}
	sb := make([]byte, 1024)
	if _, err := dev.ReadAt(sb, 1024); err != nil {
		return 0, err
	}
	return extFSBytes(sb), nil
}

// extFSBytes returns the bytes an ext2/3/4 superblock (the 1024 bytes at
// offset 1024) says its filesystem spans, or 0 if sb is not one.
func extFSBytes(sb []byte) int64 {
	const (
		offBlocksLo   = 4
		offLogBlock   = 24
		offMagic      = 56
		offIncompat   = 96
		offBlocksHi   = 0x150
		incompat64bit = 0x80
	)
	if len(sb) < 1024 || binary.LittleEndian.Uint16(sb[offMagic:]) != 0xEF53 {
		return 0
	}
	blocks := uint64(binary.LittleEndian.Uint32(sb[offBlocksLo:]))
	if binary.LittleEndian.Uint32(sb[offIncompat:])&incompat64bit != 0 {
		blocks |= uint64(binary.LittleEndian.Uint32(sb[offBlocksHi:])) << 32
	}
	logBlock := binary.LittleEndian.Uint32(sb[offLogBlock:])
	if logBlock > 6 { // blocks of at most 64 KiB
		return 0
	}
	return int64(min(blocks<<(10+logBlock), 1<<62))
}

// askSizes sends m on the data stream and waits for the peer's answer of
// kind want.
func (p *peer) askSizes(m wire.Sizes, want uint8) (wire.Sizes, error) {
	rz := &p.r.resizing
	ch := make(chan wire.Sizes, 1)
	rz.mu.Lock()
	rz.waiting = ch
	rz.mu.Unlock()
	defer func() {
		rz.mu.Lock()
		rz.waiting = nil
		rz.mu.Unlock()
	}()
	if !p.sendAfterHello(func() wire.Message { return m }) {
		return wire.Sizes{}, errors.New("the connection was lost; retry")
	}
	select {
	case a := <-ch:
		if a.Kind != want {
			err := protoErr("resize: answer of kind %d, expected %d", a.Kind, want)
			p.fail(err)
			return wire.Sizes{}, err
		}
		return a, nil
	case <-p.ctx.Done():
		return wire.Sizes{}, errors.New("the connection was lost; retry")
	case <-time.After(resizeWait):
		return wire.Sizes{}, fmt.Errorf("the peer did not answer within %v", resizeWait)
	}
}

// receiveSizes handles a Sizes message from the peer (data loop).
func (p *peer) receiveSizes(m wire.Sizes) error {
	r := p.r
	switch m.Kind {
	case wire.SizesReply, wire.SizesDone:
		rz := &r.resizing
		rz.mu.Lock()
		ch := rz.waiting
		rz.waiting = nil
		rz.mu.Unlock()
		if ch == nil {
			return protoErr("resize answer (kind %d) that nobody asked for", m.Kind)
		}
		ch <- m
		return nil
	case wire.SizesQuery:
		reply := wire.Sizes{Kind: wire.SizesReply, Size: uint64(r.size.Load())}
		if c, err := r.capacity(); err != nil {
			r.log.Error("resize: measuring the disk failed; telling the peer it holds only the current size", "err", err)
			reply.Disk = reply.Size
		} else {
			reply.Disk = uint64(c.DataSize)
		}
		p.sendAfterHello(func() wire.Message { return reply })
		return nil
	}
	// SizesSet: the Primary resizes; this node first.
	r.mu.Lock()
	role, peerRole, conn := r.role, r.peerRole, r.conn
	r.mu.Unlock()
	if role == RolePrimary || peerRole != RolePrimary || conn != Connected {
		return protoErr("resize asked while %s/%s, peer %s", conn, role, peerRole)
	}
	done := wire.Sizes{Kind: wire.SizesDone, Size: m.Size}
	// The resize is an administrative state change here too: none runs
	// meanwhile (invalidate, verify, detach, …). The data loop cannot
	// wait for one (it may wait for this loop), so a busy node refuses
	// and the Primary's resize says to retry.
	var marked uint64
	var err error
	if r.admin.TryLock() {
		marked, err = r.resizeForPeer(p, int64(m.Size))
		r.admin.Unlock()
	} else {
		err = errors.New("an administrative command is running on this node; retry the resize on the Primary")
	}
	switch {
	case err != nil:
		r.log.Error("resize asked by the peer failed", "bytes", m.Size, "err", err)
		done.Status = wire.SizesFailed
	case marked > 0:
		done.Status = wire.SizesMarked
		fallthrough
	default:
		r.log.Info("resized as the peer asked", "bytes", m.Size, "assume_clean", m.Flags&wire.SizesAssumeClean != 0,
			"blocks_marked", marked)
	}
	p.sendAfterHello(func() wire.Message { return done })
	r.change()
	return nil
}

// resizeForPeer changes this node's metadata and size to size bytes, as
// the peer asked (markNew false: the peer, the Primary, marks and resyncs
// the new area; an internal metadata area that moved is marked here). It
// returns how many blocks that marked.
func (r *Resource) resizeForPeer(p *peer, size int64) (uint64, error) {
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if md == nil {
		return 0, errors.New("no disk")
	}
	target, err := r.capacity()
	if err != nil {
		return 0, err
	}
	if size > target.DataSize {
		return 0, fmt.Errorf("%d bytes asked, the disk and metadata hold %d", size, target.DataSize)
	}
	before := md.OutOfSync()
	if err := md.Resize(target, size, false); err != nil {
		return 0, err
	}
	r.size.Store(size)
	p.size.Store(size)
	return md.OutOfSync() - min(before, md.OutOfSync()), nil
}

// capacity measures the disk and the metadata device now: the layout
// whose DataSize is the most data this node can hold.
func (r *Resource) capacity() (metadisk.Layout, error) {
	r.mu.Lock()
	dev, mdev := r.dev, r.mdev
	r.mu.Unlock()
	if dev == nil {
		return metadisk.Layout{}, errors.New("no disk")
	}
	if err := dev.Refresh(); err != nil {
		return metadisk.Layout{}, err
	}
	l, _, err := layoutOf(r.host, mdev.File)
	return l, err
}

// sizePlan is the handshake's size agreement: the agreed size, and what
// the metadata needs to cover it, applied (applySize) only once the
// handshake accepted the connection.
type sizePlan struct {
	size   int64 // the agreed size in bytes
	meta   bool  // the metadata moves to size (grown, or cut on an Inconsistent disk)
	grow   bool  // ... growing: the new area is marked out of sync
	resync int   // +1: the peer grows at this connect and this node resyncs it; -1: this node grows and is resynced
}

// agreeSize is the handshake's size agreement. Each side says how much its
// disk holds now (DiskSize) and the size it last agreed (Size, which its
// metadata covers). Normally both Sizes are equal and stay. If they
// differ (one node was resized without the other: while disconnected, or
// a resize the connection lost midway), a Primary's Size wins, with no
// Primary that of the node with data over one without (Inconsistent), and
// otherwise the larger, as long as both disks hold it: the node behind
// grows its metadata and marks the new area, and a resync from the node
// ahead covers it. Otherwise the smaller disk wins. As DRBD's
// receive_sizes, a connect never shrinks a node that holds data (its disk
// Outdated or better, or Primary): it refuses the connection ("The peer's
// disk size is too small!"); only an Inconsistent disk is cut to the
// agreed size. A connect never grows the device beyond the size a node
// was resized to. Nothing changes here: applySize does, once the
// handshake accepted the connection.
func (p *peer) agreeSize(mine, theirs wire.Params, peerRole Role, peerDisk DiskState) (sizePlan, error) {
	r := p.r
	r.mu.Lock()
	in := sizeInput{role: r.role, peerRole: peerRole, disk: r.disk, peerDisk: peerDisk, cur: r.size.Load(), has: -1,
		version: p.s.Version(), mine: mine, theirs: theirs}
	if r.md != nil {
		in.has = r.md.Layout().DataSize
	}
	r.mu.Unlock()
	return agreeSizes(in)
}

// sizeInput is what agreeSizes decides on.
type sizeInput struct {
	role, peerRole Role
	disk, peerDisk DiskState
	cur            int64 // this node's size
	has            int64 // what its metadata covers (-1: none)
	version        uint16
	mine, theirs   wire.Params
}

// agreeSizes is agreeSize's decision (a pure function of its input).
func agreeSizes(in sizeInput) (sizePlan, error) {
	mine, theirs, role, peerRole, disk := in.mine, in.theirs, in.role, in.peerRole, in.disk
	smaller := min(mine.DiskSize, theirs.DiskSize)
	smaller -= smaller % bitmap.BlockSize
	size := smaller
	want := max(mine.Size, theirs.Size)
	switch {
	case role == RolePrimary:
		want = mine.Size
	case peerRole == RolePrimary:
		want = theirs.Size
	case disk >= Outdated && in.peerDisk < Outdated:
		// A node with data over one without (created afresh, or
		// invalidated): the size of the data wins; the other's Size
		// grows no node.
		want = mine.Size
	case in.peerDisk >= Outdated && disk < Outdated:
		want = theirs.Size
	}
	if want > 0 && want <= size {
		size = want
	}
	size -= size % bitmap.BlockSize
	cur := uint64(in.cur)
	switch {
	case size < cur && role == RolePrimary:
		return sizePlan{}, &errRefused{reason: fmt.Sprintf("The peer's disk size is too small! (%d bytes, this Primary exports %d): dropping connection", theirs.DiskSize, cur)}
	case peerRole == RolePrimary && size < theirs.Size:
		// The Primary refuses too; nothing here changes.
		return sizePlan{}, &errRefused{reason: fmt.Sprintf("this disk holds %d bytes, less than the %d the Primary exports: grow it, then connect; dropping connection", mine.DiskSize, theirs.Size)}
	case size < cur && disk >= Outdated:
		return sizePlan{}, &errRefused{reason: fmt.Sprintf("The peer's disk size is too small! (%d bytes agreed, this node holds data up to %d): grow the peer's disk (or, to give up this node's data, invalidate it), then connect; dropping connection", size, cur)}
	}
	plan := sizePlan{size: int64(size)}
	if in.has >= 0 {
		plan.grow = plan.size > in.has
		plan.meta = plan.grow || plan.size < in.has && role != RolePrimary
	}
	if in.version < wire.SizesVersion {
		// The peer takes the smaller disk and changes no metadata.
		if size != smaller || plan.grow {
			return sizePlan{}, &errRefused{reason: fmt.Sprintf("the peer speaks peer protocol %d, which takes the smaller disk (%d bytes) and never resizes metadata, while this node needs %d bytes (it was resized): upgrade the peer; dropping connection", in.version, smaller, size)}
		}
		return plan, nil
	}
	// A node behind the agreed size grows and marks its new area; the
	// node ahead holds the data there and resyncs it, whatever the
	// generations say (both sides decide this alike, mirrored).
	switch {
	case size > mine.Size && mine.Size > 0:
		plan.resync = -1
	case size > theirs.Size && theirs.Size > 0:
		plan.resync = +1
	}
	return plan, nil
}

// applySize makes plan this node's size, once the handshake accepted the
// connection: the metadata covers the agreed size, so that a restart
// comes back at it (DRBD's la-size).
func (p *peer) applySize(plan sizePlan) error {
	r := p.r
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if md != nil && plan.meta {
		has := md.Layout().DataSize
		target, err := r.capacity()
		if err == nil {
			err = md.Resize(target, plan.size, plan.grow)
		}
		if err != nil {
			return &errRefused{reason: fmt.Sprintf("resizing the metadata to the %d bytes agreed with the peer failed: %v; dropping connection", plan.size, err)}
		}
		if plan.grow {
			r.log.Info("grown to the size the peer was resized to; the new area is marked out of sync", "bytes", plan.size, "was", has)
		} else {
			r.log.Info("the metadata of this Inconsistent disk now covers the size agreed with the smaller peer", "bytes", plan.size, "disk_holds", has)
		}
	}
	if cur := r.size.Load(); plan.size != cur {
		r.log.Info("size agreed with the peer", "bytes", plan.size, "was", cur)
		r.size.Store(plan.size)
	}
	p.size.Store(plan.size)
	return nil
}
