package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// Hostile clients (reference/testing.md §4.2, §4.4; CVE-2024-7409): many
// connections, clients that stall in negotiation, clients that flood
// requests and never read a reply. Each test asserts that memory stays
// bounded, that a well-behaved client is served meanwhile, and that the
// server is back to its baseline of goroutines and connections once the
// hostile clients are gone.

// memUse is the Go heap and goroutine stacks in use after a collection.
func memUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc + ms.StackInuse
}

// rawDial connects without negotiating and reads the greeting, so the
// server has accepted and registered the connection when it returns.
func rawDial(t *testing.T, path string) net.Conn {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.ReadFull(nc, make([]byte, greetingSize)); err != nil {
		nc.Close()
		t.Fatalf("greeting: %v", err)
	}
	return nc
}

// wellBehaved connects, writes 4 KiB and reads it back, all within limit.
func wellBehaved(t *testing.T, path string, cookie uint64, limit time.Duration) {
	t.Helper()
	start := time.Now()
	c := open(t, path, "disk")
	defer c.nc.Close()
	data := bytes.Repeat([]byte{byte(cookie)}, 4096)
	if errno, _ := c.do(Request{Type: CmdWrite, Cookie: cookie, Offset: 8192, Length: 4096}, data); errno != 0 {
		t.Fatalf("write: %v", errno)
	}
	errno, got := c.do(Request{Type: CmdRead, Cookie: cookie + 1, Offset: 8192, Length: 4096}, nil)
	if errno != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v, %d bytes equal=%v", errno, len(got), bytes.Equal(got, data))
	}
	if d := time.Since(start); d > limit {
		t.Errorf("well-behaved client took %v, want under %v", d, limit)
	}
	t.Logf("well-behaved client served in %v", time.Since(start).Round(time.Microsecond))
}

// waitGoroutines waits until no more than n goroutines run.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after 10 s, want at most %d:\n%s", runtime.NumGoroutine(), n,
				buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestHostile_ThousandConnections: a client holds 1,000 connections open
// in negotiation. The server keeps each small, serves another client, and
// releases everything when they close.
func TestHostile_ThousandConnections(t *testing.T) {
	const n = 1000
	srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(1 << 20)}), func(s *Server) {
		s.HandshakeTimeout = 5 * time.Minute // they stay until the client closes them
		s.Logger = nil
	})
	baseG := runtime.NumGoroutine()
	baseMem := memUse()
	hostile := make([]net.Conn, 0, n)
	defer func() {
		for _, nc := range hostile {
			nc.Close()
		}
	}()
	for range n {
		hostile = append(hostile, rawDial(t, path))
	}
	if got := len(srv.Conns()); got != n {
		t.Fatalf("%d connections registered, want %d", got, n)
	}
	// Both ends of every connection live in this process: the bound
	// covers the client's side too.
	grown := int64(memUse()) - int64(baseMem)
	t.Logf("%d connections negotiating: heap+stacks grew %d KiB (%d B each), %d goroutines more",
		n, grown>>10, grown/n, runtime.NumGoroutine()-baseG)
	if grown > n*32<<10 {
		t.Errorf("heap+stacks grew %d KiB for %d connections, want under 32 KiB each", grown>>10, n)
	}
	if g := runtime.NumGoroutine() - baseG; g > n+10 {
		t.Errorf("%d goroutines more for %d connections, want one each", g, n)
	}
	wellBehaved(t, path, 1, 5*time.Second)

	for _, nc := range hostile {
		nc.Close()
	}
	hostile = nil
	waitFor(t, func() bool { return len(srv.Conns()) == 0 })
	waitGoroutines(t, baseG)
}

