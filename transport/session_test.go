package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sessions waits for both ends of the next session.
func sessions(t testing.TB, a, b *Transport) (*Session, *Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := a.Next(ctx)
	if err != nil {
		t.Fatalf("side a: %v", err)
	}
	sb, err := b.Next(ctx)
	if err != nil {
		t.Fatalf("side b: %v", err)
	}
	if sa.id != sb.id {
		t.Fatalf("the two sides hold different sessions")
	}
	return sa, sb
}

// exchange sends messages both ways on both streams and checks them.
func exchange(t testing.TB, sa, sb *Session) {
	t.Helper()
	big := make([]byte, 4<<20)
	rand.Read(big)
	for _, dir := range []struct{ from, to *Session }{{sa, sb}, {sb, sa}} {
		for _, st := range []Stream{Data, Control} {
			msgs := [][]byte{[]byte("first"), bytes.Repeat([]byte("z"), 70000), big, nil}
			if st == Control { // the control stream carries small messages
				msgs = [][]byte{[]byte("ack"), bytes.Repeat([]byte("z"), 70000), nil}
			}
			batch := make([]Out, len(msgs))
			for i, m := range msgs {
				// The payload in two parts (the tail may be empty).
				batch[i] = Out{Type: typeTest, Payload: m[:len(m)/3], Tail: m[len(m)/3:]}
			}
			go func() {
				for _, m := range msgs {
					if err := dir.from.Send(st, typeTest, m); err != nil {
						t.Errorf("send: %v", err)
						return
					}
				}
				// The same again, with one write.
				if err := dir.from.SendMany(st, batch); err != nil {
					t.Errorf("send many: %v", err)
				}
			}()
			for i, want := range slices.Concat(msgs, msgs) {
				m, err := dir.to.Recv(st)
				if err != nil || m.Type != typeTest || !bytes.Equal(m.Payload, want) {
					t.Fatalf("%s message %d: %v (type %d, %d bytes)", st, i, err, m.Type, len(m.Payload))
				}
				// Later frames may be read into it: they must still arrive
				// intact.
				dir.to.Recycle(m.Payload)
			}
		}
	}
}

func TestSession_OverLink(t *testing.T) {
	for _, secret := range []string{"", "s3cret"} {
		for _, comp := range []Compression{CompressNone, CompressZstd} {
			t.Run(fmt.Sprintf("secret=%q/compression=%d", secret, comp), func(t *testing.T) {
				a, b := configs(secret)
				a.Compression, b.Compression = comp, comp
				var la, lb logBuffer
				a.Logger, b.Logger = la.logger(), lb.logger()
				l, err := NewLink(a, b)
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				sa, sb := sessions(t, l.A, l.B)
				if !sa.Dialed() || sb.Dialed() || sa.Peer() != "beta" || sb.Peer() != "alpha" {
					t.Fatalf("dialed %v %v peers %s %s", sa.Dialed(), sb.Dialed(), sa.Peer(), sb.Peer())
				}
				exchange(t, sa, sb)
				st := l.A.Stats()
				if !st.Connected || st.FramesSent < 6 || st.PayloadSent < 4<<20 || st.PayloadRecv < 4<<20 ||
					st.WireRecv > st.PayloadRecv+1000 && comp != CompressNone || st.Authenticated != (secret != "") {
					t.Errorf("stats %+v", st)
				}
				if secret == "" && !bytes.Contains([]byte(la.String()), []byte("neither authenticated nor encrypted")) {
					t.Error("no warning about the unprotected link")
				}
				if err := sa.Send(Data, typeTest+5, nil); !errors.Is(err, ErrFrameType) {
					t.Errorf("sending an unregistered type: %v", err)
				}
				// A batch with a bad frame sends none of it, and the
				// session goes on.
				for _, bad := range []Out{{Type: typeTest + 5}, {Type: typeTest, Payload: make([]byte, MaxPayload), Tail: []byte{1}}} {
					err := sa.SendMany(Data, []Out{{Type: typeTest, Payload: []byte("lost")}, bad})
					if !errors.Is(err, ErrFrameType) && !errors.Is(err, ErrFrameTooLarge) {
						t.Errorf("sending a batch with a bad frame: %v", err)
					}
				}
				if err := sa.Send(Data, typeTest, []byte("after")); err != nil {
					t.Fatal(err)
				}
				if m, err := sb.Recv(Data); err != nil || string(m.Payload) != "after" {
					t.Errorf("after a refused batch: %q, %v", m.Payload, err)
				}
			})
		}
	}
}

