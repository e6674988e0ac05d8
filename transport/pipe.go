package transport

import (
	"context"
	"errors"
	"net"
	"sync"
)

// Link joins two transports in memory, for tests of the transport and of
// its users: a dials b over net.Pipe connections, with the real handshake,
// sessions and reconnects. Break cuts every connection and refuses new
// ones until Heal.
type Link struct {
	A, B *Transport

	mu     sync.Mutex
	broken bool
	conns  []net.Conn
	wrap   func(net.Conn) net.Conn
}

// Wrap makes later dials hand a's end of each connection through f (to
// inject faults).
func (l *Link) Wrap(f func(net.Conn) net.Conn) {
	l.mu.Lock()
	l.wrap = f
	l.mu.Unlock()
}

// errLinkBroken is what a dial over a broken Link returns.
var errLinkBroken = errors.New("transport: link broken")

// NewLink creates the two transports of a link and starts them: a dials,
// b accepts. Close both when done.
func NewLink(a, b Config) (*Link, error) {
	a.ListenAddr, a.PeerAddr = "", "pipe"
	b.ListenAddr, b.PeerAddr = "", ""
	ta, err := New(a)
	if err != nil {
		return nil, err
	}
	tb, err := New(b)
	if err != nil {
		return nil, err
	}
	l := &Link{A: ta, B: tb}
	ta.dial = l.dial
	if err := ta.Start(); err != nil {
		return nil, err
	}
	if err := tb.Start(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Link) dial(ctx context.Context) (net.Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.broken {
		return nil, errLinkBroken
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ca, cb := net.Pipe()
	l.conns = append(l.conns, ca, cb)
	l.B.wg.Go(func() { l.B.serveConn(pipeConn{cb}) })
	if l.wrap != nil {
		return l.wrap(pipeConn{ca}), nil
	}
	return pipeConn{ca}, nil
}

// Break closes every connection of the link and refuses new ones.
func (l *Link) Break() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.broken = true
	for _, c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

// Heal lets the link carry connections again.
func (l *Link) Heal() {
	l.mu.Lock()
	l.broken = false
	l.mu.Unlock()
}

// Close closes both transports (a tells b), then the link.
func (l *Link) Close() {
	l.A.Close()
	l.B.Close()
	l.Break()
}

// pipeConn gives a pipe end addresses that look like an IP peer.
type pipeConn struct{ net.Conn }

func (pipeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 9), Port: 7789} }
func (pipeConn) LocalAddr() net.Addr  { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 8), Port: 7789} }
