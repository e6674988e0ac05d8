package transport

import (
	"crypto/rand"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (t *Transport) inboundFrom(host string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.inboundBy[host]
}

// TestHandshake_BusyBound: connections that stall before proving anything
// hold at most maxHandshakesPerHost slots; the next one is refused as busy
// at once, and a slot freed is usable again.
func TestHandshake_BusyBound(t *testing.T) {
	// A handshake timeout far longer than the test, so the stalled
	// connections hold their slots however slow the machine is.
	_, b := configs("k")
	addr := listen(t)
	b.ListenAddr, b.HandshakeTimeout = addr, time.Minute
	var lb logBuffer
	b.Logger = lb.logger()
	tb := start(t, b)
	var stalled []net.Conn
	for range maxHandshakesPerHost {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stalled = append(stalled, c)
	}
	waitFor(t, "the stalled handshakes", func() bool { return tb.inboundFrom("127.0.0.1") == maxHandshakesPerHost })
	c := dialRaw(t, addr)
	h := newHello(true, "alpha")
	c.hc.send(typeHello, h.appendBinary(nil))
	_, _, err := c.hc.recv(typeAck)
	if !refusedBusy(err) {
		t.Fatalf("connection past the bound: %v, want a busy refusal", err)
	}
	lb.waitLog(t, "too many peer connections in their handshake")
	stalled[0].Close()
	waitFor(t, "a freed slot", func() bool { return tb.inboundFrom("127.0.0.1") < maxHandshakesPerHost })
	c = dialRaw(t, addr)
	c.hello(newHello(true, "alpha")) // answered: the slot is usable
	if st := tb.Stats(); st.AuthFailures != 0 {
		t.Errorf("busy refusals counted as %d authentication failures", st.AuthFailures)
	}
}

// TestHandshake_OversizedHello: a HELLO frame past the handshake bound, or
// compressed, is refused before it is read.
func TestHandshake_OversizedHello(t *testing.T) {
	for _, tc := range []struct {
		name   string
		flags  uint16
		length uint32
	}{
		{"5 KiB", 0, 5 << 10},
		{"32 MiB", 0, MaxPayload},
		{"compressed", flagZstd, 300},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, lb, addr := server(t, "k")
			c := dialRaw(t, addr)
			if _, err := c.hc.conn.Write(header(typeHello, tc.flags, tc.length)); err != nil {
				t.Fatal(err)
			}
			_, _, err := c.hc.recv(typeAck)
			var re *RefusedError
			if !errors.As(err, &re) || re.Reason != "malformed hello" {
				t.Fatalf("answer: %v, want the refusal of a malformed hello", err)
			}
			lb.waitLog(t, "peer handshake failed")
		})
	}
}