// A frame's buffer, handed back with Recycle, takes a later frame: frames
// from 1 KiB on are read straight into pooled buffers. Whether a returned
// buffer comes back depends on sync.Pool (which drops returns at random
// under -race and keeps one per CPU that others cannot take); a 4 KiB
// frame may also be read before the first Recycle. So for 4 KiB frames,
// which many are read ahead of Recycle, the test asserts that each is in
// a buffer the pool takes back (TestBufPool_Reuse shows that it then
// hands it out again); for 1 MiB ones, that some were reused. Frames
// below 1 KiB are copied out of the reader's own buffer.
func TestSession_RecycleReuses(t *testing.T) {
	for _, tc := range []struct {
		secret string
		size   int
	}{{"", 1 << 20}, {"s3cret", 1 << 20}, {"", 4096}, {"s3cret", 4096}} {
		secret := tc.secret
		t.Run(fmt.Sprintf("secret=%q,size=%d", secret, tc.size), func(t *testing.T) {
			a, b := configs(secret)
			l, err := NewLink(a, b)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			sa, sb := sessions(t, l.A, l.B)
			data := make([]byte, tc.size)
			const frames = 50
			go func() {
				for i := range frames {
					data[0] = byte(i)
					if err := sa.SendMany(Data, []Out{{Type: typeTest, Payload: []byte("hdr"), Tail: data}}); err != nil {
						t.Errorf("send: %v", err)
						return
					}
				}
			}()
			seen := map[*byte]bool{}
			reused := 0
			for i := range frames {
				m, err := sb.Recv(Data)
				if err != nil || len(m.Payload) != 3+len(data) || m.Payload[3] != byte(i) {
					t.Fatalf("frame %d: %v (%d bytes)", i, err, len(m.Payload))
				}
				if _, ok := poolable(cap(m.Payload)); !ok {
					t.Fatalf("frame %d: %d bytes in a buffer of capacity %d, which the pool does not take", i, len(m.Payload), cap(m.Payload))
				}
				if seen[&m.Payload[0]] {
					reused++
				}
				seen[&m.Payload[0]] = true
				sb.Recycle(m.Payload)
			}
			// sync.Pool drops some returns (many under -race), and the
			// reader may run ahead of Recycle: most, not all, are reused.
			if reused == 0 && tc.size > ownAbove {
				t.Fatalf("none of %d frames was read into a recycled buffer", frames)
			}
			t.Logf("%d of %d frames reused a buffer", reused, frames)
		})
	}
}

func TestSession_OverTCP(t *testing.T) {
	a, b := configs("tcp secret")
	la := listen(t)
	lb := listen(t)
	a.ListenAddr, a.PeerAddr = la, lb
	b.ListenAddr, b.PeerAddr = lb, la
	a.SndBuf = 1 << 20
	ta, tb := start(t, a), start(t, b)
	sa, sb := sessions(t, ta, tb)
	exchange(t, sa, sb)
	// Exactly one session although both dial.
	time.Sleep(3 * a.PingInterval)
	if ta.Current() != sa || tb.Current() != sb || ta.Stats().Sessions != 1 || tb.Stats().Sessions != 1 {
		t.Fatalf("sessions: %d and %d", ta.Stats().Sessions, tb.Stats().Sessions)
	}
	if sa.Dialed() == sb.Dialed() {
		t.Errorf("both sides think they dialed the session: %v", sa.Dialed())
	}
}

