//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/transport"
)

const transportNodeEnv = "NBDMIRROR_TRANSPORT_NODE"

// nodeConfig drives a transport node process (this test binary run again
// inside a namespace).
type nodeConfig struct {
	Local, Peer, Listen, PeerAddr, Secret string
	PingInt, PingTimeout, Timeout         string
	Flood, Probe, Echo                    bool
}

type nodeEvent struct {
	Ev  string  `json:"ev"`
	T   int64   `json:"t"` // unix milliseconds
	Err string  `json:"err,omitempty"`
	Ms  float64 `json:"ms,omitempty"`
	Bps float64 `json:"bps,omitempty"`
}

const (
	typeProbe = transport.FirstAppType
	typeBulk  = transport.FirstAppType + 1
)

// transportNode runs one side of a resource link and prints its events as
// JSON lines: up, down (with the error), rtt of control probes, and the
// data rate received.
func transportNode(raw string) int {
	var nc nodeConfig
	if err := json.Unmarshal([]byte(raw), &nc); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	dur := func(s string) time.Duration { d, _ := time.ParseDuration(s); return d }
	cfg := transport.Config{Resource: "r0", Local: []string{nc.Local}, Peer: []string{nc.Peer},
		ListenAddr: nc.Listen, PeerAddr: nc.PeerAddr, PingInterval: dur(nc.PingInt), PingTimeout: dur(nc.PingTimeout),
		Timeout: dur(nc.Timeout), ConnectInterval: time.Second, Types: []transport.Type{typeProbe, typeBulk}}
	if nc.Secret != "" {
		cfg.Secret = []byte(nc.Secret)
	}
	tr, err := transport.New(cfg)
	if err == nil {
		err = tr.Start()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var mu sync.Mutex
	emit := func(e nodeEvent) {
		e.T = time.Now().UnixMilli()
		b, _ := json.Marshal(e)
		mu.Lock()
		os.Stdout.Write(append(b, '\n'))
		mu.Unlock()
	}
	for {
		s, err := tr.Next(context.Background())
		if err != nil {
			return 0
		}
		emit(nodeEvent{Ev: "up"})
		var wg sync.WaitGroup
		if nc.Flood {
			wg.Go(func() {
				chunk := make([]byte, 64<<10)
				for s.Send(transport.Data, typeBulk, chunk) == nil {
				}
			})
		}
		if nc.Probe {
			wg.Go(func() {
				tick := time.NewTicker(100 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-s.Done():
						return
					case <-tick.C:
						s.Send(transport.Control, typeProbe, []byte(fmt.Sprint(time.Now().UnixNano())))
					}
				}
			})
		}
		wg.Go(func() { // control stream: echo probes, or time their return
			for {
				m, err := s.Recv(transport.Control)
				if err != nil {
					return
				}
				if nc.Echo {
					s.Send(transport.Control, typeProbe, m.Payload)
					continue
				}
				var sent int64
				fmt.Sscan(string(m.Payload), &sent)
				emit(nodeEvent{Ev: "rtt", Ms: float64(time.Now().UnixNano()-sent) / 1e6})
			}
		})
		wg.Go(func() { // data stream: report the rate each second
			var n int
			last := time.Now()
			for {
				m, err := s.Recv(transport.Data)
				if err != nil {
					return
				}
				n += len(m.Payload)
				if time.Since(last) >= time.Second {
					emit(nodeEvent{Ev: "rate", Bps: float64(n*8) / time.Since(last).Seconds()})
					n, last = 0, time.Now()
				}
			}
		})
		<-s.Done()
		emit(nodeEvent{Ev: "down", Err: s.Err().Error()})
		wg.Wait()
	}
}

// node starts a transport node in a namespace.
func (h *hosts) node(t *testing.T, ns string, nc nodeConfig) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(nc)
	return startEnv(t, []string{transportNodeEnv + "=" + string(b)}, "ip", "netns", "exec", ns, exe, "-test.run=^$")
}

// events parses a node's output so far.
func events(p *proc) []nodeEvent {
	var evs []nodeEvent
	for _, line := range strings.Split(p.out.String(), "\n") {
		var e nodeEvent
		if json.Unmarshal([]byte(line), &e) == nil && e.Ev != "" {
			evs = append(evs, e)
		}
	}
	return evs
}

