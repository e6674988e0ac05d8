package replicator

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// The connection life cycle (reference/drbd.md §3.4): connect starts the
// transport (WFConnection); each session it establishes is handed to
// runSession, which exchanges parameters, states and generations
// (WFReportParams), decides with Decide, and runs until the session ends,
// when the resource goes back to WFConnection; disconnect and down stop
// the transport (StandAlone), as does a refused handshake.

// More of DRBD's codes (reference/drbd.md §11.2).
const (
	codeTwoPrimaries    = -1
	codePrimaryNOP      = -7
	codeStandAlone      = -9
	codeAlreadyActive   = -8
	codeNoVerifyAlg     = -14
	codeDiscardPrimary  = 123
	codeHasNetConfig    = 125
	codeNoRemoteDisk    = -5
	codeNoNetConfig     = -13
	codeNeedStandAloneF = 151
	codePauseSet        = 134
	codePauseClear      = 135
	codeTransient       = -18
)

func init() {
	for code, text := range map[int]string{
		codeTwoPrimaries:    "Multiple primaries not allowed by config",
		codePrimaryNOP:      "Refusing to be Primary while peer is not outdated",
		codeStandAlone:      "Can not disconnect a StandAlone device",
		codeAlreadyActive:   "Can not start OV/resync since it is already active",
		codeNoVerifyAlg:     "Need a verify algorithm to start online verify",
		codeDiscardPrimary:  "--discard-my-data not allowed when primary.",
		codeHasNetConfig:    "Device has a net-config (use disconnect first)",
		codeNoRemoteDisk:    "Can not resync without remote disk",
		codeNoNetConfig:     "Have no net/connection configuration",
		codeNeedStandAloneF: "Need to be StandAlone",
		codePauseSet:        "Sync-pause flag is already set",
		codePauseClear:      "Sync-pause flag is already cleared",
		codeTransient:       "In transient state, retry after next state change",
	} {
		stateTexts[code] = text
	}
}

// Connect starts connecting to the peer (WFConnection); the resource must
// be attached. With discardMyData this node's changes lose a split-brain
// resolution at the next handshake (it becomes SyncTarget).
func (r *Resource) Connect(discardMyData bool) error {
	r.admin.Lock()
	defer r.admin.Unlock()
	return r.connect(discardMyData)
}

func (r *Resource) connect(discardMyData bool) error {
	r.mu.Lock()
	role, disk, conn := r.role, r.disk, r.conn
	r.mu.Unlock()
	switch {
	case r.peer == "":
		return r.refuse(codeNoNetConfig, "the resource has no peer `on` section")
	case conn != StandAlone:
		return r.refuse(codeHasNetConfig, "")
	case discardMyData && role == RolePrimary:
		return r.refuse(codeDiscardPrimary, "demote it with 'secondary' first")
	case disk == Diskless:
		return r.refuse(codeDiskless, "attach it first: diskless nodes are not supported")
	}
	cfg, err := r.transportConfig()
	if err != nil {
		return fmt.Errorf("%s: connect: %w", r.name, err)
	}
	tr, err := transport.New(cfg)
	if err != nil {
		return fmt.Errorf("%s: connect: %w", r.name, err)
	}
	if err := tr.Start(); err != nil {
		return fmt.Errorf("%s: connect: %w", r.name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	r.mu.Lock()
	r.tr, r.connCancel, r.connDone = tr, cancel, done
	r.discard = discardMyData
	r.setConn(WFConnection)
	r.mu.Unlock()
	r.change()
	go func() {
		defer close(done)
		r.connLoop(ctx, tr)
	}()
	return nil
}

// Disconnect ends the session and stops connecting (StandAlone).
func (r *Resource) Disconnect() error {
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	conn, remote := r.conn, r.remote
	r.mu.Unlock()
	if conn == StandAlone {
		return r.refuse(codeStandAlone, "")
	}
	if remote {
		return r.refuse(codeNoUpToDate, "this diskless Primary's data is on the peer: demote it first")
	}
	r.disconnect("disconnect requested")
	return nil
}

// disconnect stops the transport and waits for the session to end; a
// no-op when StandAlone. Call with admin held.
func (r *Resource) disconnect(reason string) {
	r.mu.Lock()
	tr, cancel, done := r.tr, r.connCancel, r.connDone
	if tr == nil {
		r.mu.Unlock()
		return
	}
	r.setConn(Disconnecting)
	r.mu.Unlock()
	r.change()
	r.log.Info("disconnecting", "reason", reason)
	cancel()
	if p := r.currentPeer(); p != nil {
		p.s.Close(reason)
	}
	<-done
	tr.Close()
	r.mu.Lock()
	if r.tr == tr { // not already dropped by standAlone (a refused handshake)
		r.authBefore += tr.Stats().AuthFailures
		r.tr, r.connCancel, r.connDone = nil, nil, nil
	}
	r.setConn(StandAlone)
	r.mu.Unlock()
	r.change()
}

// authFailures returns the peer connections refused for failed
// authentication since the daemon started.
func (r *Resource) authFailures() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.authBefore
	if r.tr != nil {
		n += r.tr.Stats().AuthFailures
	}
	return n
}

// standAlone ends connecting from inside the connection loop (a refused
// handshake), after the loop closed the transport.
func (r *Resource) standAlone(tr *transport.Transport) {
	r.mu.Lock()
	if r.tr == tr {
		r.authBefore += tr.Stats().AuthFailures
		r.tr, r.connCancel, r.connDone = nil, nil, nil
		r.setConn(StandAlone)
	}
	r.mu.Unlock()
	r.change()
}

func (r *Resource) currentPeer() *peer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.p
}