// listen reserves a free loopback port.
func listen(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func start(t testing.TB, cfg Config) *Transport {
	t.Helper()
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func TestSession_CrossedDialsOverTCP(t *testing.T) {
	// Many rounds of both sides dialing at the same moment: every round
	// ends in one shared session.
	for round := range 20 {
		a, b := configs("x")
		la, lb := listen(t), listen(t)
		a.ListenAddr, a.PeerAddr = la, lb
		b.ListenAddr, b.PeerAddr = lb, la
		ta, err := New(a)
		if err != nil {
			t.Fatal(err)
		}
		tb, _ := New(b)
		ta.Start()
		tb.Start()
		sa, sb := sessions(t, ta, tb)
		if sa.id != sb.id {
			t.Fatalf("round %d: different sessions", round)
		}
		time.Sleep(50 * time.Millisecond)
		if ta.Current() != sa || tb.Current() != sb {
			t.Fatalf("round %d: the session was replaced", round)
		}
		ta.Close()
		tb.Close()
	}
}

func TestSession_ReconnectAfterBreak(t *testing.T) {
	a, b := configs("k")
	l := newLink(t, a, b)
	sa, _ := sessions(t, l.A, l.B)
	l.Break()
	select {
	case <-sa.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session survived a broken link")
	}
	if _, err := sa.Recv(Data); err == nil {
		t.Fatal("Recv on a dead session succeeded")
	}
	l.Heal()
	sa2, sb2 := sessions(t, l.A, l.B)
	exchange(t, sa2, sb2)
	if l.A.Stats().Reconnects != 1 {
		t.Errorf("reconnects %d", l.A.Stats().Reconnects)
	}
}

// stallConn stops delivering reads when stalled, as a silent partition
// does: a read then returns only once the connection is closed.
type stallConn struct {
	net.Conn
	stall    chan struct{}
	closed   chan struct{}
	once     sync.Once
	mu       sync.Mutex
	deadline time.Time
}

func (c *stallConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	select {
	case <-c.stall:
		c.mu.Lock()
		deadline := c.deadline
		c.mu.Unlock()
		var timeout <-chan time.Time
		if !deadline.IsZero() {
			timeout = time.After(time.Until(deadline))
		}
		select { // the bytes vanish; the read ends at the deadline or close
		case <-c.closed:
			return 0, net.ErrClosed
		case <-timeout:
			return 0, os.ErrDeadlineExceeded
		}
	default:
	}
	return n, err
}

func (c *stallConn) SetReadDeadline(d time.Time) error {
	c.mu.Lock()
	c.deadline = d
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(d)
}

func (c *stallConn) SetDeadline(d time.Time) error {
	c.mu.Lock()
	c.deadline = d
	c.mu.Unlock()
	return c.Conn.SetDeadline(d)
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

func TestSession_PingTimeout(t *testing.T) {
	a, b := configs("")
	a.PingTimeout, b.PingTimeout = 500*time.Millisecond, 500*time.Millisecond
	stall := make(chan struct{})
	l, err := NewLink(a, b)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	sa, sb := rewrap(t, l, func(c net.Conn) net.Conn { return &stallConn{Conn: c, stall: stall, closed: make(chan struct{})} })
	start := time.Now()
	close(stall) // a stops hearing b
	select {
	case <-sa.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the silent peer was never detected")
	}
	d := time.Since(start)
	if !errors.Is(sa.Err(), ErrPingTimeout) {
		t.Errorf("a ended with %v, want a ping timeout", sa.Err())
	}
	if limit := a.PingInterval + a.PingTimeout + 500*time.Millisecond; d > limit {
		t.Errorf("detected after %v, want within %v", d, limit)
	}
	_ = sb
}

func TestTransport_CloseLeavesNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	a, b := configs("z")
	a.Compression, b.Compression = CompressS2, CompressS2
	l, err := NewLink(a, b)
	if err != nil {
		t.Fatal(err)
	}
	sa, sb := sessions(t, l.A, l.B)
	exchange(t, sa, sb)
	done := make(chan struct{})
	go func() { l.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	if _, err := l.A.Next(context.Background()); !errors.Is(err, ErrTransportClosed) {
		t.Errorf("Next after Close: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines left (from %d):\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
	var pe *PeerClosedError
	if !errors.As(sb.Err(), &pe) && !errors.Is(sb.Err(), ErrClosed) {
		t.Errorf("b ended with %v", sb.Err())
	}
}

// rewrap ends the link's first session, wraps a's connections with f, and
// returns the next session (made over wrapped connections).
func rewrap(t *testing.T, l *Link, f func(net.Conn) net.Conn) (*Session, *Session) {
	t.Helper()
	sa0, sb0 := sessions(t, l.A, l.B)
	l.Wrap(f)
	l.Break()
	<-sa0.Done()
	<-sb0.Done()
	l.Heal()
	return sessions(t, l.A, l.B)
}

// TestSession_EstablishRepeatedly: the control stream may authenticate
// before the data stream is registered on the listening side; hundreds of
// fresh links must all come up (a regression test for that race).
func TestSession_EstablishRepeatedly(t *testing.T) {
	for i := range 200 {
		a, b := configs("")
		var la, lb logBuffer
		a.Logger, b.Logger = la.logger(), lb.logger()
		l, err := NewLink(a, b)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = l.A.Next(ctx)
		cancel()
		l.Close()
		if err != nil {
			t.Fatalf("link %d: %v\nalpha:\n%s\nbeta:\n%s", i, err, la.String(), lb.String())
		}
	}
}

// TestSession_ConcurrentSenders: frames of senders that send at once go
// out combined, each sender's in its order, every one intact (a sealed
// frame out of counter order would fail the session).
func TestSession_ConcurrentSenders(t *testing.T) {
	for _, secret := range []string{"", "s3cret"} {
		t.Run(fmt.Sprintf("secret=%q", secret), func(t *testing.T) {
			a, b := configs(secret)
			l, err := NewLink(a, b)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			sa, sb := sessions(t, l.A, l.B)
			const senders, each = 8, 300
			var wg sync.WaitGroup
			for g := range senders {
				wg.Go(func() {
					for i := range each {
						p := fmt.Appendf(nil, "%d:%d:", g, i)
						p = append(p, bytes.Repeat([]byte{byte(i)}, i*7)...)
						var err error
						if i%3 == 0 {
							wait, qerr := sa.Queue(Data, []Out{{Type: typeTest, Payload: p[:2], Tail: p[2:]}})
							if err = qerr; err == nil {
								err = wait()
							}
						} else {
							err = sa.Send(Data, typeTest, p)
						}
						if err != nil {
							t.Errorf("sender %d frame %d: %v", g, i, err)
							return
						}
					}
				})
			}
			next := make([]int, senders)
			for range senders * each {
				m, err := sb.Recv(Data)
				if err != nil {
					t.Fatalf("after %v: %v", next, err)
				}
				var g, i int
				if _, err := fmt.Sscanf(string(m.Payload), "%d:%d:", &g, &i); err != nil || g < 0 || g >= senders {
					t.Fatalf("frame %q: %v", m.Payload[:min(len(m.Payload), 16)], err)
				}
				head := len(fmt.Sprintf("%d:%d:", g, i))
				if i != next[g] || !bytes.Equal(m.Payload[head:], bytes.Repeat([]byte{byte(i)}, i*7)) {
					t.Fatalf("sender %d: frame %d arrived (%d bytes), want frame %d", g, i, len(m.Payload), next[g])
				}
				next[g]++
			}
			wg.Wait()
			if st := l.A.Stats(); st.FramesSent < senders*each {
				t.Errorf("stats: %d frames sent, want at least %d", st.FramesSent, senders*each)
			}
		})
	}
}

// Senders that become ready together share socket writes. With one
// processor, 64 goroutines released at once each send one frame over TCP:
// a socket write does not block, so without the writer's yields each
// would write its own frame; with them the first writer carries the
// others' frames too.
func TestSession_ReadySendersShareWrites(t *testing.T) {
	ta, _, sa, sb := tcpSessions(t)
	const n = 64
	before := ta.Stats()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	release := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-release
			if err := sa.Send(Data, typeTest, []byte{byte(i)}); err != nil {
				t.Errorf("send %d: %v", i, err)
			}
		}()
	}
	close(release)
	wg.Wait()
	seen := map[byte]bool{}
	for range n {
		m, err := sb.Recv(Data)
		if err != nil || len(m.Payload) != 1 || seen[m.Payload[0]] {
			t.Fatalf("receive: %v, payload % x", err, m.Payload)
		}
		seen[m.Payload[0]] = true
	}
	after := ta.Stats()
	frames, writes := after.FramesSent-before.FramesSent, after.Writes-before.Writes
	// A ping may have gone out too.
	if frames < n || writes > n/8 {
		t.Fatalf("%d frames in %d socket writes, want %d or more in at most %d", frames, writes, n, n/8)
	}
	t.Logf("%d frames in %d socket writes", frames, writes)
}

// Close tells the peer why even while both streams are busy sending: it
// waits for the writers (each holds a stream for its yields and one
// write) instead of skipping the streams. b, which only accepts, closes:
// a, which dials, then sees its session end by the close frame or not at
// all, never by a newer session replacing it.
func TestSession_CloseReasonWhileSending(t *testing.T) {
	for i := range 10 {
		a, b := configs("")
		l, err := NewLink(a, b)
		if err != nil {
			t.Fatal(err)
		}
		sa, sb := sessions(t, l.A, l.B)
		var wg sync.WaitGroup
		for _, st := range []Stream{Data, Control} {
			for range 4 {
				wg.Add(1)
				go func() { // senders, until the session ends
					defer wg.Done()
					p := make([]byte, 4096)
					for sb.Send(st, typeTest, p) == nil {
					}
				}()
			}
			wg.Add(1)
			go func() { // the peer reads everything
				defer wg.Done()
				for {
					if _, err := sa.Recv(st); err != nil {
						return
					}
				}
			}()
		}
		for l.A.Stats().FramesRecv < 1000 {
			time.Sleep(time.Millisecond)
		}
		reason := fmt.Sprintf("closed in round %d", i)
		sb.Close(reason)
		select {
		case <-sa.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("the peer's session did not end")
		}
		var closed *PeerClosedError
		if err := sa.Err(); !errors.As(err, &closed) || closed.Reason != reason {
			t.Fatalf("round %d: the peer's session ended with %v, want the reason %q", i, err, reason)
		}
		wg.Wait()
		l.Close()
	}
}

// Large frames in lockstep over TCP, as protocol C sends writes: each side
// sends a frame only once it has received the other's, so a reader whose
// receive low-water mark asked for more than the rest of the frame in
// flight would sleep for ever. Sizes around lowatFrom and up to 4 MiB.
func TestSession_LargeFramesLockstepOverTCP(t *testing.T) {
	_, _, sa, sb := tcpSessions(t)
	if sa.streams[Data].in.lowat == nil || sb.streams[Data].in.lowat == nil {
		t.Fatal("a TCP data stream reads without a receive low-water mark")
	}
	sizes := []int{lowatFrom, lowatFrom + 1, 1<<20 + 31, 4 << 20, 3<<20 + 4096}
	done := make(chan error, 1)
	go func() {
		done <- func() error {
			for round := range 30 {
				for _, dir := range []struct{ from, to *Session }{{sa, sb}, {sb, sa}} {
					p := make([]byte, sizes[round%len(sizes)])
					rand.Read(p)
					if err := dir.from.Send(Data, typeTest, p); err != nil {
						return err
					}
					m, err := dir.to.Recv(Data)
					if err != nil {
						return err
					}
					if !bytes.Equal(m.Payload, p) {
						return fmt.Errorf("round %d: %d bytes received, not the %d sent", round, len(m.Payload), len(p))
					}
					dir.to.Recycle(m.Payload)
				}
			}
			return nil
		}()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		// Closing the transports (cleanup) ends the stuck Recv.
		t.Fatal("a large frame sent in lockstep was not received within 30 s")
	}
}

// tcpSessions starts two transports without a secret that dial each other
// over TCP on loopback, and returns them with their session.
func tcpSessions(t *testing.T) (*Transport, *Transport, *Session, *Session) {
	t.Helper()
	a, b := configs("")
	la, lb := listen(t), listen(t)
	a.ListenAddr, a.PeerAddr = la, lb
	b.ListenAddr, b.PeerAddr = lb, la
	ta, tb := start(t, a), start(t, b)
	sa, sb := sessions(t, ta, tb)
	return ta, tb, sa, sb
}

// Two nodes agree on the newest version both speak, and frames sent as a
// header and a referenced tail (checksummed in two parts from version 3)
// arrive intact both ways, between two current nodes and between a
// current node and one that speaks only version 2 (either one dialing).
func TestSession_Versions(t *testing.T) {
	tests := []struct {
		name       string
		maxA, maxB uint16
		want       uint16
	}{
		{"both current", 0, 0, VersionMax},
		{"alpha speaks only version 2", 2, 0, 2},
		{"beta speaks only version 2", 0, 2, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := configs("")
			a.versionMax, b.versionMax = tc.maxA, tc.maxB
			la, lb := listen(t), listen(t)
			a.ListenAddr, a.PeerAddr = la, lb
			b.ListenAddr, b.PeerAddr = lb, la
			sa, sb := sessions(t, start(t, a), start(t, b))
			for _, s := range []*Session{sa, sb} {
				for _, st := range s.streams {
					if st.version != tc.want {
						t.Fatalf("%s stream at version %d, want %d", st.kind, st.version, tc.want)
					}
				}
			}
			for _, n := range []int{100, 64<<10 + 31, 1<<20 + 31} {
				for _, dir := range []struct{ from, to *Session }{{sa, sb}, {sb, sa}} {
					p := make([]byte, n)
					rand.Read(p)
					if err := dir.from.SendMany(Data, []Out{{Type: typeTest, Payload: p[:31], Tail: p[31:]}}); err != nil {
						t.Fatal(err)
					}
					m, err := dir.to.Recv(Data)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(m.Payload, p) {
						t.Fatalf("%d bytes: received %d bytes, not those sent", n, len(m.Payload))
					}
					dir.to.Recycle(m.Payload)
				}
			}
		})
	}
}

// TestLockSoon_BusyLockers: Close's lock on a stream's writer is taken in
// turn even while senders queue for it without pause (the mutex then hands
// itself from waiter to waiter, and a TryLock poller would never get it),
// and given up on a lock held past the wait, which is released later.
func TestLockSoon_BusyLockers(t *testing.T) {
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				time.Sleep(200 * time.Microsecond) // a write
				mu.Unlock()
			}
		})
	}
	time.Sleep(20 * time.Millisecond) // the lockers queue
	for i := range 20 {
		if !lockSoon(&mu, time.Second) {
			t.Fatalf("try %d: not locked within a second while four lockers take turns", i)
		}
		mu.Unlock()
	}
	close(stop)
	wg.Wait()

	mu.Lock() // a stuck writer
	if lockSoon(&mu, 50*time.Millisecond) {
		t.Fatal("locked while held")
	}
	mu.Unlock()
	locked := make(chan struct{})
	go func() { mu.Lock(); close(locked) }()
	select {
	case <-locked: // the abandoned lock was released once it came
		mu.Unlock()
	case <-time.After(10 * time.Second):
		t.Fatal("the lock given up on was never released")
	}
}

