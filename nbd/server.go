package nbd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Defaults for the Server's limits.
const (
	DefaultHandshakeTimeout      = 10 * time.Second
	DefaultMaxConns              = 1024
	DefaultMaxInFlight           = 128
	DefaultMaxInFlightBytes      = 64 << 20
	DefaultMaxTotalInFlightBytes = 1 << 30
	DefaultReplyTimeout          = 30 * time.Second
)

// Server serves exports over NBD (fixed newstyle, simple replies). Set the
// fields before the first call to Serve; the zero value of each limit selects
// its default. The API follows net/http: Serve(listener), Shutdown(ctx) for a
// graceful stop and Close for an immediate one.
type Server struct {
	// Catalog resolves export names; required.
	Catalog Catalog
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// HandshakeTimeout bounds the whole negotiation of one connection;
	// a client that stalls longer is disconnected.
	HandshakeTimeout time.Duration
	// MaxConns bounds open connections. At the limit a new connection
	// takes the place of the oldest one still negotiating after a quarter
	// of HandshakeTimeout (clients that stall in negotiation cannot lock
	// others out); if there is none, it is closed at once.
	MaxConns int
	// MaxInFlight and MaxInFlightBytes bound the requests and payload
	// bytes one connection may have in flight; beyond them the server
	// stops reading from that connection (backpressure).
	MaxInFlight      int
	MaxInFlightBytes int64
	// MaxTotalInFlightBytes bounds payload bytes in flight over all
	// connections, beyond the first 256 KiB of each (see doc.go).
	MaxTotalInFlightBytes int64
	// ReplyTimeout disconnects a client that takes none of its replies
	// for this long: what it holds of the in-flight budgets goes back to
	// the others. A slow reader that takes some is not disconnected.
	ReplyTimeout time.Duration
	// Observer, if set, is told of every transmission request (metrics).
	Observer Observer

	initOnce sync.Once
	log      *slog.Logger
	pool     bufPool
	total    budget

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	evicted   int // connections in conns closed to make room, not yet ended
	closing   atomic.Bool
	wg        sync.WaitGroup // accept loops and connections
	lastLimit atomic.Int64   // unix nanos of the last "too many connections" log

	replyWrites atomic.Int64 // write system calls carrying replies
}

// Observer receives a server's request events. Its methods run on the
// goroutines that serve the requests and must not block.
type Observer interface {
	// RequestStarted: a request of command op ("read", "write", "flush",
	// "trim", "write_zeroes", ...) for export was read, with its payload.
	// RequestDone follows for each, once.
	RequestStarted(export, op string)
	// RequestDone: its reply is queued, took after the request was read;
	// failed: the reply is an error.
	RequestDone(export, op string, took time.Duration, failed bool)
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.log = s.Logger
		if s.log == nil {
			s.log = slog.New(slog.DiscardHandler)
		}
		s.log = s.log.With("component", "nbd")
		if s.HandshakeTimeout <= 0 {
			s.HandshakeTimeout = DefaultHandshakeTimeout
		}
		if s.MaxConns <= 0 {
			s.MaxConns = DefaultMaxConns
		}
		if s.MaxInFlight <= 0 {
			s.MaxInFlight = DefaultMaxInFlight
		}
		if s.MaxInFlightBytes <= 0 {
			s.MaxInFlightBytes = DefaultMaxInFlightBytes
		}
		if s.MaxTotalInFlightBytes <= 0 {
			s.MaxTotalInFlightBytes = DefaultMaxTotalInFlightBytes
		}
		if s.ReplyTimeout <= 0 {
			s.ReplyTimeout = DefaultReplyTimeout
		}
		s.total.init(int(^uint(0)>>1), s.MaxTotalInFlightBytes)
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*conn]struct{})
	})
}

// Serve accepts connections on l and serves each in its own goroutine. It
// always returns a non-nil error; after Shutdown or Close it is
// ErrServerClosed. Serve closes l when it returns.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	if !s.track(l) {
		l.Close()
		return ErrServerClosed
	}
	defer s.untrack(l)
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			if !temporaryAccept(err) {
				return err
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.logLimited("accept failed; retrying", "err", err, "delay", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.startConn(nc, nil)
	}
}