// setConn logs a connection state change DRBD's way; call with mu held.
func (r *Resource) setConn(c ConnState) {
	if c == r.conn {
		return
	}
	r.log.Info(fmt.Sprintf("conn( %s -> %s )", r.conn, c))
	r.conn = c
	r.maybeUnfenceLocked()
}

// setPeerState records the peer's role and disk; call with mu held.
func (r *Resource) setPeerState(role Role, disk DiskState) {
	if role != r.peerRole {
		r.log.Info(fmt.Sprintf("peer( %s -> %s )", r.peerRole, role))
	}
	if disk != r.peerDisk {
		r.log.Info(fmt.Sprintf("pdsk( %s -> %s )", r.peerDisk, disk))
	}
	r.peerRole, r.peerDisk = role, disk
	r.maybeUnfenceLocked()
}

func (r *Resource) transportConfig() (transport.Config, error) {
	peer, err := r.cfg.Peer(r.host.Name())
	if err != nil {
		return transport.Config{}, err
	}
	n := r.conf().Net
	comp, err := transport.ParseCompression(n.Compression)
	if err != nil {
		return transport.Config{}, err
	}
	cfg := transport.Config{
		Resource: r.name, Local: r.host.Names, Peer: peer.Names,
		ListenAddr: r.host.Address.String(), PeerAddr: peer.Address.String(),
		Compression: comp, SndBuf: int(n.SndbufSize),
		PingInterval: n.PingInt, PingTimeout: n.PingTimeout, Timeout: n.Timeout, ConnectInterval: n.ConnectInt,
		Types: wire.Types(), AlignAt: wire.WriteDataAt, Logger: r.baseLog,
	}
	if n.SharedSecret != "" {
		cfg.Secret = []byte(n.SharedSecret)
	}
	if n.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(n.TLSCert, n.TLSKey)
		if err != nil {
			return cfg, fmt.Errorf("tls-cert %s, tls-key %s: %w", n.TLSCert, n.TLSKey, err)
		}
		pem, err := os.ReadFile(n.TLSCA)
		if err != nil {
			return cfg, fmt.Errorf("tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return cfg, fmt.Errorf("tls-ca %s: no PEM certificate in it", n.TLSCA)
		}
		cfg.TLS = &transport.TLSConfig{Certificate: cert, Roots: pool}
	}
	return cfg, nil
}

// connLoop runs each session the transport establishes until ctx ends or
// a handshake refuses the peer.
func (r *Resource) connLoop(ctx context.Context, tr *transport.Transport) {
	for {
		s, err := tr.Next(ctx)
		if err != nil {
			return
		}
		if keep := r.runSession(ctx, s); !keep {
			tr.Close()
			r.standAlone(tr)
			return
		}
	}
}

// errRefused ends a session whose handshake decided not to connect.
type errRefused struct{ reason string }

func (e *errRefused) Error() string { return e.reason }

// runSession runs one session to its end and reports whether to keep
// connecting.
func (r *Resource) runSession(ctx context.Context, s *transport.Session) (keep bool) {
	r.mu.Lock()
	if r.md == nil || r.disk == Failed {
		r.mu.Unlock()
		s.Close("the peer has no disk here")
		return true
	}
	// A promotion in progress finishes first: the handshake reports
	// the role it ends with.
	for r.promoting {
		r.idle.Wait()
	}
	// A disconnect began (it cancels ctx under this lock's cover, after
	// Disconnecting): a session the transport had already accepted does
	// not get to handshake, and change this disk, meanwhile.
	if ctx.Err() != nil || r.conn == Disconnecting {
		r.mu.Unlock()
		s.Close("disconnecting")
		return false
	}
	p := newPeer(ctx, r, s)
	r.p = p
	r.setConn(WFReportParams)
	r.mu.Unlock()
	r.change()
	r.log.Info("handshake with peer", "peer", s.Peer(), "address", s.RemoteAddr())
	err := p.run()
	keep = p.end(err)
	return keep
}

// sendState tells the peer this node's role and disk state, if connected.
func (r *Resource) sendState() {
	if p := r.currentPeer(); p != nil {
		p.sendState()
	}
}

// demotePeerSync makes sure the peer has seen this node's demotion before
// it returns (so the peer can be promoted at once): the state goes out,
// then a barrier, whose ack follows the state on the same stream.
func (r *Resource) demotePeerSync() {
	p := r.currentPeer()
	if p == nil || !p.sendState() {
		return
	}
	done := p.tl.barrierNow(true, true)
	if done == nil {
		return
	}
	select {
	case <-done:
	case <-p.ctx.Done():
	case <-time.After(r.conf().Net.Timeout):
		r.log.Warn("the peer did not confirm the demotion in time")
	}
}

// The after-sb policies each slot accepts, in wire-code order.
var afterSBPolicies = [3][]string{
	{"disconnect", "discard-younger-primary", "discard-older-primary", "discard-zero-changes",
		"discard-least-changes", "discard-local", "discard-remote"},
	{"disconnect", "consensus", "discard-secondary", "call-pri-lost-after-sb", "violently-as0p"},
	{"disconnect", "violently-as0p", "call-pri-lost-after-sb"},
}

func afterSBCode(slot int, name string) uint8 {
	for i, n := range afterSBPolicies[slot] {
		if n == name {
			return uint8(i)
		}
	}
	return 0
}

func afterSBName(slot int, code uint8) string {
	if int(code) < len(afterSBPolicies[slot]) {
		return afterSBPolicies[slot][code]
	}
	return fmt.Sprintf("policy %d", code)
}

// HasPeer reports whether the resource has a peer to connect to.
func (r *Resource) HasPeer() bool { return r.peer != "" }
