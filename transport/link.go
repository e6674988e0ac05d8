package transport

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Errors of establishing a session.
var (
	errCrossed = errors.New("transport: crossed dial lost to the peer's session")
	errNoPair  = errors.New("transport: control stream for an unknown session")
)

// dialTCP connects to the peer's address.
func (t *Transport) dialTCP(ctx context.Context) (net.Conn, error) {
	d := net.Dialer{Timeout: t.cfg.Timeout + t.cfg.HandshakeTimeout}
	return d.DialContext(ctx, "tcp", t.cfg.PeerAddr)
}

// setUserTimeout makes the kernel end a TCP connection on which sent
// data has gone unacknowledged for Timeout (TCP_USER_TIMEOUT): a
// connection that stops carrying data while the other one of the session
// still carries the pings (a black hole on one flow) fails in seconds,
// not after TCP's retransmissions give up a quarter of an hour later.
// A slow but moving link is not cut: its data is acknowledged as it goes.
func (t *Transport) setUserTimeout(conn net.Conn) {
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(t.cfg.Timeout.Milliseconds())); err != nil {
			t.log.Warn("setting TCP_USER_TIMEOUT failed: a connection that stops carrying data is found only by TCP's own timeout", "err", err)
		}
	})
}

// dialLoop keeps one session up by dialing whenever there is none.
func (t *Transport) dialLoop() {
	var wait time.Duration
	for {
		t.mu.Lock()
		cur := t.current
		t.mu.Unlock()
		if cur != nil {
			select {
			case <-cur.Done():
				wait = 0 // reconnect quickly after a loss
			case <-t.ctx.Done():
				return
			}
			continue
		}
		err := t.dialOnce(t.ctx)
		switch {
		case t.ctx.Err() != nil:
			return
		case err == nil:
			wait = 0
			continue
		case refusedBusy(err):
			wait = t.backoff(wait)
		case errors.Is(err, ErrAuth), errors.Is(err, ErrRefused), errors.Is(err, ErrVersion), errors.Is(err, ErrReflection):
			// Retrying soon cannot help: wait the full interval.
			wait = t.cfg.ConnectInterval
		default:
			wait = t.backoff(wait)
		}
		if !sleepCtx(t.ctx, wait) {
			return
		}
	}
}

func (t *Transport) setPhase(p int) (abort bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p == phaseConnecting {
		t.abortDial = false
	}
	t.phase = p
	return t.current != nil || t.abortDial
}

// dialOnce makes one attempt to open a session: both streams, each
// authenticated, then the confirmation that makes it whole.
func (t *Transport) dialOnce(ctx context.Context) (err error) {
	defer t.setPhase(phaseIdle)
	t.setPhase(phaseConnecting)
	var id [sessionIDSize]byte
	rand.Read(id[:])
	var streams [2]*stream
	var inst uint64
	defer func() {
		if err != nil {
			for _, s := range streams {
				if s != nil {
					s.conn.Close()
				}
			}
			t.noteErr(err)
			if errors.Is(err, ErrAuth) {
				t.stats.authFailures.Add(1)
				t.log.Warn("peer authentication failed", "addr", t.cfg.PeerAddr, "err", err)
			} else if !errors.Is(err, errCrossed) {
				t.log.Debug("connection attempt failed", "addr", t.cfg.PeerAddr, "err", err)
			}
		}
	}()
	for i, kind := range []Stream{Data, Control} {
		conn, err := t.dial(ctx)
		if err != nil {
			return fmt.Errorf("connect to %s: %w", t.cfg.PeerAddr, err)
		}
		if !t.track(conn) {
			return ErrTransportClosed
		}
		defer t.untrack(conn) // from here the session owns it, or it is closed
		if i == 0 && t.setPhase(phaseHandshaking) {
			conn.Close()
			return errCrossed
		}
		st, peerInst, err := t.clientStream(conn, kind, id)
		if err != nil {
			conn.Close()
			return err
		}
		if i == 1 && peerInst != inst {
			st.conn.Close()
			return fmt.Errorf("%w: the peer restarted during the handshake", ErrHandshake)
		}
		streams[i], inst = st, peerInst
	}
	s := t.newSession(id, t.cfg.Peer[0], streams[0].conn.RemoteAddr().String(), inst, true, streams[0], streams[1])
	// Confirm, unless a session from the peer won meanwhile.
	if t.setPhase(phaseHandshaking) {
		return errCrossed
	}
	data := streams[0]
	data.conn.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	if b, err := appendFrame(nil, data.out, t.codecs, CompressNone, typeConfirm, nil); err != nil {
		return err
	} else if _, err := data.conn.Write(b); err != nil {
		return fmt.Errorf("confirm session: %w", err)
	}
	typ, p, err := data.in.readFrame()
	switch {
	case err != nil:
		return fmt.Errorf("confirm session: %w", err)
	case typ == typeClose:
		t.stats.crossed.Add(1)
		t.log.Debug("the peer kept its own session", "reason", string(p))
		return errCrossed
	case typ != typeConfirm:
		return fmt.Errorf("%w: frame type %d instead of the confirmation", ErrProtocol, typ)
	}
	t.mu.Lock()
	aborted := t.abortDial
	t.mu.Unlock()
	if aborted {
		return errCrossed
	}
	for _, st := range streams {
		st.conn.SetDeadline(time.Time{})
	}
	t.install(s)
	return nil
}

