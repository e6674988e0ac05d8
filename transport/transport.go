package transport

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes one resource's link to its peer. Zero durations select
// DRBD's defaults.
type Config struct {
	Resource string
	// Local and Peer are the node names of this node and of the peer, as
	// their `on` sections list them; Local[0] and Peer[0] are sent.
	Local, Peer []string
	// ListenAddr is where this node accepts the peer ("" = do not
	// listen); PeerAddr is where it dials the peer ("" = do not dial).
	ListenAddr, PeerAddr string
	// Secret enables mutual HMAC-SHA256 authentication and AES-256-GCM
	// sealing of every frame. Without it frames carry an XXH3-64
	// checksum and the link is neither authenticated nor encrypted.
	Secret []byte
	// TLS, if set, runs the link inside TLS 1.3 with certificates checked
	// against the node names on both sides.
	TLS         *TLSConfig
	Compression Compression
	// SndBuf sets the data connection's socket send buffer (0 = kernel).
	SndBuf int
	// PingInterval (ping-int), PingTimeout (ping-timeout), Timeout (a
	// socket that takes no data for this long is dead) and
	// ConnectInterval (the longest wait between connection attempts).
	PingInterval, PingTimeout, Timeout, ConnectInterval time.Duration
	// HandshakeTimeout bounds a connection's handshake (default 10 s).
	HandshakeTimeout time.Duration
	// Types lists the application frame types (≥ FirstAppType); any
	// other type received ends the session.
	Types []Type
	// AlignAt is the offset in a received payload that lies on a
	// PageAlign boundary in memory when the payload is 4 KiB or more
	// (in fact from about 2.2 KiB) and arrives uncompressed: where a write message's data starts, so
	// that the receiver can write it to disk with O_DIRECT as it is.
	// 0 (the default) aligns the payload's first byte; at most
	// PageAlign-1.
	AlignAt int
	// Logger receives the link's events; nil discards them.
	Logger *slog.Logger

	// versionMax, if not 0, is the newest protocol version this node
	// speaks instead of VersionMax (tests: an older node).
	versionMax uint16
}

// maxVersion is the newest protocol version this node speaks.
func (t *Transport) maxVersion() uint16 {
	if t.cfg.versionMax != 0 {
		return t.cfg.versionMax
	}
	return VersionMax
}

// TLSConfig is the certificate material for TLS on the link.
type TLSConfig struct {
	Certificate tls.Certificate
	Roots       *x509.CertPool // CAs that sign the peer's certificate
}

// Stats are the link's counters.
type Stats struct {
	Sessions, Reconnects, AuthFailures  uint64
	FramesSent, FramesRecv              uint64
	PayloadSent, PayloadRecv            uint64 // application bytes, before compression and sealing
	WireSent, WireRecv                  uint64 // bytes on the wire, framing included
	Writes                              uint64 // batches of frames written (one write system call each, more for one above 256 KiB)
	HandshakeFailures, CrossedDialsLost uint64
	LastError                           string
	LastErrorAt                         time.Time
	Connected                           bool
	ConnectedSince                      time.Time
	PeerAddr                            string
	Encrypted, Authenticated, TLS       bool
	Compression                         Compression
}

type counters struct {
	sessions, reconnects, authFailures, handshakeFailures, crossed atomic.Uint64
	framesSent, framesRecv, payloadSent, payloadRecv               atomic.Uint64
	wireSent, wireRecv, writes                                     atomic.Uint64
}

// Dial phases of the outgoing attempt, for the crossed-dial rule.
const (
	phaseIdle        = iota
	phaseConnecting  // TCP connect in progress
	phaseHandshaking // connected, authenticating: it may win a cross
)