// TestHoldOff: only failures to authenticate hold a host off, for 1 s
// doubling to 60 s; failures more than failMemory apart start again at
// 1 s.
func TestHoldOff(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	tests := []struct {
		name  string
		fails []time.Duration // when each failure happens, from t0
		at    time.Duration   // when to ask
		want  bool            // still held off
	}{
		{"none", nil, 0, false},
		{"one, within 1 s", []time.Duration{0}, 900 * time.Millisecond, true},
		{"one, after 1 s", []time.Duration{0}, 1100 * time.Millisecond, false},
		{"two: 2 s", []time.Duration{0, 2 * time.Second}, 3900 * time.Millisecond, true},
		{"two: 2 s over", []time.Duration{0, 2 * time.Second}, 4100 * time.Millisecond, false},
		{"ten: capped at 60 s", []time.Duration{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 59 * time.Second, true},
		{"ten: cap over", []time.Duration{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 61 * time.Second, false},
		{"old failures forgotten", []time.Duration{0, 1, 2, 3, 4, 5, 11 * time.Minute}, 11*time.Minute + 1100*time.Millisecond, false},
		{"recent failures remembered", []time.Duration{0, 1, 2, 3, 4, 5, 9 * time.Minute}, 9*time.Minute + 1100*time.Millisecond, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, b := configs("k")
			tr, err := New(b)
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			now := t0
			tr.now = func() time.Time { return now }
			for _, f := range tc.fails {
				now = t0.Add(f)
				tr.block("192.0.2.1")
			}
			now = t0.Add(tc.at)
			if got := tr.isBlocked("192.0.2.1"); got != tc.want {
				t.Fatalf("held off: %v, want %v", got, tc.want)
			}
			if tr.isBlocked("192.0.2.2") {
				t.Fatal("another host is held off")
			}
		})
	}
}

// TestHoldOff_WhatCounts: port probes and broken handshakes do not hold the
// peer off; a wrong proof does; a session established clears it.
func TestHoldOff_WhatCounts(t *testing.T) {
	tb, lb, addr := server(t, "k")
	var mu sync.Mutex
	now := time.Now()
	tb.mu.Lock()
	tb.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	tb.mu.Unlock()
	for range 5 { // probes: connect and go
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	c := dialRaw(t, addr) // a handshake that breaks off after the ACK
	c.hello(newHello(true, "alpha"))
	c.hc.conn.Close()
	waitFor(t, "the handshakes to end", func() bool { return tb.inboundFrom("127.0.0.1") == 0 })
	if tb.isBlocked("127.0.0.1") || tb.Stats().AuthFailures != 0 {
		t.Fatalf("probes held the host off (%d authentication failures)", tb.Stats().AuthFailures)
	}
	c = dialRaw(t, addr)
	c.hello(newHello(true, "alpha"))
	var p [proofSize]byte
	rand.Read(p[:])
	c.hc.send(typeAuth, p[:])
	c.expectAuthRefused()
	lb.waitLog(t, "peer authentication failed")
	if !tb.isBlocked("127.0.0.1") || tb.Stats().AuthFailures != 1 {
		t.Fatalf("a wrong proof: held off %v, %d failures", tb.isBlocked("127.0.0.1"), tb.Stats().AuthFailures)
	}
	mu.Lock()
	now = now.Add(2 * time.Second) // the hold-off is over
	mu.Unlock()
	a, _ := configs("k")
	a.PeerAddr = addr
	ta := start(t, a)
	sessions(t, ta, tb)
	tb.mu.Lock()
	_, held := tb.blocked["127.0.0.1"]
	tb.mu.Unlock()
	if held {
		t.Fatal("the host's failures outlived a session established from it")
	}
}

// TestSession_SilentPartitionUnderTraffic: with a long ping interval, a
// link cut silently while the application sends is found through the
// pings that traffic brings forward, long before the ping interval; a
// healthy busy link is not cut by them.
func TestSession_SilentPartitionUnderTraffic(t *testing.T) {
	a, b := configs("")
	a.PingInterval, b.PingInterval = 30*time.Second, 30*time.Second
	// 1 s: a loaded machine must not fail the healthy part; detection
	// (about 1 s + 1 s) stays far below the 30 s ping interval.
	a.PingTimeout, b.PingTimeout = time.Second, time.Second
	stall := make(chan struct{})
	l := newLink(t, a, b)
	sa, sb := rewrap(t, l, func(c net.Conn) net.Conn { return &stallConn{Conn: c, stall: stall, closed: make(chan struct{})} })
	var received sync.WaitGroup
	received.Go(func() {
		for {
			if _, err := sb.Recv(Data); err != nil {
				return
			}
		}
	})
	send := func(d time.Duration) int {
		n := 0
		for end := time.Now().Add(d); time.Now().Before(end); n++ {
			if sa.Send(Data, typeTest, make([]byte, 4096)) != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		return n
	}
	before := l.B.Stats().FramesRecv
	sent := send(2500 * time.Millisecond)
	select {
	case <-sa.Done():
		t.Fatalf("a healthy busy link failed: %v", sa.Err())
	default:
	}
	waitFor(t, "the frames at b", func() bool { return l.B.Stats().FramesRecv-before >= uint64(sent)+2 })
	close(stall) // a stops hearing b
	start := time.Now()
	go send(10 * time.Second)
	select {
	case <-sa.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the silent partition was never detected")
	}
	if !errors.Is(sa.Err(), ErrPingTimeout) {
		t.Errorf("a ended with %v, want a ping timeout", sa.Err())
	}
	if d := time.Since(start); d >= a.PingInterval {
		t.Errorf("detected after %v: the ping interval, not the traffic", d)
	}
	sb.Close("test over")
	received.Wait()
}

// TestTransport_StatsWhileSessionsChange: Stats may be read at any time,
// while sessions come and go (run under -race).
func TestTransport_StatsWhileSessionsChange(t *testing.T) {
	a, b := configs("")
	l := newLink(t, a, b)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, tr := range []*Transport{l.A, l.B} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if st := tr.Stats(); st.Connected && st.ConnectedSince.IsZero() {
					t.Error("connected, since the zero time")
				}
			}
		})
	}
	for range 5 {
		sa, sb := sessions(t, l.A, l.B)
		l.Break()
		<-sa.Done()
		<-sb.Done()
		l.Heal()
	}
	close(stop)
	wg.Wait()
}