// TestHostile_StalledNegotiations: clients that connect and never finish
// negotiating (at each step of it) are dropped after HandshakeTimeout
// without any help from them, while another client is served.
func TestHostile_StalledNegotiations(t *testing.T) {
	const perStep = 50
	timeout := 500 * time.Millisecond
	srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(1 << 20)}), func(s *Server) {
		s.HandshakeTimeout = timeout
		s.Logger = nil
	})
	baseG := runtime.NumGoroutine()
	steps := map[string][]byte{
		"after the greeting":      nil,
		"after the client flags":  {0, 0, 0, 3},
		"inside an option header": append([]byte{0, 0, 0, 3}, "IHAVEO"...),
		"inside an option payload": append(append([]byte{0, 0, 0, 3}, "IHAVEOPT"...),
			0, 0, 0, byte(optGo), 0, 0, 0, 100, 0, 0),
	}
	var hostile []net.Conn
	defer func() {
		for _, nc := range hostile {
			nc.Close()
		}
	}()
	start := time.Now()
	for _, b := range steps {
		for range perStep {
			nc := rawDial(t, path)
			hostile = append(hostile, nc)
			if _, err := nc.Write(b); err != nil {
				t.Fatal(err)
			}
		}
	}
	wellBehaved(t, path, 3, 5*time.Second)
	// Every stalled connection is closed by the server.
	for i, nc := range hostile {
		nc.SetReadDeadline(time.Now().Add(20 * time.Second))
		if n, err := nc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("stalled connection %d: read %d bytes, %v; want EOF", i, n, err)
		}
	}
	took := time.Since(start)
	t.Logf("%d stalled connections dropped within %v (HandshakeTimeout %v)", len(hostile), took.Round(time.Millisecond), timeout)
	if took < timeout {
		t.Errorf("stalled connections dropped after %v, before HandshakeTimeout %v", took, timeout)
	}
	waitFor(t, func() bool { return len(srv.Conns()) == 0 })
	waitGoroutines(t, baseG)
}

// TestHostile_StalledNegotiatorsEvicted: with every slot taken by clients
// stalling in negotiation, a new client gets in once the oldest of them has
// negotiated for a quarter of HandshakeTimeout, long before they would time
// out; clients that reached an export are never evicted.
func TestHostile_StalledNegotiatorsEvicted(t *testing.T) {
	const maxConns = 64
	timeout := 16 * time.Second // eviction from 4 s
	srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(1 << 20)}), func(s *Server) {
		s.MaxConns, s.HandshakeTimeout = maxConns, timeout
		s.Logger = nil
	})
	// The oldest connection is in transmission: it must stay.
	busy := open(t, path, "disk")
	var stalled []net.Conn
	defer func() {
		for _, nc := range stalled {
			nc.Close()
		}
	}()
	filled := time.Now()
	for range maxConns - 1 {
		stalled = append(stalled, rawDial(t, path))
	}
	// Refused at once while the stalled ones are young: the server
	// closes without a greeting.
	var attempts int
	for {
		nc, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = io.ReadFull(nc, make([]byte, greetingSize))
		attempts++
		if err == nil {
			// Kept open, negotiating: the slots are full again.
			stalled = append(stalled, nc)
			break
		}
		nc.Close()
		if time.Since(filled) > timeout/2 {
			t.Fatalf("no connection accepted %v after %d stalled clients filled MaxConns %d (%d attempts)",
				time.Since(filled), maxConns-1, maxConns, attempts)
		}
		time.Sleep(50 * time.Millisecond)
	}
	waited := time.Since(filled)
	t.Logf("a new client got in %v after the slots filled, after %d attempts", waited.Round(time.Millisecond), attempts)
	if attempts < 2 || waited < timeout/4 {
		t.Errorf("a new client got in after %v (%d attempts): before the eviction grace %v", waited, attempts, timeout/4)
	}
	// Exactly the oldest stalled one was evicted.
	stalled[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := stalled[0].Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("oldest stalled connection: %v, want EOF", err)
	}
	waitFor(t, func() bool { return len(srv.Conns()) == maxConns })
	// A well-behaved client now gets in by evicting the next oldest one
	// (not the young one that just got in), and the client in
	// transmission still works.
	wellBehaved(t, path, 5, 5*time.Second)
	if errno, _ := busy.do(Request{Type: CmdRead, Cookie: 9, Length: 512}, nil); errno != 0 {
		t.Errorf("client in transmission: %v", errno)
	}
	// Two evicted, the well-behaved client gone: the rest stay.
	waitFor(t, func() bool { return len(srv.Conns()) == maxConns-1 })
	stalled[1].SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := stalled[1].Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("second oldest stalled connection: %v, want EOF", err)
	}
}