// Transport maintains one resource's session with its peer: it listens
// and dials, authenticates, resolves crossed dials to exactly one session,
// and reconnects with jittered backoff when a session ends, until Close.
type Transport struct {
	cfg      Config
	log      *slog.Logger
	codecs   *codecs
	comp     Compression
	instance uint64
	tls      *tls.Config
	types    map[Type]bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	ln          net.Listener
	current     *Session
	phase       int
	abortDial   bool
	pending     map[[sessionIDSize]byte]*pendingSession
	handshaking map[net.Conn]struct{} // connections not yet in a session
	inbound     int                   // incoming connections in their handshake (≤ maxHandshakes)
	inboundBy   map[string]int        // the same per host (≤ maxHandshakesPerHost)
	blocked     map[string]blockState
	next        chan *Session
	lastErr     error
	lastErrAt   time.Time

	stats counters
	bufs  bufPool // buffers of large received frames, shared by sessions
	// dial opens a connection to the peer; tests replace it.
	dial func(ctx context.Context) (net.Conn, error)
	// now is the clock of the hold-off (block); tests replace it.
	now func() time.Time
}

// pendingSession is the meeting point of a session's two streams on the
// listening side; whichever handshake finishes first creates it.
type pendingSession struct {
	control chan controlArrival // the control stream, once authenticated
	taken   chan struct{}       // closed when the data side took it
}

type controlArrival struct {
	st   *stream
	inst uint64
}

// blockState is a host's record of authentication failures.
type blockState struct {
	until time.Time // connections are refused until then
	last  time.Time // the latest failure
	fails int       // failures, none more than failMemory apart
}

// Defaults, as DRBD's (reference/drbd.md §12).
const (
	DefaultPingInterval     = 10 * time.Second
	DefaultPingTimeout      = 500 * time.Millisecond
	DefaultTimeout          = 6 * time.Second
	DefaultConnectInterval  = 10 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	minBackoff              = 200 * time.Millisecond
)

// ErrTransportClosed is returned by Next after Close.
var ErrTransportClosed = errors.New("transport: closed")

// New checks the configuration and returns a transport that does nothing
// until Start.
func New(cfg Config) (*Transport, error) {
	if cfg.Resource == "" || len(cfg.Local) == 0 || len(cfg.Peer) == 0 {
		return nil, errors.New("transport: resource and node names are required")
	}
	for _, n := range append(slices.Clone(cfg.Local), cfg.Peer...) {
		if n == "" || len(n) > maxNameLen {
			return nil, fmt.Errorf("transport: node name %q: 1 to 64 bytes", n)
		}
	}
	if len(cfg.Resource) > maxNameLen {
		return nil, errors.New("transport: resource name longer than 64 bytes")
	}
	if cfg.Local[0] == cfg.Peer[0] {
		return nil, errors.New("transport: the two nodes have the same name")
	}
	for _, d := range []*time.Duration{&cfg.PingInterval, &cfg.PingTimeout, &cfg.Timeout, &cfg.ConnectInterval, &cfg.HandshakeTimeout} {
		if *d < 0 {
			return nil, errors.New("transport: negative duration")
		}
	}
	setDefault(&cfg.PingInterval, DefaultPingInterval)
	setDefault(&cfg.PingTimeout, DefaultPingTimeout)
	setDefault(&cfg.Timeout, DefaultTimeout)
	setDefault(&cfg.ConnectInterval, DefaultConnectInterval)
	setDefault(&cfg.HandshakeTimeout, DefaultHandshakeTimeout)
	if cfg.AlignAt < 0 || cfg.AlignAt >= PageAlign {
		return nil, fmt.Errorf("transport: alignment offset %d out of range [0, %d)", cfg.AlignAt, PageAlign)
	}
	t := &Transport{cfg: cfg, comp: cfg.Compression, types: map[Type]bool{},
		pending: map[[sessionIDSize]byte]*pendingSession{}, blocked: map[string]blockState{},
		handshaking: map[net.Conn]struct{}{}, inboundBy: map[string]int{},
		next: make(chan *Session, 1), bufs: bufPool{align: cfg.AlignAt}}
	for _, typ := range cfg.Types {
		if typ < FirstAppType {
			return nil, fmt.Errorf("transport: type %d is reserved (application types start at %d)", typ, FirstAppType)
		}
		t.types[typ] = true
	}
	t.log = cfg.Logger
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	t.log = t.log.With("resource", cfg.Resource, "peer", cfg.Peer[0])
	var err error
	if t.codecs, err = newCodecs(); err != nil {
		return nil, err
	}
	var id [8]byte
	rand.Read(id[:])
	t.instance = binary.BigEndian.Uint64(id[:])
	if cfg.TLS != nil {
		t.tls = t.tlsConfig()
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.dial = t.dialTCP
	t.now = time.Now
	return t, nil
}

// track registers a connection still in its handshake, so Close can stop
// it; it reports false (and closes it) if the transport is closed.
func (t *Transport) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ctx.Err() != nil {
		c.Close()
		return false
	}
	t.handshaking[c] = struct{}{}
	return true
}