// TestSession_UserTimeout: both streams of a session, on the side that
// dialed and the side that accepted, end once sent data has gone
// unacknowledged for Timeout (TCP_USER_TIMEOUT), so a black hole on one
// connection while the other still carries the pings is found
// (TestFault_P3OneWay's data-stream cases, in the integration tests).
func TestSession_UserTimeout(t *testing.T) {
	a, b := configs("")
	a.Timeout, b.Timeout = 1700*time.Millisecond, 1700*time.Millisecond
	addr := listen(t)
	b.ListenAddr, a.PeerAddr = addr, addr
	ta, tb := start(t, a), start(t, b)
	sa, sb := sessions(t, ta, tb)
	for _, s := range []*Session{sa, sb} {
		for _, st := range s.streams {
			tc, ok := st.conn.(*net.TCPConn)
			if !ok {
				t.Fatalf("stream %d: %T, not a TCP connection", st.kind, st.conn)
			}
			raw, err := tc.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var ms int
			var gerr error
			raw.Control(func(fd uintptr) { ms, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT) })
			if gerr != nil || ms != 1700 {
				t.Errorf("dialed %v, stream %d: TCP_USER_TIMEOUT %d ms (%v), want 1700", s.Dialed(), st.kind, ms, gerr)
			}
		}
	}
}