// TestHostile_FloodWithoutReadingReplies: a client pipelines far more
// requests than the in-flight limits and never reads a reply. The server
// stops reading it at the limits (memory bounded by them, not by what the
// client sends), serves another client meanwhile, and lets go of
// everything when the flooder leaves.
func TestHostile_FloodWithoutReadingReplies(t *testing.T) {
	const reqLen = 64 << 10
	for _, tc := range []struct {
		name string
		cmd  uint16
	}{
		{"reads", CmdRead},
		{"writes", CmdWrite},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := newMem(8 << 20)
			srv, path := startServer(t, oneExport(t, &Export{Backend: be}), func(s *Server) { s.Logger = nil })
			baseG := runtime.NumGoroutine()
			baseMem := memUse()
			flood := open(t, path, "disk")
			// 16,384 requests of 64 KiB: 1 GiB asked for or sent.
			const total = 16384
			sent := make(chan int, 1)
			go func() {
				var payload []byte
				if tc.cmd == CmdWrite {
					payload = make([]byte, reqLen)
				}
				for i := range total {
					b, _ := Request{Type: tc.cmd, Cookie: uint64(i), Offset: uint64(i%128) * reqLen, Length: reqLen}.AppendBinary(nil)
					if _, err := flood.nc.Write(append(b, payload...)); err != nil {
						sent <- i
						return
					}
				}
				sent <- total
			}()
			// The server fills its in-flight budget, then stops reading.
			waitFor(t, func() bool {
				n, _ := srv.total.inUse()
				return n == DefaultMaxInFlight
			})
			for {
				before := be.calls.Load()
				time.Sleep(200 * time.Millisecond)
				if be.calls.Load() == before {
					break
				}
			}
			calls := be.calls.Load()
			n, b := srv.total.inUse()
			grown := int64(memUse()) - int64(baseMem)
			t.Logf("flooded: %d backend calls, %d requests and %d KiB in flight, heap+stacks grew %d KiB",
				calls, n, b>>10, grown>>10)
			if b > DefaultMaxInFlightBytes {
				t.Errorf("%d bytes in flight, over the limit %d", b, DefaultMaxInFlightBytes)
			}
			// In flight: 128 × 64 KiB = 8 MiB, plus pooled buffers
			// and what the socket buffers hold of the client's side.
			if grown > 48<<20 {
				t.Errorf("heap+stacks grew %d MiB while flooded, want under 48 MiB", grown>>20)
			}
			if tc.cmd == CmdRead && calls > 2*DefaultMaxInFlight {
				t.Errorf("%d reads done for a client that read no reply, want at most %d", calls, 2*DefaultMaxInFlight)
			}
			if calls >= total {
				t.Errorf("all %d requests served: the flood was not held back", calls)
			}
			wellBehaved(t, path, 7, 5*time.Second)

			flood.nc.Close()
			if got := <-sent; got == total {
				t.Errorf("the flooder sent all %d requests: the server never stopped reading", got)
			}
			waitFor(t, func() bool {
				n, b := srv.total.inUse()
				return n == 0 && b == 0 && len(srv.Conns()) == 0
			})
			waitGoroutines(t, baseG)
		})
	}
}

// TestHostile_ShutdownClosesStrayClients: a graceful Shutdown with hostile
// clients attached (CVE-2024-7409: clients still negotiating at stop) closes
// those still negotiating at once, lets an idle client go, and is bounded by
// its context when a client never reads its replies; afterwards nothing of
// the server is left.
func TestHostile_ShutdownClosesStrayClients(t *testing.T) {
	for _, tc := range []struct {
		name    string
		flood   bool
		wantErr error
	}{
		{"stalled negotiations", false, nil},
		{"and a client that reads no reply", true, context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := newMem(8 << 20)
			srv := &Server{Catalog: oneExport(t, &Export{Backend: be}), HandshakeTimeout: 5 * time.Minute}
			path := filepath.Join(t.TempDir(), "nbd.sock")
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			baseG := runtime.NumGoroutine()
			served := make(chan error, 1)
			go func() { served <- srv.Serve(l) }()
			t.Cleanup(func() { srv.Close() })
			var stalled []net.Conn
			for range 100 {
				stalled = append(stalled, rawDial(t, path))
			}
			defer func() {
				for _, nc := range stalled {
					nc.Close()
				}
			}()
			idle := open(t, path, "disk")
			if tc.flood {
				flood := open(t, path, "disk")
				go func() {
					for i := range 4096 {
						b, _ := Request{Type: CmdRead, Cookie: uint64(i), Length: 64 << 10}.AppendBinary(nil)
						if _, err := flood.nc.Write(b); err != nil {
							return
						}
					}
				}()
				waitFor(t, func() bool { n, _ := srv.total.inUse(); return n == DefaultMaxInFlight })
			}
			const grace = 2 * time.Second
			ctx, cancel := context.WithTimeout(context.Background(), grace)
			defer cancel()
			start := time.Now()
			err = srv.Shutdown(ctx)
			took := time.Since(start)
			t.Logf("Shutdown returned %v after %v", err, took.Round(time.Millisecond))
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("Shutdown = %v, want %v", err, tc.wantErr)
			}
			if took > grace+3*time.Second {
				t.Errorf("Shutdown took %v with a %v context", took, grace)
			}
			if tc.wantErr == nil && took > grace/2 {
				t.Errorf("Shutdown took %v for clients that hold no request", took)
			}
			for i, nc := range stalled {
				nc.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
					t.Fatalf("stalled connection %d after Shutdown: %v, want EOF", i, err)
				}
			}
			idle.expectClosed()
			if err := <-served; !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve = %v", err)
			}
			if got := len(srv.Conns()); got != 0 {
				t.Errorf("%d connections after Shutdown", got)
			}
			waitGoroutines(t, baseG)
		})
	}
}