// waitEvent waits for the n-th event of a kind (counting from 1) and
// returns it.
func waitEvent(t *testing.T, p *proc, kind string, n int, timeout time.Duration) nodeEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		seen := 0
		for _, e := range events(p) {
			if e.Ev == kind {
				if seen++; seen == n {
					return e
				}
			}
		}
		if p.exited() {
			t.Fatalf("node exited waiting for %s #%d: %v\n%s", kind, n, p.err, p.out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s #%d within %v:\n%s", kind, n, timeout, p.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func linkNodes(t *testing.T, h *hosts, a, b nodeConfig) (*proc, *proc) {
	a.Local, a.Peer, a.Listen, a.PeerAddr = "alpha", "beta", h.ipA+":7789", h.ipB+":7789"
	b.Local, b.Peer, b.Listen, b.PeerAddr = "beta", "alpha", h.ipB+":7789", h.ipA+":7789"
	pa, pb := h.node(t, h.nsA, a), h.node(t, h.nsB, b)
	waitEvent(t, pa, "up", 1, 20*time.Second)
	waitEvent(t, pb, "up", 1, 20*time.Second)
	return pa, pb
}

// TestTransport_Faults breaks the link between two namespaces in the ways
// a WAN does and checks that both sides notice in time and that the
// session comes back by itself after healing.
func TestTransport_Faults(t *testing.T) {
	const pingInt, pingTimeout = 500 * time.Millisecond, time.Second
	tests := []struct {
		name   string
		inject func(h *hosts)
		heal   func(h *hosts)
		// silent: no RST reaches anyone; detection must come from pings,
		// within ping-timeout + 1 s (ping-int is 0.5 s).
		silent bool
	}{
		{"two-way silent drop", func(h *hosts) {
			h.nft(h.nsB, fmt.Sprintf(`add chain inet chaos in { type filter hook input priority 0; policy accept; }
				add chain inet chaos out { type filter hook output priority 0; policy accept; }
				add rule inet chaos in ip saddr %s drop
				add rule inet chaos out ip daddr %s drop`, h.ipA, h.ipA))
		}, func(h *hosts) { h.heal(h.nsB) }, true},
		{"one-way drop A to B", func(h *hosts) {
			h.nft(h.nsB, fmt.Sprintf(`add chain inet chaos in { type filter hook input priority 0; policy accept; }
				add rule inet chaos in ip saddr %s drop`, h.ipA))
		}, func(h *hosts) { h.heal(h.nsB) }, true},
		{"one-way drop B to A", func(h *hosts) {
			h.nft(h.nsB, fmt.Sprintf(`add chain inet chaos out { type filter hook output priority 0; policy accept; }
				add rule inet chaos out ip daddr %s drop`, h.ipA))
		}, func(h *hosts) { h.heal(h.nsB) }, true},
		{"TCP reset", func(h *hosts) {
			h.nft(h.nsB, fmt.Sprintf(`add chain inet chaos in { type filter hook input priority 0; policy accept; }
				add rule inet chaos in ip saddr %s meta l4proto tcp reject with tcp reset`, h.ipA))
		}, func(h *hosts) { h.heal(h.nsB) }, false},
		{"ss -K kills the connection", func(h *hosts) {
			h.in(h.nsA, "ss", "-K", "dst", h.ipB)
		}, func(*hosts) {}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHosts(t)
			cfg := nodeConfig{Secret: "fault test", PingInt: pingInt.String(), PingTimeout: pingTimeout.String(), Timeout: "3s"}
			pa, pb := linkNodes(t, h, cfg, cfg)
			start := time.Now()
			tc.inject(h)
			da := waitEvent(t, pa, "down", 1, 15*time.Second)
			db := waitEvent(t, pb, "down", 1, 15*time.Second)
			detect := time.UnixMilli(max(da.T, db.T)).Sub(start)
			t.Logf("detected by both sides after %v (a: %s; b: %s)", detect, da.Err, db.Err)
			if limit := pingTimeout + time.Second; tc.silent && detect > limit {
				t.Errorf("a silent fault detected after %v, want within ping-timeout + 1 s = %v", detect, limit)
			}
			if tc.silent && (!strings.Contains(da.Err+db.Err, "ping")) {
				t.Errorf("a silent fault not detected by pings: %q / %q", da.Err, db.Err)
			}
			tc.heal(h)
			waitEvent(t, pa, "up", 2, 20*time.Second)
			waitEvent(t, pb, "up", 2, 20*time.Second)
		})
	}
}

// TestTransport_ThinLink saturates a 1 Mbit/s link (tc tbf) with data from
// A and checks that control-stream probes still come back in time and no
// ping times out.
func TestTransport_ThinLink(t *testing.T) {
	h := newHosts(t)
	h.in(h.nsA, "tc", "qdisc", "add", "dev", h.devA, "root", "tbf", "rate", "1mbit", "burst", "10kb", "latency", "100ms")
	a := nodeConfig{Secret: "thin", PingInt: "500ms", PingTimeout: "1s", Timeout: "5s", Flood: true, Probe: true}
	b := nodeConfig{Secret: "thin", PingInt: "500ms", PingTimeout: "1s", Timeout: "5s", Echo: true}
	pa, pb := linkNodes(t, h, a, b)
	time.Sleep(8 * time.Second) // the measurement window
	var worst float64
	var rtts int
	for _, e := range events(pa) {
		if e.Ev == "rtt" {
			rtts++
			worst = max(worst, e.Ms)
		}
	}
	var rates []float64
	for _, e := range events(pb) {
		if e.Ev == "rate" {
			rates = append(rates, e.Bps)
		}
	}
	t.Logf("%d probes, worst round trip %.0f ms; data rates %v bit/s", rtts, worst, rates)
	for _, p := range []*proc{pa, pb} {
		for _, e := range events(p) {
			if e.Ev == "down" {
				t.Fatalf("the session went down on a saturated link: %s", e.Err)
			}
		}
	}
	if rtts < 40 || worst > 1000 {
		t.Errorf("control probes: %d answered, worst %.0f ms; want ≥ 40 within 1 s", rtts, worst)
	}
	if len(rates) < 3 || rates[len(rates)-1] < 0.5e6 || rates[len(rates)-1] > 1.3e6 {
		t.Errorf("the data stream did not saturate the 1 Mbit/s link: %v", rates)
	}
}
