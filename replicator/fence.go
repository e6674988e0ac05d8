package replicator

// Peer fencing (reference/drbd.md §3.4, reference/ops.md §4): with
// `fencing resource-only` or `resource-and-stonith`, a node that may take
// writes without its peer first has the fence-peer handler make sure the
// peer cannot be promoted with older data (typically a Pacemaker location
// constraint placed by crm-fence-peer.9.sh), and interprets its exit code
// as DRBD's conn_try_outdate_peer():
//
//	3  the peer is Inconsistent already          → fenced
//	4  the peer was outdated (fenced)            → fenced
//	5  the peer is unreachable, assumed dead     → fenced if this disk is UpToDate
//	6  the peer is Primary or has newer data     → this node outdates itself
//	7  the peer was STONITHed                    → fenced
//	*  the helper is broken                      → not fenced
//
// "Fenced" is kept in the metadata (the peer-outdated flag): a restarted
// node whose disk was UpToDate attaches UpToDate, not Consistent, and a
// promotion does not ask again. The flag goes, and unfence-peer runs, once
// the peer is connected with UpToDate data.

import (
	"fmt"

	"github.com/nbdmirror/nbdmirror/metadisk"
)

// The fence-peer handler's exit codes.
const (
	fencePeerInconsistent = 3
	fencePeerOutdated     = 4
	fencePeerUnreachable  = 5
	fenceOutdateMyself    = 6
	fencePeerStonithed    = 7
)

// fencingOn reports whether the fencing policy asks for fence-peer.
func (r *Resource) fencingOn() bool {
	f := r.cfg.Disk.Fencing
	return f == "resource-only" || f == "resource-and-stonith"
}

// fenceOutcome is what a fence-peer run decided.
type fenceOutcome struct {
	status      int
	fenced      bool // the peer cannot be promoted with newer data
	outdateSelf bool // the peer is Primary or newer: this disk is Outdated
}

// fencePeer runs the fence-peer handler (blocking) and interprets its exit
// code; with fenced, the peer-outdated flag is written to the metadata.
// localUpToDate is whether this disk is UpToDate (exit code 5).
func (r *Resource) fencePeer(e handlerEnv, localUpToDate bool) fenceOutcome {
	r.handlers.fence.Lock()
	defer r.handlers.fence.Unlock()
	st := r.runHandler(e)
	out := fenceOutcome{status: st}
	var text string
	switch st {
	case fencePeerInconsistent:
		out.fenced, text = true, "peer is inconsistent"
	case fencePeerOutdated:
		out.fenced, text = true, "peer was fenced"
	case fencePeerUnreachable:
		out.fenced, text = localUpToDate, "peer is unreachable, assumed to be dead"
	case fenceOutdateMyself:
		out.outdateSelf, text = true, "peer is primary, outdating myself"
	case fencePeerStonithed:
		out.fenced, text = true, "peer was stonithed"
		if r.cfg.Disk.Fencing != "resource-and-stonith" {
			r.log.Error("fence-peer() = 7 && fencing != Stonith !!!")
		}
	default:
		text = "helper broken"
	}
	if e.command == "" {
		text = "no fence-peer handler configured"
	}
	r.log.Info(fmt.Sprintf("fence-peer helper returned %d (%s)", st, text))
	if out.fenced {
		if err := r.setPeerOutdated(); err != nil {
			r.log.Error("recording the fenced peer in the metadata failed", "err", err)
		}
	}
	return out
}

// setPeerOutdated records that the peer is fenced; I/O that fencing
// suspended goes on.
func (r *Resource) setPeerOutdated() error {
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if md == nil {
		return nil
	}
	if err := md.UpdateSuperblock(func(sb *metadisk.Superblock) { sb.Flags |= metadisk.FlagPeerOutdated }); err != nil {
		return err
	}
	r.mu.Lock()
	r.peerOutdated = true
	r.fenceGen++
	frozen := r.fenceFrozen
	r.thawFencingLocked()
	r.mu.Unlock()
	if frozen {
		r.change()
	}
	return nil
}