// clientStream wraps a dialed connection (TLS if configured) and runs the
// stream's handshake.
func (t *Transport) clientStream(conn net.Conn, kind Stream, id [sessionIDSize]byte) (*stream, uint64, error) {
	t.setUserTimeout(conn)
	if kind == Data && t.cfg.SndBuf > 0 {
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetWriteBuffer(t.cfg.SndBuf)
		}
	}
	conn.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	if t.tls != nil {
		tc := tls.Client(conn, t.tls)
		if err := tc.HandshakeContext(t.ctx); err != nil {
			return nil, 0, tlsHandshakeErr(err)
		}
		conn = tc
	}
	hc := newHSConn(conn, t.codecs)
	inst, k, err := t.clientHandshake(hc, kind, id)
	if err != nil {
		return nil, 0, fmt.Errorf("%s stream handshake with %s: %w", kind, t.cfg.PeerAddr, err)
	}
	st, err := newStream(kind, conn, hc.r, k, t)
	return st, inst, err
}

// acceptLoop accepts connections from the peer until the listener closes.
func (t *Transport) acceptLoop(ln net.Listener) {
	var delay time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if t.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				sleepCtx(t.ctx, delay)
				continue
			}
			t.log.Error("accepting peer connections failed", "err", err)
			return
		}
		delay = 0
		t.wg.Go(func() { t.serveConn(conn) })
	}
}

// Bounds on incoming connections in their handshake, before the peer has
// proved anything: a host past its share, or a listener past the total,
// is refused as busy rather than given memory and goroutines. A genuine
// peer needs two connections per session, four when dials cross.
const (
	maxHandshakesPerHost = 8
	maxHandshakes        = 64
)

// enterHandshake counts an incoming connection into its handshake; false
// when the bounds are reached.
func (t *Transport) enterHandshake(host string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.inbound >= maxHandshakes || t.inboundBy[host] >= maxHandshakesPerHost {
		return false
	}
	t.inbound++
	t.inboundBy[host]++
	return true
}

func (t *Transport) leaveHandshake(host string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.inbound--
	if t.inboundBy[host]--; t.inboundBy[host] == 0 {
		delete(t.inboundBy, host)
	}
}

// serveConn runs the listener's side of one incoming connection.
func (t *Transport) serveConn(conn net.Conn) {
	remote := conn.RemoteAddr().String()
	host, _, _ := net.SplitHostPort(remote)
	if t.isBlocked(host) || !t.track(conn) {
		conn.Close()
		return
	}
	defer t.untrack(conn) // when this returns the session owns it, or it is closed
	conn.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	if !t.enterHandshake(host) {
		if t.tls == nil { // inside TLS there is no one to tell yet
			newHSConn(conn, t.codecs).refuse(refuseBusy, "too many connections in their handshake; try again")
		}
		conn.Close()
		t.log.Warn("too many peer connections in their handshake; connection refused", "remote", remote)
		return
	}
	defer t.leaveHandshake(host)
	t.setUserTimeout(conn)
	var tlsErr error
	if t.tls != nil {
		tc := tls.Server(conn, t.tls)
		if tlsErr = tc.HandshakeContext(t.ctx); tlsErr == nil {
			conn = tc
		}
	}
	hc := newHSConn(conn, t.codecs)
	var h hello
	var k streamKeys
	err := tlsErr
	if err != nil {
		err = tlsHandshakeErr(err)
	} else {
		h, k, err = t.serverHandshake(hc)
	}
	if err != nil {
		conn.Close()
		t.noteErr(err)
		switch {
		case countsAgainst(err):
			t.stats.authFailures.Add(1)
			t.block(host)
			t.log.Warn("peer authentication failed; connection refused", "remote", remote, "err", err)
		case errors.Is(err, ErrAuth), errors.Is(err, ErrPeerName), errors.Is(err, ErrVersion), errors.Is(err, ErrRefused):
			t.stats.handshakeFailures.Add(1)
			t.log.Warn("peer handshake refused", "remote", remote, "err", err)
		default:
			t.stats.handshakeFailures.Add(1)
			t.log.Info("peer handshake failed", "remote", remote, "err", err)
		}
		return
	}
	st, err := newStream(h.stream, conn, hc.r, k, t)
	if err != nil {
		conn.Close()
		return
	}
	if h.stream == Control {
		t.pairControl(h, st)
		return
	}
	t.serveData(h, st, remote)
}

