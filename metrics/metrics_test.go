package metrics

import (
	"bytes"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nbdmirror/nbdmirror/replicator"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var resourceLabel = regexp.MustCompile(`resource="[^"]*"`)

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update once)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

// The resources' series, from their snapshots, for a resource without a
// peer, a Primary replicating with a backlog, and a SyncTarget in a
// resync (golden files in the exposition format, as a scrape gets them).
func TestResources(t *testing.T) {
	tests := []struct {
		name  string
		snaps []replicator.Snapshot
	}{
		{"no resources", nil},
		{"standalone without a peer", []replicator.Snapshot{{
			Name: "solo", Role: replicator.RoleSecondary, Disk: replicator.UpToDate, SizeBytes: 1 << 30,
			WrittenBytes: 4096, ReadBytes: 8192, Counters: replicator.Counters{AL: 3, BM: 2},
		}}},
		{"primary with a backlog and a syncing peer", []replicator.Snapshot{
			{
				Name: "r0", Peer: "beta", Role: replicator.RolePrimary, PeerRole: replicator.RoleSecondary,
				Conn: replicator.Connected, Disk: replicator.UpToDate, PeerDisk: replicator.UpToDate, SizeBytes: 1 << 30,
				SentBytes: 1 << 20, ReceivedBytes: 512, WrittenBytes: 1 << 20, PendingBytes: 65536,
				Lag: 250 * time.Millisecond, AuthFailures: 2, Counters: replicator.Counters{LO: 1, AP: 4, AL: 7, BM: 1},
				HandlerRuns: []replicator.HandlerRuns{{Handler: "before-resync-source", Status: 0, Runs: 1},
					{Handler: "fence-peer", Status: -1, Runs: 1}, {Handler: "fence-peer", Status: 4, Runs: 2}},
			},
			{
				Name: "r1", Peer: "beta", Role: replicator.RoleSecondary, PeerRole: replicator.RolePrimary,
				Conn: replicator.SyncTarget, Disk: replicator.Inconsistent, PeerDisk: replicator.UpToDate,
				SizeBytes: 1 << 20, OutOfSyncBytes: 12288, ResyncBytes: 4096, ReceivedBytes: 5000,
				Resync: &replicator.Resync{TotalBytes: 16384, LeftBytes: 12288, SpeedRecent: 1 << 20},
			},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(&resources{version: "v1.2.3", snapshots: func() []replicator.Snapshot { return tc.snaps }})
			got := scrape(t, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
			if !strings.Contains(got, `nbdmirror_build_info{goversion="`+runtime.Version()+`",version="v1.2.3"} 1`) {
				t.Errorf("no build info:\n%s", got)
			}
			// Every state of every enum has a series per resource, one of
			// them 1; the golden file keeps only that one.
			enums := map[string]int{"nbdmirror_resource_role": len(replicator.Roles()),
				"nbdmirror_device_disk_state": len(replicator.DiskStates()),
				"nbdmirror_connection_state":  len(replicator.ConnStates()),
				"nbdmirror_peer_role":         len(replicator.Roles()), "nbdmirror_peer_disk_state": len(replicator.DiskStates())}
			series, current := map[string]int{}, map[string]int{}
			var keep []string
			for _, line := range strings.Split(got, "\n") {
				name, labels, _ := strings.Cut(line, "{")
				if n, ok := enums[name]; ok && n > 0 {
					res := resourceLabel.FindString(labels)
					series[name+" "+res]++
					if strings.HasSuffix(line, " 1") {
						current[name+" "+res]++
					} else {
						continue
					}
				}
				if name == "nbdmirror_build_info" {
					continue
				}
				keep = append(keep, line)
			}
			for k, n := range series {
				if name, _, _ := strings.Cut(k, " "); n != enums[name] || current[k] != 1 {
					t.Errorf("%s: %d series, %d of them 1; want %d and 1", k, n, current[k], enums[name])
				}
			}
			golden(t, strings.ReplaceAll(tc.name, " ", "-")+".golden", []byte(strings.Join(keep, "\n")))
		})
	}
}

// scrape returns what an HTTP scrape of h gets (text format).
func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %v, %s\n%s", err, resp.Status, b)
	}
	return string(b)
}

// The NBD observer: requests in flight go up and down, their latency lands
// in the histogram of their resource and command, errors are counted; and
// the whole registry (Go and process collectors included) serves through
// Handler.
func TestObserver(t *testing.T) {
	m := New("v0", func() []replicator.Snapshot { return nil })
	m.RequestStarted("r0", "write")
	m.RequestStarted("r0", "write")
	m.RequestStarted("r0", "read")
	if got := testutil.ToFloat64(m.inFlight.WithLabelValues("r0", "write")); got != 2 {
		t.Fatalf("writes in flight %v, want 2", got)
	}
	m.RequestDone("r0", "write", 300*time.Microsecond, false)
	m.RequestDone("r0", "write", 3*time.Millisecond, true)
	m.RequestDone("r0", "read", 40*time.Microsecond, false)
	if got := testutil.ToFloat64(m.inFlight.WithLabelValues("r0", "write")); got != 0 {
		t.Errorf("writes in flight %v after both finished, want 0", got)
	}
	if got := testutil.ToFloat64(m.failed.WithLabelValues("r0", "write")); got != 1 {
		t.Errorf("write errors %v, want 1", got)
	}
	b := scrape(t, m.Handler())
	for _, want := range []string{
		`nbdmirror_nbd_request_duration_seconds_count{op="write",resource="r0"} 2`,
		`nbdmirror_nbd_request_duration_seconds_bucket{op="write",resource="r0",le="0.0004"} 1`,
		`nbdmirror_nbd_request_duration_seconds_bucket{op="read",resource="r0",le="5e-05"} 1`,
		`nbdmirror_nbd_request_errors_total{op="write",resource="r0"} 1`,
		"go_goroutines ", "process_resident_memory_bytes ", "nbdmirror_resources 0",
	} {
		if !strings.Contains(b, want) {
			t.Errorf("the scrape lacks %q:\n%s", want, b)
		}
	}
}

// BenchmarkObserver: what the metrics add to every NBD request when
// --metrics-listen is on (in flight up and down, one histogram
// observation).
func BenchmarkObserver(b *testing.B) {
	m := New("v0", func() []replicator.Snapshot { return nil })
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.RequestStarted("r0", "write")
			m.RequestDone("r0", "write", 100*time.Microsecond, false)
		}
	})
}
