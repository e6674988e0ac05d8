package replicator

import (
	"fmt"
	"time"

	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
)

// Congestion (reference/drbd.md §7). With on-congestion block, a writer
// whose data does not fit in the link's buffers waits (the transport's
// Send blocks). With pull-ahead, when congestion-fill bytes are sent and
// not yet barrier-acked, or congestion-extents activity-log extents are in
// use, the Primary goes Ahead: writes are no longer replicated, only
// marked here and announced to the peer (OutOfSync), which is Behind and
// Outdated. Once nothing is in flight for aheadDrain, a resync of the
// marked blocks brings the peer back, and replication resumes. Unlike
// DRBD (issue #46, resync and pull-ahead looping), a node only goes Ahead
// from Connected, never during the resync that ends an Ahead period. With
// on-congestion disconnect, the session is dropped instead.

const aheadDrain = time.Second

// congested reports whether a write on a Connected session has to go
// Ahead (or disconnect) rather than be replicated.
func (r *Resource) congested(p *peer, md *metadisk.Meta) (bool, string) {
	n := r.conf().Net
	if n.OnCongestion != "pull-ahead" && n.OnCongestion != "disconnect" {
		return false, ""
	}
	if n.OnCongestion == "pull-ahead" && r.cfg.Net.Protocol != config.ProtocolA {
		// Only protocol A goes Ahead: protocol B and C writes are
		// acknowledged by the peer (the running protocol, r.cfg's, is
		// what counts; adjust keeps such a change for down/up).
		return false, ""
	}
	if n.CongestionFill > 0 && p.tl.inFlight() >= n.CongestionFill {
		return true, "Congestion-fill threshold reached"
	}
	if x := n.CongestionExtents; x > 0 && x < md.ALCapacity() && len(md.ActiveExtents()) >= x {
		return true, "Congestion-extents threshold reached"
	}
	return false, ""
}

// goAhead switches a congested Connected session to Ahead (or drops it,
// with on-congestion disconnect).
func (r *Resource) goAhead(p *peer, why string) {
	if r.conf().Net.OnCongestion == "disconnect" {
		r.log.Warn(why + ": dropping the connection (on-congestion disconnect)")
		p.fail(fmt.Errorf("%s (on-congestion disconnect)", why))
		return
	}
	r.mu.Lock()
	if !p.current() || r.conn != Connected {
		r.mu.Unlock()
		return
	}
	r.log.Warn(why)
	r.setConn(Ahead)
	r.mu.Unlock()
	r.change()
	p.tl.barrierNow(false, false)
	if !p.sendAfterHello(func() wire.Message { return wire.Command{Code: wire.CmdAhead} }) {
		return
	}
	r.mu.Lock()
	p.goSession(p.leaveAhead)
	r.mu.Unlock()
}

// leaveAhead waits until nothing has been in flight for aheadDrain, then
// starts the resync of what was marked meanwhile. Application requests
// wait while the bitmap is sent, so none is marked after it left.
func (p *peer) leaveAhead() {
	r := p.r
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var idleSince time.Time
	for {
		select {
		case <-p.ctx.Done():
			return
		case now := <-tick.C:
			if p.tl.inFlight() > 0 {
				idleSince = time.Time{}
				continue
			}
			if idleSince.IsZero() {
				idleSince = now
			}
			if now.Sub(idleSince) < aheadDrain {
				continue
			}
		}
		r.freeze()
		r.mu.Lock()
		ahead := r.p == p && r.conn == Ahead
		r.mu.Unlock()
		var err error
		if ahead {
			r.log.Info("the link drained: resyncing what changed while Ahead")
			err = p.startSync(true, false, &wire.Command{Code: wire.CmdInvalidateRemote, Arg: 1})
		}
		r.thaw()
		if err != nil {
			p.fail(err)
		}
		return
	}
}

// receiveOutOfSync marks blocks the Ahead Primary changed (Behind).
func (p *peer) receiveOutOfSync(m wire.OutOfSync) error {
	r := p.r
	r.mu.Lock()
	conn := r.conn
	r.mu.Unlock()
	if conn != Behind {
		return protoErr("out-of-sync notice while %s", conn)
	}
	if err := p.checkRange("out-of-sync notice", m.Offset, m.Length); err != nil {
		return err
	}
	p.md.MarkOutOfSync(int64(m.Offset), int64(m.Length))
	return nil
}

// goBehind follows the peer into Ahead/Behind: this disk is Outdated
// (durably) until the resync.
func (p *peer) goBehind() error {
	r := p.r
	r.mu.Lock()
	conn, role := r.conn, r.role
	r.mu.Unlock()
	if conn != Connected || role == RolePrimary {
		return protoErr("the peer went Ahead while this node is %s/%s", role, conn)
	}
	if err := p.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		sb.Flags &^= metadisk.FlagWasUpToDate
	}); err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	r.mu.Lock()
	r.setConn(Behind)
	if r.disk > Outdated {
		r.setState(r.role, Outdated)
	}
	r.mu.Unlock()
	p.sendState()
	r.change()
	return nil
}