// rendezvous returns the meeting point of a session's streams.
func (t *Transport) rendezvous(id [sessionIDSize]byte) (*pendingSession, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.pending[id]; p != nil {
		return p, true
	}
	if len(t.pending) >= maxPending {
		return nil, false
	}
	p := &pendingSession{control: make(chan controlArrival, 1), taken: make(chan struct{})}
	t.pending[id] = p
	return p, true
}

// maxPending bounds the sessions half-way through their handshakes.
const maxPending = 64

func (t *Transport) forget(id [sessionIDSize]byte) {
	t.mu.Lock()
	delete(t.pending, id)
	t.mu.Unlock()
}

// pairControl hands a control stream to the data stream of its session,
// which may authenticate before or after it.
func (t *Transport) pairControl(h hello, st *stream) {
	p, ok := t.rendezvous(h.sessionID)
	if !ok {
		st.conn.Close()
		return
	}
	select {
	case p.control <- controlArrival{st, h.instance}:
	default:
		st.conn.Close() // a second control stream for the session
		return
	}
	timer := time.NewTimer(t.cfg.HandshakeTimeout)
	defer timer.Stop()
	select {
	case <-p.taken:
	case <-timer.C:
		t.log.Info("peer opened a control stream but no data stream", "remote", st.conn.RemoteAddr())
		t.forget(h.sessionID)
		st.conn.Close()
	case <-t.ctx.Done():
		st.conn.Close()
	}
}

// serveData waits for the session's control stream and the dialer's
// confirmation, applies the crossed-dial rule, and installs the session.
func (t *Transport) serveData(h hello, data *stream, remote string) {
	p, ok := t.rendezvous(h.sessionID)
	if !ok {
		data.conn.Close()
		return
	}
	defer t.forget(h.sessionID)
	var control *stream
	timer := time.NewTimer(t.cfg.HandshakeTimeout)
	defer timer.Stop()
	select {
	case c := <-p.control:
		close(p.taken)
		if c.inst != h.instance {
			t.log.Info("data and control streams from different peer instances", "remote", remote)
			data.conn.Close()
			c.st.conn.Close()
			return
		}
		control = c.st
	case <-timer.C:
		t.log.Info("peer opened a data stream but no control stream", "remote", remote)
		data.conn.Close()
		return
	case <-t.ctx.Done():
		data.conn.Close()
		return
	}
	closeBoth := func() { data.conn.Close(); control.conn.Close() }
	typ, _, err := data.in.readFrame()
	if err != nil || typ != typeConfirm {
		t.log.Info("peer did not confirm the session", "remote", remote, "err", err, "type", typ)
		closeBoth()
		return
	}
	s := t.newSession(h.sessionID, h.from, remote, h.instance, false, data, control)
	if reason := t.admit(h.from); reason != "" {
		t.stats.crossed.Add(1)
		if b, err := appendFrame(nil, data.out, t.codecs, CompressNone, typeClose, []byte(reason)); err == nil {
			data.conn.Write(b)
		}
		closeBoth()
		return
	}
	b, _ := appendFrame(nil, data.out, t.codecs, CompressNone, typeConfirm, nil)
	if _, err := data.conn.Write(b); err != nil {
		closeBoth()
		return
	}
	data.conn.SetDeadline(time.Time{})
	control.conn.SetDeadline(time.Time{})
	t.install(s)
}

// admit applies the crossed-dial rule to a confirmed incoming session and
// returns why it is refused, or "". When both nodes dial at once, the
// session dialed by the node with the smaller name wins, on both sides: a
// node refuses an incoming session only while its own dialed session (in
// its handshake, or established) exists and its name is the smaller. An
// incoming session otherwise replaces the current one (the peer dropped
// it) and aborts our own attempt.
func (t *Transport) admit(peer string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	mine := t.phase == phaseHandshaking || t.current != nil && t.current.dialed
	if mine && t.cfg.Local[0] < peer {
		return fmt.Sprintf("crossed connections: keeping the one %s dialed", t.cfg.Local[0])
	}
	if t.phase != phaseIdle {
		t.abortDial = true
	}
	return ""
}

// failMemory is how long an authentication failure counts towards the
// hold-off: a host whose last failure is older starts again at 1 s.
const failMemory = 10 * time.Minute

// block delays further connections from a host after an authentication
// failure: 1 s, doubling to 60 s with failures less than failMemory apart.
// A session established from the host clears its record (install).
func (t *Transport) block(host string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	b := t.blocked[host]
	if now.Sub(b.last) > failMemory {
		b.fails = 0
	}
	b.fails++
	b.last = now
	b.until = now.Add(min(time.Second<<min(b.fails-1, 6), time.Minute))
	t.blocked[host] = b
	if len(t.blocked) > 1024 { // forget what no longer counts
		for h, x := range t.blocked {
			if now.Sub(x.last) > failMemory {
				delete(t.blocked, h)
			}
		}
	}
}

func (t *Transport) isBlocked(host string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, ok := t.blocked[host]
	return ok && t.now().Before(b.until)
}
