package replicator

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// adjustSrc is a resource r0 whose sections the tests vary: net, disk,
// alpha's extra statements and the peer's port.
func adjustSrc(disk, net, diskOpts, alpha string, peerPort int) string {
	return fmt.Sprintf(`resource r0 { net { %s } disk { %s } disk %s; meta-disk internal;
  on alpha { address 127.0.0.1:7000; %s } on beta { address 127.0.0.2:%d; } }`, net, diskOpts, disk, alpha, peerPort)
}

func parseRes(t *testing.T, src string) *config.Resource {
	t.Helper()
	c, err := config.Parse(fstest.MapFS{"r.conf": {Data: []byte(src)}}, "r.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	return c.Resources[0]
}

// adjustResource is r0 on alpha, attached (up, StandAlone), over a fresh
// disk, with base as its configuration.
func adjustResource(t *testing.T, disk string, base *config.Resource) (*Resource, *logBuf) {
	t.Helper()
	host, _ := base.Host("alpha")
	dev, err := OpenMetaDevice(host, true)
	if err != nil {
		t.Fatal(err)
	}
	err = metadisk.Create(dev.File, dev.Layout, "alpha", "r0", true, metadisk.Options{})
	dev.Close()
	if err != nil {
		t.Fatal(err)
	}
	log := &logBuf{}
	r, err := New(Options{Config: base, Node: "alpha", Logger: slog.New(slog.NewTextHandler(log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return r, log
}

func newDisk(t *testing.T) string {
	t.Helper()
	disk := filepath.Join(t.TempDir(), "d0")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	return disk
}

// TestAdjust_Keys: which changed keys take effect now, at the next
// connect, at down/up, or only at a daemon restart (the README's table).
func TestAdjust_Keys(t *testing.T) {
	disk := newDisk(t)
	base := adjustSrc(disk, "protocol C; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0;", "", 7000)
	tests := []struct {
		name              string
		net, diskOpts, on string
		port              int
		want              []string // "key (when)"
	}{
		{"nothing", "protocol C; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0;", "", 7000, nil},
		{"resync rate", "protocol C; shared-secret s1; timeout 60;", "resync-rate 20M; c-plan-ahead 0;", "", 7000,
			[]string{"resync-rate 10485760 -> 20971520 (applied now)"}},
		{"controller and congestion", "protocol C; shared-secret s1; timeout 60; on-congestion disconnect; congestion-fill 1M;",
			"resync-rate 10M; c-plan-ahead 20; c-max-rate 50M; c-min-rate 1M;", "", 7000,
			[]string{"on-congestion", "(applied now)", "congestion-fill", "c-plan-ahead 0s -> 2s (from the next resync)", "c-max-rate", "c-min-rate"}},
		{"secret and timeouts", "protocol C; shared-secret s2; timeout 30; ping-int 5;", "resync-rate 10M; c-plan-ahead 0;", "", 7000,
			[]string{"shared-secret (set) -> (set) (at the next connect (disconnect; connect))", "timeout 6s -> 3s", "ping-int"}},
		{"protocol", "protocol A; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0;", "", 7000,
			[]string{"protocol C -> A (needs down/up)"}},
		{"disk options", "protocol C; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0; al-extents 127; disk-flushes no;", "", 7000,
			[]string{"al-extents", "disk-flushes true -> false (needs down/up)"}},
		{"peer address", "protocol C; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0;", "", 7001,
			[]string{"peer address", "(needs down/up)"}},
		{"device", "protocol C; shared-secret s1; timeout 60;", "resync-rate 10M; c-plan-ahead 0;", "device /dev/nbd9;", 7000,
			[]string{`device "" -> /dev/nbd9 (needs a daemon restart)`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := adjustResource(t, disk, parseRes(t, base))
			rep, err := r.Adjust(parseRes(t, adjustSrc(disk, tc.net, tc.diskOpts, tc.on, tc.port)))
			if err != nil {
				t.Fatal(err)
			}
			out := strings.Join(rep.Lines("r0"), "\n")
			if tc.want == nil && out != "r0: no change" {
				t.Fatalf("report:\n%s\nwant no change", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("report:\n%s\nlacks %q", out, w)
				}
			}
			if strings.Contains(out, "s1") || strings.Contains(out, "s2") {
				t.Errorf("the report prints the secret:\n%s", out)
			}
		})
	}
}

// TestAdjust_Effect: a live key is in effect at once (the resync limits
// read it), a next-connect key reaches the next link's settings, a
// down/up key waits for the next up, and all of it at once on a resource
// that is down.
func TestAdjust_Effect(t *testing.T) {
	disk := newDisk(t)
	r, log := adjustResource(t, disk, parseRes(t, adjustSrc(disk, "protocol C; shared-secret s1;", "resync-rate 10M; c-plan-ahead 0;", "", 7000)))
	nc := parseRes(t, adjustSrc(disk, "protocol A; shared-secret s2; ping-timeout 9;", "resync-rate 30M; c-plan-ahead 0;", "", 7000))
	rep, err := r.Adjust(nc)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Changes) != 4 {
		t.Fatalf("changes: %v", rep.Lines("r0"))
	}
	if rate, _ := r.limits(); rate != 30<<20 {
		t.Fatalf("resync rate in effect %d, want %d", rate, 30<<20)
	}
	tc, err := r.transportConfig()
	if err != nil {
		t.Fatal(err)
	}
	if string(tc.Secret) != "s2" || tc.PingTimeout != 900*time.Millisecond {
		t.Fatalf("the next link's settings: secret %q, ping-timeout %v", tc.Secret, tc.PingTimeout)
	}
	if r.cfg.Net.Protocol != 'C' || r.conf().Net.Protocol != 'C' {
		t.Fatal("protocol changed while up")
	}
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	if r.cfg.Net.Protocol != 'A' || r.conf().Net.Protocol != 'A' || r.conf().Disk.ResyncRate != 30<<20 {
		t.Fatalf("after down/up: protocol %c, rate %d", r.conf().Net.Protocol, r.conf().Disk.ResyncRate)
	}
	if !strings.Contains(log.String(), "the configuration kept for down/up is in effect") {
		t.Error("the log does not say the kept configuration took effect")
	}
	// Down: everything at once.
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	rep, err = r.Adjust(parseRes(t, adjustSrc(disk, "protocol B; shared-secret s2; ping-timeout 9;", "resync-rate 30M; c-plan-ahead 0;", "", 7000)))
	if err != nil {
		t.Fatal(err)
	}
	if r.cfg.Net.Protocol != 'B' || len(rep.Changes) != 1 || rep.Changes[0].When != AdjustLive {
		t.Fatalf("adjust of a down resource: protocol %c, %v", r.cfg.Net.Protocol, rep.Lines("r0"))
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	// This node's section gone: refused, nothing changed.
	gone := parseRes(t, strings.Replace(adjustSrc(disk, "protocol B;", "", "", 7000), "on alpha", "on gamma", 1))
	if _, err := r.Adjust(gone); err == nil || !strings.Contains(err.Error(), "cannot go while the daemon runs") {
		t.Fatalf("adjust without this node's section: %v", err)
	}
}

// TestAdjust_Handlers: the handlers section changes live: the next run
// takes the new command and timeout.
func TestAdjust_Handlers(t *testing.T) {
	disk := newDisk(t)
	src := func(handlers string) string {
		return strings.Replace(adjustSrc(disk, "protocol C;", "", "", 7000), "resource r0 {", "resource r0 { handlers { "+handlers+" }", 1)
	}
	r, _ := adjustResource(t, disk, parseRes(t, src(`split-brain "true";`)))
	rep, err := r.Adjust(parseRes(t, src(`split-brain "echo new"; handler-timeout 7;`)))
	if err != nil {
		t.Fatal(err)
	}
	out := strings.Join(rep.Lines("r0"), "\n")
	if !strings.Contains(out, "r0: handlers (set) -> (set) (applied now)") || !strings.Contains(out, "handler-timeout 2m0s -> 7s (applied now)") {
		t.Fatalf("report:\n%s", out)
	}
	if env := r.handlerEnv("split-brain"); env.command != "echo new" || env.timeout != 7*time.Second {
		t.Fatalf("the next run: %q, %v", env.command, env.timeout)
	}
}

// TestAdjust_CongestionWaitsForProtocol: protocol C -> A together with
// on-congestion pull-ahead: pull-ahead is valid only with protocol A, which
// waits for down/up, so the congestion keys wait too (the running
// protocol C never goes Ahead); after down/up both are in effect.
func TestAdjust_CongestionWaitsForProtocol(t *testing.T) {
	disk := newDisk(t)
	r, _ := adjustResource(t, disk, parseRes(t, adjustSrc(disk, "protocol C;", "", "", 7000)))
	rep, err := r.Adjust(parseRes(t, adjustSrc(disk, "protocol A; on-congestion pull-ahead; congestion-fill 1M;", "", "", 7000)))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range rep.Changes {
		if c.When != AdjustDownUp {
			t.Errorf("%s: %s, want needs down/up", c.Key, c.When)
		}
	}
	if len(rep.Changes) != 3 {
		t.Fatalf("changes: %v", rep.Lines("r0"))
	}
	if n := r.conf().Net; n.OnCongestion == "pull-ahead" || n.Protocol != 'C' {
		t.Fatalf("in effect while up: protocol %c, on-congestion %s", n.Protocol, n.OnCongestion)
	}
	// Whatever the configuration in effect says, protocol C is never
	// congested into Ahead.
	eff := *r.conf()
	eff.Net.OnCongestion = "pull-ahead"
	r.live.Store(&eff)
	if congested, why := r.congested(nil, nil); congested {
		t.Fatalf("protocol C congested: %s", why)
	}
	r.live.Store(r.cfg)
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	if n := r.conf().Net; n.OnCongestion != "pull-ahead" || n.Protocol != 'A' {
		t.Fatalf("after down/up: protocol %c, on-congestion %s", n.Protocol, n.OnCongestion)
	}
}

// TestAdjust_PendingDropped: a change kept for down/up is dropped when
// the file goes back to the configuration in effect, and replaced by a
// later adjust that keeps nothing.
func TestAdjust_PendingDropped(t *testing.T) {
	for _, other := range []string{"", "resync-rate 30M;"} {
		t.Run("back to C, "+other, func(t *testing.T) {
			disk := newDisk(t)
			r, _ := adjustResource(t, disk, parseRes(t, adjustSrc(disk, "protocol C;", "", "", 7000)))
			rep, err := r.Adjust(parseRes(t, adjustSrc(disk, "protocol A;", "", "", 7000)))
			if err != nil || len(rep.Changes) != 1 || rep.Changes[0].When != AdjustDownUp {
				t.Fatalf("C -> A: %v, %v", rep.Lines("r0"), err)
			}
			if _, err := r.Adjust(parseRes(t, adjustSrc(disk, "protocol C;", other, "", 7000))); err != nil {
				t.Fatal(err)
			}
			if err := r.Down(); err != nil {
				t.Fatal(err)
			}
			if err := r.Attach(); err != nil {
				t.Fatal(err)
			}
			if p := r.conf().Net.Protocol; p != 'C' {
				t.Fatalf("after down/up protocol %c, want C (the file's)", p)
			}
			if other != "" && r.conf().Disk.ResyncRate != 30<<20 {
				t.Fatalf("resync-rate %d after down/up, want the adjusted 30M", r.conf().Disk.ResyncRate)
			}
		})
	}
}