// TestHostile_FloodersCannotStarveOthers: clients that flood reads and
// read no reply hold the server-wide in-flight budget whole; another
// client is still served, from the share each connection has of its own.
func TestHostile_FloodersCannotStarveOthers(t *testing.T) {
	const flooders, reqLen = 4, 64 << 10
	tests := []struct {
		name         string
		replyTimeout time.Duration
		// client is served while the flooders hold the server's budget.
		client func(t *testing.T, path string)
	}{
		// Within its own share.
		{"one 4 KiB request at a time", time.Hour, func(t *testing.T, path string) {
			wellBehaved(t, path, 11, 5*time.Second)
		}},
		// Past its share: its own requests give the share back as they
		// end (the server's budget never frees).
		{"eight 64 KiB reads pipelined", time.Hour, func(t *testing.T, path string) {
			pipelinedReads(t, path, 8, 64<<10, 5*time.Second)
		}},
		// Larger than its share: the server's budget frees when the
		// flooders, which take no reply, are disconnected.
		{"a 1 MiB read", time.Second, func(t *testing.T, path string) {
			pipelinedReads(t, path, 1, 1<<20, 10*time.Second)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, path := startServer(t, oneExport(t, &Export{Backend: newMem(8 << 20)}), func(s *Server) {
				s.MaxInFlightBytes, s.MaxTotalInFlightBytes = 512<<10, 1<<20
				s.ReplyTimeout = tc.replyTimeout
				s.Logger = nil
			})
			for f := range flooders {
				c := open(t, path, "disk")
				go func() {
					for i := range 1024 {
						b, _ := Request{Type: CmdRead, Cookie: uint64(i), Offset: uint64(f) << 20, Length: reqLen}.AppendBinary(nil)
						if _, err := c.nc.Write(b); err != nil {
							return
						}
					}
				}()
			}
			// The flooders hold all of the server's budget.
			waitFor(t, func() bool { _, b := srv.total.inUse(); return b == srv.MaxTotalInFlightBytes })
			tc.client(t, path)
			if _, b := srv.total.inUse(); b > srv.MaxTotalInFlightBytes {
				t.Errorf("%d bytes charged to the server's budget, over its %d", b, srv.MaxTotalInFlightBytes)
			}
		})
	}
}

// pipelinedReads sends n reads of size bytes at once, then reads their
// replies, all within limit.
func pipelinedReads(t *testing.T, path string, n int, size uint32, limit time.Duration) {
	t.Helper()
	start := time.Now()
	c := open(t, path, "disk")
	defer c.nc.Close()
	c.nc.SetDeadline(start.Add(limit + 10*time.Second))
	for i := range n {
		c.request(Request{Type: CmdRead, Cookie: uint64(100 + i), Offset: uint64(i) * uint64(size), Length: size}, nil)
	}
	for range n {
		errno, cookie := c.reply()
		if errno != 0 {
			t.Fatalf("read %d: %v", cookie, errno)
		}
		c.read(int(size))
	}
	if d := time.Since(start); d > limit {
		t.Errorf("%d reads of %d bytes took %v, want under %v", n, size, d, limit)
	}
	t.Logf("%d reads of %d bytes served in %v", n, size, time.Since(start).Round(time.Microsecond))
}