// untrack forgets a connection that failed its handshake.
func (t *Transport) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.handshaking, c)
	t.mu.Unlock()
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d == 0 {
		*d = v
	}
}

func (t *Transport) known(typ Type) bool { return t.types[typ] }

// Start listens and dials in the background.
func (t *Transport) Start() error {
	if t.cfg.Secret == nil {
		t.log.Warn("the link to the peer is neither authenticated nor encrypted: set shared-secret (and tls-cert, tls-key, tls-ca)")
	}
	if t.cfg.ListenAddr != "" {
		ln, err := net.Listen("tcp", t.cfg.ListenAddr)
		if err != nil {
			return fmt.Errorf("listen for the peer on %s: %w", t.cfg.ListenAddr, err)
		}
		t.mu.Lock()
		t.ln = ln
		t.mu.Unlock()
		t.wg.Go(func() { t.acceptLoop(ln) })
	}
	if t.cfg.PeerAddr != "" {
		t.wg.Go(t.dialLoop)
	}
	return nil
}

// Next waits for the next established session.
func (t *Transport) Next(ctx context.Context) (*Session, error) {
	select {
	case s := <-t.next:
		return s, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.ctx.Done():
		return nil, ErrTransportClosed
	}
}

// Current returns the established session, or nil.
func (t *Transport) Current() *Session {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.current
}

// Close stops listening and dialing, closes the session (telling the peer)
// and waits for every goroutine of the transport.
func (t *Transport) Close() error {
	t.mu.Lock()
	t.cancel() // under mu: no session is installed after this
	if t.ln != nil {
		t.ln.Close()
	}
	for c := range t.handshaking {
		c.Close() // a handshake in progress stops at once
	}
	cur := t.current
	t.mu.Unlock()
	if cur != nil {
		cur.Close("the peer disconnected")
	}
	t.wg.Wait()
	t.codecs.zdec.Close()
	return nil
}

// Stats returns the counters and the link's state.
func (t *Transport) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := Stats{
		Sessions: t.stats.sessions.Load(), Reconnects: t.stats.reconnects.Load(),
		AuthFailures: t.stats.authFailures.Load(), HandshakeFailures: t.stats.handshakeFailures.Load(),
		CrossedDialsLost: t.stats.crossed.Load(),
		FramesSent:       t.stats.framesSent.Load(), FramesRecv: t.stats.framesRecv.Load(),
		PayloadSent: t.stats.payloadSent.Load(), PayloadRecv: t.stats.payloadRecv.Load(),
		WireSent: t.stats.wireSent.Load(), WireRecv: t.stats.wireRecv.Load(), Writes: t.stats.writes.Load(),
		Authenticated: t.cfg.Secret != nil, Encrypted: t.cfg.Secret != nil || t.tls != nil, TLS: t.tls != nil,
		Compression: t.comp, LastErrorAt: t.lastErrAt,
	}
	if t.lastErr != nil {
		st.LastError = t.lastErr.Error()
	}
	if t.current != nil {
		st.Connected, st.ConnectedSince, st.PeerAddr = true, t.current.since, t.current.remote
	}
	return st
}

func (t *Transport) noteErr(err error) {
	t.mu.Lock()
	t.lastErr, t.lastErrAt = err, time.Now()
	t.mu.Unlock()
}

