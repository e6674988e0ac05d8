package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// rawClient speaks the handshake by hand against a listening transport.
type rawClient struct {
	t      *testing.T
	hc     *hsConn
	hb, ab []byte // the HELLO sent and the ACK received, for the transcript
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c, _ := newCodecs()
	return &rawClient{t: t, hc: newHSConn(conn, c)}
}

func (c *rawClient) hello(h hello) ack {
	c.t.Helper()
	c.hb = h.appendBinary(nil)
	if err := c.hc.send(typeHello, c.hb); err != nil {
		c.t.Fatal(err)
	}
	_, p, err := c.hc.recv(typeAck)
	if err != nil {
		c.t.Fatalf("hello refused: %v", err)
	}
	c.ab = slices.Clone(p)
	a, err := decodeAck(p)
	if err != nil {
		c.t.Fatal(err)
	}
	return a
}

// expectRefused reads until the server refuses or closes.
func (c *rawClient) expectRefused() {
	c.t.Helper()
	_, _, err := c.hc.recv(typeOK)
	if err == nil {
		c.t.Fatal("the server accepted")
	}
}

// expectAuthRefused checks that the server answered an AUTH with a
// refusal: no OK, so none of the server's proof bytes.
func (c *rawClient) expectAuthRefused() {
	c.t.Helper()
	_, p, err := c.hc.recv(typeOK)
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != refuseAuth {
		c.t.Fatalf("answer to a wrong proof: %v (payload %x), want an authentication refusal", err, p)
	}
	if _, _, err := c.hc.recv(typeOK); err == nil {
		c.t.Fatal("a frame followed the refusal")
	}
}

// proof is the client proof over this client's transcript.
func (c *rawClient) proof(secret, label string) [proofSize]byte {
	return proof([]byte(secret), label, transcript(c.hb, c.ab))
}

func newHello(secret bool, from string) hello {
	h := hello{minVersion: VersionMin, maxVersion: VersionMax, stream: Data, resource: "r0", from: from, to: "beta", instance: 7}
	if secret {
		h.flags = helloFlagSecret
	}
	rand.Read(h.sessionID[:])
	rand.Read(h.challenge[:])
	return h
}

// server starts beta listening on loopback with the given secret.
func server(t *testing.T, secret string) (*Transport, *logBuffer, string) {
	_, b := configs(secret)
	addr := listen(t)
	b.ListenAddr = addr
	var lb logBuffer
	b.Logger = lb.logger()
	return start(t, b), &lb, addr
}

// versionRefused is a client that speaks versions lo-hi, which the
// server refuses for having none in common with its own.
func versionRefused(lo, hi uint16) func(t *testing.T, addr string) {
	return func(t *testing.T, addr string) {
		c := dialRaw(t, addr)
		h := newHello(true, "alpha")
		h.minVersion, h.maxVersion = lo, hi
		c.hc.send(typeHello, h.appendBinary(nil))
		_, _, err := c.hc.recv(typeAck)
		var re *RefusedError
		want := fmt.Sprintf("you speak %d-%d, I speak %d-%d", lo, hi, VersionMin, VersionMax)
		if !errors.As(err, &re) || !strings.Contains(re.Reason, want) {
			t.Fatalf("refusal %v, want %q", err, want)
		}
	}
}