// temporaryAccept reports accept errors that clear by themselves: descriptor
// or memory exhaustion and connections aborted before they were accepted.
func temporaryAccept(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ServeConn serves one already-accepted connection (negotiation and
// transmission) and returns when it ends.
func (s *Server) ServeConn(nc net.Conn) {
	s.init()
	c := s.newConn(nc, nil)
	if c == nil {
		return
	}
	c.serve()
}

// startConn registers a connection and serves it in a new goroutine. With a
// non-nil export the negotiation is skipped (kernel attach).
func (s *Server) startConn(nc net.Conn, exp *Export) *conn {
	c := s.newConn(nc, exp)
	if c == nil {
		return nil
	}
	go c.serve()
	return c
}

func (s *Server) newConn(nc net.Conn, exp *Export) *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		nc.Close()
		return nil
	}
	if len(s.conns)-s.evicted >= s.MaxConns && (len(s.conns) >= 2*s.MaxConns || !s.evictStalledLocked()) {
		nc.Close()
		s.logLimited("too many connections; refusing", "remote", remoteAddr(nc), "max_conns", s.MaxConns)
		return nil
	}
	c := newConn(s, nc, exp)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return c
}

// evictStalledLocked closes the connection that has been negotiating the
// longest, if that is at least a quarter of HandshakeTimeout, to make room
// for a new one. A client negotiates in a few round trips; one that holds a
// slot longer than that is the likelier to be stalling. Connections that
// reached an export are never evicted. It reports whether one was.
func (s *Server) evictStalledLocked() bool {
	grace := s.HandshakeTimeout / 4
	var oldest *conn
	var oldestSince time.Time
	for c := range s.conns {
		if since, ok := c.negotiatingSince(); ok && time.Since(since) >= grace &&
			(oldest == nil || since.Before(oldestSince)) {
			oldest, oldestSince = c, since
		}
	}
	if oldest == nil || !oldest.evict() {
		return false
	}
	s.evicted++
	s.logLimited("too many connections; closing the oldest one still negotiating", "remote", oldest.remote,
		"negotiating_for", time.Since(oldestSince).Round(time.Millisecond), "max_conns", s.MaxConns)
	return true
}

func (s *Server) connDone(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	if c.wasEvicted() {
		s.evicted--
	}
	s.mu.Unlock()
	s.wg.Done()
}

// logLimited logs a warning at most once a second.
func (s *Server) logLimited(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := s.lastLimit.Load()
	if now-last < int64(time.Second) || !s.lastLimit.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn(msg, args...)
}

func (s *Server) track(l net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(l net.Listener) {
	s.mu.Lock()
	delete(s.listeners, l)
	s.mu.Unlock()
	l.Close()
	s.wg.Done()
}

// Conn describes one client connection, for status and refusals.
type Conn struct {
	Remote string // the client's address ("@" for an unnamed Unix socket)
	Export string // empty while negotiating
	Since  time.Time
}

// Conns lists the open connections.
func (s *Server) Conns() []Conn {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	l := make([]Conn, 0, len(s.conns))
	for c := range s.conns {
		l = append(l, c.info())
	}
	return l
}

// Shutdown stops the server gracefully: it closes the listeners and the
// connections still negotiating, then lets every connection in transmission
// finish the requests it has already read, flushes its export and closes it.
// Requests not yet read when Shutdown is called are not answered. If ctx
// ends first, Shutdown closes everything as Close does and returns ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAll((*conn).stop)
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// Close stops the server at once: listeners and connections are closed,
// in-flight requests finish their backend calls but their replies are
// dropped, and nothing is flushed. Close waits for the server's goroutines,
// so it returns only after every backend call it started has returned.
func (s *Server) Close() error {
	s.stopAll((*conn).kill)
	s.wg.Wait()
	return nil
}

// stopAll refuses new connections, closes every listener and applies end
// to every connection.
func (s *Server) stopAll(end func(*conn)) {
	s.init()
	s.closing.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		end(c)
	}
}

func remoteAddr(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "@"
}
