package replicator

import (
	"fmt"
	"maps"
	"reflect"
	"strings"

	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// When a configuration change made by `adjust` takes effect.
type AdjustWhen int

// The classes of configuration keys, as README's adjust table lists them.
const (
	// AdjustLive: at once (the fixed resync rate, the congestion policy
	// and the handler runs read them each time).
	AdjustLive AdjustWhen = iota
	// AdjustNextResync: in effect now, read when a resync starts (the
	// dynamic controller's settings and c-min-rate): a running resync
	// keeps the ones it started with.
	AdjustNextResync
	// AdjustNextConnect: when the next connection is set up
	// (`disconnect` then `connect`; a reconnect after a network failure
	// keeps the link's settings).
	AdjustNextConnect
	// AdjustDownUp: at the next `up` after a `down` (at once if the
	// resource is down).
	AdjustDownUp
	// AdjustRestart: only a daemon restart (the kernel device, the set
	// of resources and nodes).
	AdjustRestart
)

func (w AdjustWhen) String() string {
	switch w {
	case AdjustLive:
		return "applied now"
	case AdjustNextResync:
		return "from the next resync"
	case AdjustNextConnect:
		return "at the next connect (disconnect; connect)"
	case AdjustDownUp:
		return "needs down/up"
	}
	return "needs a daemon restart"
}

// adjustKey is one configuration key: its drbd.conf name, when a change
// of it takes effect, and how to read it.
type adjustKey struct {
	name string
	when AdjustWhen
	get  func(c *config.Resource, h *config.Host) any
}

func netKey(name string, when AdjustWhen, f func(n *config.Net) any) adjustKey {
	return adjustKey{name, when, func(c *config.Resource, _ *config.Host) any { return f(&c.Net) }}
}

func diskKey(name string, when AdjustWhen, f func(d *config.Disk) any) adjustKey {
	return adjustKey{name, when, func(c *config.Resource, _ *config.Host) any { return f(&c.Disk) }}
}

// adjustKeys lists every key adjust compares. The live and next-connect
// ones are copied into the configuration in effect (Resource.conf), whose
// readers see them; the others wait for down/up (Resource.pending).
var adjustKeys = []adjustKey{
	diskKey("resync-rate", AdjustLive, func(d *config.Disk) any { return d.ResyncRate }),
	diskKey("c-plan-ahead", AdjustNextResync, func(d *config.Disk) any { return d.CPlanAhead }),
	diskKey("c-fill-target", AdjustNextResync, func(d *config.Disk) any { return d.CFillTarget }),
	diskKey("c-delay-target", AdjustNextResync, func(d *config.Disk) any { return d.CDelayTarget }),
	diskKey("c-max-rate", AdjustNextResync, func(d *config.Disk) any { return d.CMaxRate }),
	diskKey("c-min-rate", AdjustNextResync, func(d *config.Disk) any { return d.CMinRate }),
	netKey("on-congestion", AdjustLive, func(n *config.Net) any { return n.OnCongestion }),
	netKey("congestion-fill", AdjustLive, func(n *config.Net) any { return n.CongestionFill }),
	netKey("congestion-extents", AdjustLive, func(n *config.Net) any { return n.CongestionExtents }),

	netKey("shared-secret", AdjustNextConnect, func(n *config.Net) any { return n.SharedSecret }),
	netKey("cram-hmac-alg", AdjustNextConnect, func(n *config.Net) any { return n.CramHMACAlg }),
	netKey("timeout", AdjustNextConnect, func(n *config.Net) any { return n.Timeout }),
	netKey("ping-int", AdjustNextConnect, func(n *config.Net) any { return n.PingInt }),
	netKey("ping-timeout", AdjustNextConnect, func(n *config.Net) any { return n.PingTimeout }),
	netKey("connect-int", AdjustNextConnect, func(n *config.Net) any { return n.ConnectInt }),
	netKey("sndbuf-size", AdjustNextConnect, func(n *config.Net) any { return n.SndbufSize }),
	netKey("compression", AdjustNextConnect, func(n *config.Net) any { return n.Compression }),
	netKey("tls-cert", AdjustNextConnect, func(n *config.Net) any { return n.TLSCert }),
	netKey("tls-key", AdjustNextConnect, func(n *config.Net) any { return n.TLSKey }),
	netKey("tls-ca", AdjustNextConnect, func(n *config.Net) any { return n.TLSCA }),

	netKey("protocol", AdjustDownUp, func(n *config.Net) any { return n.Protocol }),
	netKey("csums-alg", AdjustDownUp, func(n *config.Net) any { return n.CsumsAlg }),
	netKey("verify-alg", AdjustDownUp, func(n *config.Net) any { return n.VerifyAlg }),
	netKey("after-sb-0pri", AdjustDownUp, func(n *config.Net) any { return n.AfterSB0Pri }),
	netKey("after-sb-1pri", AdjustDownUp, func(n *config.Net) any { return n.AfterSB1Pri }),
	netKey("after-sb-2pri", AdjustDownUp, func(n *config.Net) any { return n.AfterSB2Pri }),
	netKey("rr-conflict", AdjustDownUp, func(n *config.Net) any { return n.RRConflict }),
	netKey("max-epoch-size", AdjustDownUp, func(n *config.Net) any { return n.MaxEpochSize }),
	diskKey("al-extents", AdjustDownUp, func(d *config.Disk) any { return d.ALExtents }),
	diskKey("disk-flushes", AdjustDownUp, func(d *config.Disk) any { return d.DiskFlushes }),
	diskKey("md-flushes", AdjustDownUp, func(d *config.Disk) any { return d.MDFlushes }),
	diskKey("on-io-error", AdjustDownUp, func(d *config.Disk) any { return d.OnIOError }),
	diskKey("disk-timeout", AdjustDownUp, func(d *config.Disk) any { return d.DiskTimeout }),
	diskKey("fencing", AdjustDownUp, func(d *config.Disk) any { return d.Fencing }),
	{"handlers", AdjustLive, func(c *config.Resource, _ *config.Host) any { return c.Handlers }},
	{"handler-timeout", AdjustLive, func(c *config.Resource, _ *config.Host) any { return c.HandlerTimeout }},
	{"startup", AdjustDownUp, func(c *config.Resource, _ *config.Host) any { return c.Startup }},
	{"disk", AdjustDownUp, func(_ *config.Resource, h *config.Host) any { return h.Disk }},
	{"meta-disk", AdjustDownUp, func(_ *config.Resource, h *config.Host) any { return h.MetaDisk }},
	{"address", AdjustDownUp, func(_ *config.Resource, h *config.Host) any { return h.Address }},
	{"peer address", AdjustDownUp, func(c *config.Resource, h *config.Host) any {
		if p, err := c.Peer(h.Name()); err == nil {
			return p.Address
		}
		return nil
	}},
	{"device", AdjustRestart, func(_ *config.Resource, h *config.Host) any { return h.Device }},
}

// AdjustChange is one changed key.
type AdjustChange struct {
	Key      string
	Old, New string
	When     AdjustWhen
}

// AdjustReport is what Adjust found and did.
type AdjustReport struct {
	Changes []AdjustChange
}

// Lines is the report, one line per change: "r0: resync-rate 1048576 ->
// 2097152 (applied now)", or "r0: no change".
func (a AdjustReport) Lines(res string) []string {
	if len(a.Changes) == 0 {
		return []string{res + ": no change"}
	}
	var out []string
	for _, c := range a.Changes {
		out = append(out, fmt.Sprintf("%s: %s %s -> %s (%s)", res, c.Key, c.Old, c.New, c.When))
	}
	return out
}

// conf is the configuration in effect: the one the resource started with
// (r.cfg), with the live and next-connect changes of adjust applied. Code
// that may run while adjust changes them reads them here; the keys that
// need down/up are read from r.cfg, which changes only while the resource
// is down.
func (r *Resource) conf() *config.Resource { return r.live.Load() }

func show(key string, v any) string {
	if key == "shared-secret" || key == "handlers" || key == "startup" {
		// Secrets are not printed; maps and sections are summarised.
		if reflect.ValueOf(v).IsZero() {
			return "(none)"
		}
		return "(set)"
	}
	s := fmt.Sprint(v)
	if s == "" {
		return `""`
	}
	return strings.TrimSpace(s)
}

func same(a, b any) bool {
	if ma, ok := a.(map[string]string); ok {
		return maps.Equal(ma, b.(map[string]string))
	}
	return reflect.DeepEqual(a, b)
}

// Adjust compares nc, the resource's section of a configuration file read
// again, with the configuration in effect (DRBD's adjust). Live keys take
// effect at once, next-connect keys at the next connect; the others are
// kept for the next `up` after a `down`, or applied at once if the
// resource is down. The report lists every changed key and when it takes
// effect. The node's `on` section must still exist.
func (r *Resource) Adjust(nc *config.Resource) (AdjustReport, error) {
	r.admin.Lock()
	defer r.admin.Unlock()
	if nc.Name != r.name {
		return AdjustReport{}, fmt.Errorf("%s: adjust: the configuration given is for resource %s", r.name, nc.Name)
	}
	nh, err := nc.Host(r.host.Name())
	if err != nil {
		return AdjustReport{}, fmt.Errorf("%s: adjust: %w (a node's `on` section cannot go while the daemon runs)", r.name, err)
	}
	cur := r.conf()
	var rep AdjustReport
	later := false
	for _, k := range adjustKeys {
		o, n := k.get(cur, r.host), k.get(nc, nh)
		if same(o, n) {
			continue
		}
		rep.Changes = append(rep.Changes, AdjustChange{Key: k.name, Old: show(k.name, o), New: show(k.name, n), When: k.when})
		later = later || k.when >= AdjustDownUp
	}
	if len(rep.Changes) == 0 {
		// The file is back at the configuration in effect: a change kept
		// for down/up by an earlier adjust is dropped.
		r.mu.Lock()
		dropped := r.pending != nil
		r.pending = nil
		r.mu.Unlock()
		if dropped {
			r.log.Info("adjust: the configuration kept for down/up is dropped: the file is back at the one in effect")
		}
		return rep, nil
	}
	// The live and next-connect keys, into a copy of the configuration in
	// effect; readers load it atomically.
	eff := *cur
	eff.Disk.ResyncRate, eff.Disk.CPlanAhead, eff.Disk.CFillTarget = nc.Disk.ResyncRate, nc.Disk.CPlanAhead, nc.Disk.CFillTarget
	eff.Disk.CDelayTarget, eff.Disk.CMaxRate, eff.Disk.CMinRate = nc.Disk.CDelayTarget, nc.Disk.CMaxRate, nc.Disk.CMinRate
	n := &eff.Net
	n.OnCongestion, n.CongestionFill, n.CongestionExtents = nc.Net.OnCongestion, nc.Net.CongestionFill, nc.Net.CongestionExtents
	n.SharedSecret, n.CramHMACAlg, n.Timeout, n.PingInt = nc.Net.SharedSecret, nc.Net.CramHMACAlg, nc.Net.Timeout, nc.Net.PingInt
	n.PingTimeout, n.ConnectInt, n.SndbufSize, n.Compression = nc.Net.PingTimeout, nc.Net.ConnectInt, nc.Net.SndbufSize, nc.Net.Compression
	n.TLSCert, n.TLSKey, n.TLSCA = nc.Net.TLSCert, nc.Net.TLSKey, nc.Net.TLSCA
	eff.Handlers, eff.HandlerTimeout = nc.Handlers, nc.HandlerTimeout
	if err := config.Validate(&eff); err != nil {
		// A live key whose validity depends on one that waits for
		// down/up (on-congestion pull-ahead needs protocol A,
		// congestion-extents at most al-extents): the congestion keys
		// wait for down/up too.
		n.OnCongestion, n.CongestionFill, n.CongestionExtents = cur.Net.OnCongestion, cur.Net.CongestionFill, cur.Net.CongestionExtents
		if err2 := config.Validate(&eff); err2 != nil {
			return AdjustReport{}, fmt.Errorf("%s: adjust: the configuration in effect would be invalid: %v; nothing changed (use down/up)", r.name, err2)
		}
		for i, c := range rep.Changes {
			switch c.Key {
			case "on-congestion", "congestion-fill", "congestion-extents":
				rep.Changes[i].When = AdjustDownUp
				later = true
			}
		}
		r.log.Info("adjust: the congestion keys wait for down/up", "reason", err.Error())
	}
	r.live.Store(&eff)
	r.mu.Lock()
	down := r.disk == Diskless && r.conn == StandAlone
	if later {
		r.pending = nc
	} else {
		r.pending = nil
	}
	r.mu.Unlock()
	if later && down {
		r.applyPending()
		for i := range rep.Changes {
			if rep.Changes[i].When == AdjustDownUp {
				rep.Changes[i].When = AdjustLive // the resource is down: in effect at the next up
			}
		}
	}
	for _, c := range rep.Changes {
		r.log.Info("adjust", "key", c.Key, "old", c.Old, "new", c.New, "when", c.When.String())
	}
	return rep, nil
}

// applyPending makes the configuration kept by Adjust the resource's, when
// the resource is down (Diskless and StandAlone: no session, no request
// reads it). Called with admin held.
func (r *Resource) applyPending() {
	r.mu.Lock()
	nc := r.pending
	down := r.disk == Diskless && r.conn == StandAlone
	if nc == nil || !down {
		r.mu.Unlock()
		return
	}
	r.pending = nil
	r.mu.Unlock()
	nh, err := nc.Host(r.host.Name())
	if err != nil {
		r.log.Error("adjust: the configuration kept for the next up has no section for this node; kept the old one", "err", err)
		return
	}
	r.cfg, r.host = nc, nh
	r.live.Store(nc)
	r.log.Info("adjust: the configuration kept for down/up is in effect")
}

// refresh applies a resync-rate that adjust changed to a running resync of
// fixed rate (c-plan-ahead 0); the dynamic controller's settings apply from
// the next resync.
func (pc *pacer) refresh() {
	if pc.lim == nil || pc.r == nil {
		return
	}
	if rate := pc.r.conf().Disk.ResyncRate; rate != pc.lim.Rate() {
		pc.lim.SetRate(rate)
	}
}