// TestAuth_Refusals: each way of failing authentication is refused, no
// session reaches the application, and the log says so with the address.
func TestAuth_Refusals(t *testing.T) {
	tests := []struct {
		name    string
		secret  string
		run     func(t *testing.T, addr string)
		wantLog string
	}{
		{"wrong secret", "right", func(t *testing.T, addr string) {
			a, _ := configs("wrong")
			a.PeerAddr = addr
			var la logBuffer
			a.Logger = la.logger()
			ta := start(t, a)
			la.waitLog(t, "peer authentication failed")
			if ta.Current() != nil {
				t.Error("a session with the wrong secret")
			}
		}, "wrong response (different shared-secret?)"},
		{"no secret on the client", "right", func(t *testing.T, addr string) {
			a, _ := configs("")
			a.PeerAddr = addr
			start(t, a)
		}, "only one side has a shared-secret"},
		{"no secret on the server", "", func(t *testing.T, addr string) {
			a, _ := configs("client has one")
			a.PeerAddr = addr
			start(t, a)
		}, "only one side has a shared-secret"},
		{"truncated response", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			c.hello(newHello(true, "alpha"))
			c.hc.send(typeAuth, make([]byte, 16))
			c.expectAuthRefused()
		}, "a 16-byte response"},
		{"garbage proof gets no server proof", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			c.hello(newHello(true, "alpha"))
			var p [proofSize]byte
			rand.Read(p[:])
			c.hc.send(typeAuth, p[:])
			c.expectAuthRefused()
		}, "wrong response"},
		{"correct HMAC, wrong node name in the hello", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			h := newHello(true, "mallory")
			c.hc.send(typeHello, h.appendBinary(nil))
			c.expectRefused()
		}, "claims to be node mallory (expected alpha)"},
		{"HMAC computed for another node name", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			c.hello(newHello(true, "alpha"))
			other := newHello(true, "gamma")
			p := proof([]byte("k"), labelClient, transcript(other.appendBinary(nil), c.ab))
			c.hc.send(typeAuth, p[:])
			c.expectAuthRefused()
		}, "wrong response"},
		{"HELLO altered in transit", "k", func(t *testing.T, addr string) {
			// A man in the middle lowers the instance (or any field) on
			// its way to the server; the client's proof covers the HELLO
			// it sent, so the server refuses.
			c := dialRaw(t, addr)
			sent := newHello(true, "alpha")
			seen := sent
			seen.instance++
			c.hello(seen)
			p := proof([]byte("k"), labelClient, transcript(sent.appendBinary(nil), c.ab))
			c.hc.send(typeAuth, p[:])
			c.expectAuthRefused()
		}, "wrong response"},
		{"proof with the server's label", "k", func(t *testing.T, addr string) {
			// Right secret and transcript, wrong direction: a server
			// proof is never accepted as a client's.
			c := dialRaw(t, addr)
			c.hello(newHello(true, "alpha"))
			p := c.proof("k", labelServer)
			c.hc.send(typeAuth, p[:])
			c.expectAuthRefused()
		}, "wrong response"},
		{"replayed handshake transcript", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			h := newHello(true, "alpha")
			c.hello(h)
			p := c.proof("k", labelClient)
			c.hc.send(typeAuth, p[:])
			_, sp, err := c.hc.recv(typeOK)
			if err != nil {
				t.Fatalf("the genuine handshake failed: %v", err)
			}
			if want := c.proof("k", labelServer); !bytes.Equal(sp, want[:]) {
				t.Fatalf("the server's proof %x, want %x", sp, want)
			}
			// The same bytes again on a new connection: a fresh server
			// challenge makes the recorded response worthless.
			r := dialRaw(t, addr)
			r.hc.send(typeHello, h.appendBinary(nil))
			r.hc.recv(typeAck)
			r.hc.send(typeAuth, p[:])
			r.expectAuthRefused()
		}, "wrong response"},
		{"other resource", "k", func(t *testing.T, addr string) {
			c := dialRaw(t, addr)
			h := newHello(true, "alpha")
			h.resource = "r9"
			c.hc.send(typeHello, h.appendBinary(nil))
			c.expectRefused()
		}, "asked for resource r9"},
		{"no common version", "k", versionRefused(6, 9), "the peer speaks 6-9, this node 2-5"},
		// Version 1 (xxhash64 on every frame) frames its HELLO as every
		// version does, so a version-1 node is refused, not garbled.
		{"version 1", "k", versionRefused(1, 1), "the peer speaks 1-1, this node 2-5"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tb, lb, addr := server(t, tc.secret)
			tc.run(t, addr)
			lb.waitLog(t, tc.wantLog)
			if !strings.Contains(lb.String(), "remote=127.0.0.1:") {
				t.Errorf("the log does not name the peer's address:\n%s", lb)
			}
			if tb.Current() != nil {
				t.Fatal("a session was established")
			}
			select {
			case s := <-tb.next:
				t.Fatalf("a session reached the application: %v", s)
			default:
			}
		})
	}
}

