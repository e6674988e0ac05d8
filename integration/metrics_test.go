//go:build integration

package integration

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDaemon_Metrics: with --metrics-listen the daemon serves Prometheus
// metrics over HTTP: the resource's role and states, the bytes a real NBD
// client wrote through the export, and that client's requests in the
// latency histogram by command; a --metrics-listen address that is taken
// stops the daemon at start with an error that names it.
func TestDaemon_Metrics(t *testing.T) {
	need(t, "qemu-io")
	n := newNode(t, 64*mib, 7)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := n.daemon(nil, "--up", "r0", "--metrics-listen", addr)
	n.must("primary", "--force", "r0")
	run(t, 2*time.Minute, "qemu-io", "-f", "raw", n.uri(), "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 4M 64k", "-c", "flush")

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v\n%s", err, d.out)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %v %s\n%s", err, resp.Status, body)
	}
	got := string(body)
	for _, want := range []string{
		`nbdmirror_resources 1`,
		`nbdmirror_resource_role{resource="r0",role="Primary"} 1`,
		`nbdmirror_device_disk_state{resource="r0",state="UpToDate"} 1`,
		`nbdmirror_connection_state{peer="beta",resource="r0",state="WFConnection"} 1`,
		`nbdmirror_peer_disk_state{peer="beta",resource="r0",state="DUnknown"} 1`,
		`nbdmirror_device_written_bytes_total{resource="r0"} 1.114112e+06`,
		`nbdmirror_nbd_request_duration_seconds_count{op="write",resource="r0"} 2`,
		`nbdmirror_nbd_requests_in_flight{op="write",resource="r0"} 0`,
		`nbdmirror_peer_replication_pending_bytes{peer="beta",resource="r0"} 0`,
		`nbdmirror_build_info{goversion="`,
		"process_resident_memory_bytes ",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("the scrape lacks %q", want)
		}
	}
	// qemu-io's flush, and the one it sends when it closes the image.
	if flushes := metricValue(got, `nbdmirror_nbd_request_duration_seconds_count{op="flush",resource="r0"}`); flushes < 1 {
		t.Errorf("flushes in the histogram: %v, want at least qemu-io's one", flushes)
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", got)
	}
	if !strings.Contains(d.out.String(), `metrics=http://`+addr+`/metrics`) {
		t.Errorf("the daemon's ready line does not name the metrics address:\n%s", d.out)
	}

	// The address is taken (by the daemon above): a second daemon, with a
	// run directory of its own, refuses to start.
	code, _, errOut := runCLI(t, time.Minute, []string{"--config", n.conf, "--node", "alpha",
		"--run-dir", filepath.Join(t.TempDir(), "run"), "daemon", "--metrics-listen", addr})
	if code == 0 || !strings.Contains(errOut, "--metrics-listen "+addr+":") || !strings.Contains(errOut, "address already in use") {
		t.Errorf("a daemon on a taken metrics address: exit %d, %q", code, errOut)
	}
}

// metricValue returns the value of series in a text-format scrape, or -1.
func metricValue(scrape, series string) float64 {
	for _, line := range strings.Split(scrape, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}