// outdateSelf marks this Secondary's disk Outdated (fence-peer's 6): it
// is not promoted with it until it is resynced or forced.
func (r *Resource) outdateSelf() error {
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if md == nil {
		return nil
	}
	if err := md.UpdateSuperblock(func(sb *metadisk.Superblock) { sb.Flags &^= metadisk.FlagWasUpToDate }); err != nil {
		return err
	}
	r.mu.Lock()
	if r.role != RolePrimary && r.disk > Outdated {
		r.setState(r.role, Outdated)
	}
	r.mu.Unlock()
	r.change()
	return nil
}

// freezeForFencingLocked holds new application requests back while
// fence-peer runs after the peer was lost (resource-and-stonith); those
// in flight finish. Call with r.mu held.
func (r *Resource) freezeForFencingLocked() {
	if !r.fenceFrozen {
		r.fenceFrozen = true
		r.frozen++
	}
}

// thawFencingLocked lets the requests held for fencing go. Call with
// r.mu held.
func (r *Resource) thawFencingLocked() {
	if r.fenceFrozen {
		r.fenceFrozen = false
		r.frozen--
		r.idle.Broadcast()
	}
}

// ResumeIO lets application requests go that fencing holds back after a
// fence-peer handler failed to fence the peer (DRBD's resume-io): the
// administrator has made sure the peer will not be promoted. Nothing
// happens if nothing is held.
func (r *Resource) ResumeIO() error {
	r.mu.Lock()
	frozen := r.fenceFrozen
	r.thawFencingLocked()
	r.mu.Unlock()
	if !frozen {
		return nil
	}
	r.log.Warn("I/O resumed by the administrator while the peer is not fenced")
	r.change()
	return nil
}

// fenceLostPeer runs fence-peer after a Primary lost a peer whose disk
// might have been promoted (Consistent or UpToDate). With
// resource-and-stonith the application's requests were held back when the
// session ended; they go once the peer is fenced, else they stay held
// until the peer is back or resume-io.
func (r *Resource) fenceLostPeer(e handlerEnv) {
	r.mu.Lock()
	frozen := r.fenceFrozen
	r.mu.Unlock()
	out := r.fencePeer(e, e.disk == UpToDate) // thaws if fenced
	switch {
	case out.outdateSelf:
		r.log.Error("fence-peer says the peer is Primary or has newer data, but this node is Primary: demote it")
	case !out.fenced && frozen:
		r.log.Error("I/O stays suspended: the peer is not fenced; it resumes when the peer is back, or with 'nbdmirror resume-io " + r.name + "'")
	case !out.fenced:
		r.log.Warn("the peer is not fenced: it could be promoted with older data")
	}
}

// unfenceable reports whether the fenced peer is back with the data: this
// session connected, no resync running or about to start, the peer
// UpToDate. Call with r.mu held.
func (r *Resource) unfenceable() bool {
	c := r.conn
	return r.p != nil && (c == Connected || c == VerifyS || c == VerifyT) && r.peerDisk == UpToDate
}

// maybeUnfenceLocked clears the peer-outdated flag and queues unfence-peer
// once the peer is back with the data. The job checks again, under the
// fencing lock, that the same session still is and that no fence-peer
// came in between. Call with r.mu held.
func (r *Resource) maybeUnfenceLocked() {
	if !r.peerOutdated || r.unfencing || r.md == nil || !r.unfenceable() {
		return
	}
	r.unfencing = true
	md, p, gen, e := r.md, r.p, r.fenceGen, r.handlerEnvLocked("unfence-peer")
	r.handlers.enqueue(func() {
		r.handlers.fence.Lock()
		defer r.handlers.fence.Unlock()
		r.mu.Lock()
		ok := r.p == p && r.fenceGen == gen && r.peerOutdated && r.unfenceable()
		if !ok {
			r.unfencing = false
			r.maybeUnfenceLocked() // a newer session may be ready by now
		}
		r.mu.Unlock()
		if !ok {
			return
		}
		err := md.UpdateSuperblock(func(sb *metadisk.Superblock) { sb.Flags &^= metadisk.FlagPeerOutdated })
		r.mu.Lock()
		r.unfencing = false
		if err == nil {
			r.peerOutdated = false
		}
		r.mu.Unlock()
		if err != nil {
			r.log.Error("clearing the fenced peer in the metadata failed", "err", err)
			return
		}
		r.runHandler(e)
	})
}