// ended is called once when a session ends.
func (t *Transport) ended(s *Session, err error) {
	t.mu.Lock()
	if t.current == s {
		t.current = nil
	}
	t.mu.Unlock()
	t.noteErr(err)
	switch {
	case errors.Is(err, ErrClosed):
		t.log.Info("session closed")
	default:
		t.log.Warn("session to the peer lost", "remote", s.remote, "err", err)
	}
}

// install makes s the current session, closing one it replaces, and
// starts it.
func (t *Transport) install(s *Session) {
	t.mu.Lock()
	if t.ctx.Err() != nil {
		// Closed while this session was being set up: it never starts.
		t.mu.Unlock()
		for _, st := range s.streams {
			st.conn.Close()
		}
		return
	}
	old := t.current
	s.since = time.Now() // before Stats can see s
	t.current = s
	// The peer proved itself: its host's failures are forgiven.
	if host, _, err := net.SplitHostPort(s.remote); err == nil {
		delete(t.blocked, host)
	}
	// Started under mu: a Close waits for its goroutines (the wait group
	// must not grow from zero while Close waits).
	s.start()
	t.mu.Unlock()
	if old != nil {
		old.fail(ErrReplaced)
	}
	n := t.stats.sessions.Add(1)
	if n > 1 {
		t.stats.reconnects.Add(1)
	}
	t.log.Info("session established", "remote", s.remote, "dialed", s.dialed,
		"authenticated", t.cfg.Secret != nil, "tls", t.tls != nil, "version", s.Version())
	// Drain and send under mu, so that installs cannot interleave: after
	// the drain the channel is empty and only installs send, so the send
	// never blocks. A session already replaced or ended is not offered.
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.current != s {
		return
	}
	select {
	case stale := <-t.next:
		_ = stale // replaced before anyone took it; it is closed already
	default:
	}
	t.next <- s
}

func (t *Transport) newSession(id [sessionIDSize]byte, peer, remote string, inst uint64, dialed bool, data, control *stream) *Session {
	return &Session{t: t, id: id, peer: peer, remote: remote, peerInst: inst, dialed: dialed,
		streams: [2]*stream{data, control}, done: make(chan struct{}), pong: make(chan uint64, 1),
		pingIn: make(chan uint64, 1), sent: make(chan struct{}, 1)}
}

// backoff returns the next wait between attempts: doubling from 200 ms to
// the connect interval, with ±25 % jitter.
func (t *Transport) backoff(prev time.Duration) time.Duration {
	d := min(max(2*prev, minBackoff), t.cfg.ConnectInterval)
	return d*3/4 + time.Duration(mrand.Int64N(int64(d/2)+1))
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// The first two bytes of a TLS handshake record: content type 22 and the
// major version 3 (every TLS version's record layer).
const (
	tlsRecordHandshake = 0x16
	tlsRecordMajor     = 0x03
)

// tlsHandshakeErr wraps a failed TLS handshake in ErrAuth; a peer that
// answered with something not TLS is named as one without TLS.
func tlsHandshakeErr(err error) error {
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return fmt.Errorf("%w: the peer does not speak TLS (tls-cert, tls-key and tls-ca set on one node only?): %w", ErrAuth, err)
	}
	return fmt.Errorf("%w: TLS: %w", ErrAuth, err)
}

// tlsConfig builds the TLS 1.3 configuration used on both sides. The
// peer's certificate must chain to Roots and name one of the peer's node
// names; Go's default host-name check is replaced by that.
func (t *Transport) tlsConfig() *tls.Config {
	verify := func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return &authFailure{errors.New("transport: the peer presented no certificate")}
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		var lastErr error
		for _, name := range t.cfg.Peer {
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: t.cfg.TLS.Roots,
				Intermediates: inter, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			if err == nil {
				return nil
			}
			lastErr = err
		}
		return &authFailure{fmt.Errorf("transport: the peer's certificate is not valid for node %s: %w", t.cfg.Peer[0], lastErr)}
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{t.cfg.TLS.Certificate},
		InsecureSkipVerify: true, // replaced by VerifyConnection, which checks chain and node name
		ClientAuth:         tls.RequireAnyClientCert,
		VerifyConnection:   verify,
	}
}