// TestAuth_ReflectedChallenge: a server that answers with the client's own
// challenge is refused by the client.
func TestAuth_ReflectedChallenge(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		c, _ := newCodecs()
		hc := newHSConn(conn, c)
		_, p, err := hc.recv(typeHello)
		if err != nil {
			return
		}
		h, _ := decodeHello(p)
		a := ack{version: VersionMax, flags: helloFlagSecret, challenge: h.challenge}
		hc.send(typeAck, a.appendBinary(nil))
		hc.recv(typeAuth)
	}()
	a, _ := configs("k")
	a.PeerAddr = ln.Addr().String()
	var la logBuffer
	a.Logger = la.logger()
	tr, err := New(a)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	err = tr.dialOnce(context.Background())
	if !errors.Is(err, ErrReflection) {
		t.Fatalf("dial against a reflecting server: %v", err)
	}
}

// tamperConn lets a test change what a's side writes after the session is
// up: flip a bit, send a frame twice, or move a frame to the other stream.
type tamperConn struct {
	net.Conn
	l     *tamperLink
	index int // 0 data, 1 control
}

type tamperLink struct {
	mu     sync.Mutex
	conns  []*tamperConn
	mode   string // "", "flip", "replay", "move"
	frames int
}

func (c *tamperConn) Write(p []byte) (int, error) {
	c.l.mu.Lock()
	mode := c.l.mode
	if mode != "" && c.index == 0 && len(p) > 100 {
		c.l.mode = ""
	} else {
		mode = ""
	}
	var other *tamperConn
	if mode == "move" {
		other = c.l.conns[1-c.index]
	}
	c.l.mu.Unlock()
	switch mode {
	case "flip":
		q := append([]byte(nil), p...)
		q[headerSize+50] ^= 0x01
		return c.Conn.Write(q)
	case "replay":
		if n, err := c.Conn.Write(p); err != nil {
			return n, err
		}
		return c.Conn.Write(p)
	case "move":
		return other.Conn.Write(p)
	}
	return c.Conn.Write(p)
}

// TestAuth_TamperedFrames: a sealed frame altered, replayed or moved to the
// other stream ends the session; the application never sees it.
func TestAuth_TamperedFrames(t *testing.T) {
	for _, mode := range []string{"flip", "replay", "move"} {
		t.Run(mode, func(t *testing.T) {
			a, b := configs("k")
			var lb logBuffer
			b.Logger = lb.logger()
			l, err := NewLink(a, b)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			tl := &tamperLink{}
			sa, sb := rewrap(t, l, func(c net.Conn) net.Conn {
				tl.mu.Lock()
				defer tl.mu.Unlock()
				tc := &tamperConn{Conn: c, l: tl, index: len(tl.conns) % 2}
				tl.conns = append(tl.conns, tc)
				return tc
			})
			if err := sa.Send(Data, typeTest, []byte("genuine")); err != nil {
				t.Fatal(err)
			}
			if m, err := sb.Recv(Data); err != nil || string(m.Payload) != "genuine" {
				t.Fatalf("genuine frame: %v", err)
			}
			tl.mu.Lock()
			tl.mode = mode
			tl.mu.Unlock()
			sa.Send(Data, typeTest, []byte(strings.Repeat("tampered ", 30)))
			select {
			case <-sb.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the tampered frame did not end the session")
			}
			if mode != "replay" {
				// flip and move: nothing after the genuine frame arrives.
				if m, err := sb.Recv(Data); err == nil {
					t.Fatalf("received %q after tampering", m.Payload)
				}
			} else {
				// The original arrives once; its replay ends the session.
				if m, err := sb.Recv(Data); err != nil || !strings.HasPrefix(string(m.Payload), "tampered") {
					t.Fatalf("the original of the replayed frame: %v", err)
				}
				if _, err := sb.Recv(Data); err == nil {
					t.Fatal("the replayed frame was delivered")
				}
			}
			if !errors.Is(sb.Err(), ErrFrameAuth) || !errors.Is(sb.Err(), ErrProtocol) {
				t.Errorf("session ended with %v, want ErrFrameAuth, a protocol violation", sb.Err())
			}
			lb.waitLog(t, "failed authentication")
		})
	}
}
