package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// lockedBuffer is a bytes.Buffer safe for a writer and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testDaemon runs `nbdmirror daemon` in-process over offlineSetup's
// resources (metadata created) until the test ends.
type testDaemon struct {
	t      *testing.T
	conf   string
	runDir string
	log    *lockedBuffer
	cancel context.CancelFunc
	done   chan int
}

func startDaemon(t *testing.T, extra ...string) *testDaemon {
	t.Helper()
	_, conf := offlineSetup(t)
	if code, out, errOut := runMain(t, "--config", conf, "--node", "alpha", "create-md", "all"); code != 0 {
		t.Fatalf("create-md: %d %s%s", code, out, errOut)
	}
	d := &testDaemon{t: t, conf: conf, runDir: t.TempDir(), log: &lockedBuffer{}, done: make(chan int, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	// Ready orders the daemon's start (its command-line parsing included:
	// urfave/cli shares its help flag between apps) before the test's own
	// commands.
	ready := make(chan struct{})
	m := &Main{Stdout: d.log, Stderr: d.log, Getenv: func(string) string { return "" }, Ready: func() { close(ready) }}
	args := append([]string{"nbdmirror", "--config", conf, "--node", "alpha", "--run-dir", d.runDir, "daemon"}, extra...)
	go func() { d.done <- m.Run(ctx, args) }()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log)
		}
	})
	select {
	case <-ready:
	case code := <-d.done:
		t.Fatalf("the daemon exited with %d:\n%s", code, d.log)
	case <-time.After(10 * time.Second):
		t.Fatalf("the daemon not ready after 10 s:\n%s", d.log)
	}
	return d
}

// stop cancels the daemon (as a signal would) and returns its exit code.
func (d *testDaemon) stop() int {
	if d.cancel == nil {
		return 0
	}
	d.cancel()
	d.cancel = nil
	select {
	case code := <-d.done:
		return code
	case <-time.After(30 * time.Second):
		d.t.Fatal("the daemon did not stop within 30 s")
		return -1
	}
}

// cli runs one admin command against the daemon.
func (d *testDaemon) cli(args ...string) (int, string, string) {
	d.t.Helper()
	return runMain(d.t, append([]string{"--config", d.conf, "--node", "alpha", "--run-dir", d.runDir}, args...)...)
}

// must runs a command that must succeed and returns its output.
func (d *testDaemon) must(args ...string) string {
	d.t.Helper()
	code, out, errOut := d.cli(args...)
	if code != 0 {
		d.t.Fatalf("%v: exit %d: %s", args, code, errOut)
	}
	return out
}

// nbdGo opens an NBD connection to export name with NBD_OPT_GO. It
// returns the connection in the transmission phase, or the server's
// refusal text.
func nbdGo(t *testing.T, sock, name string) (net.Conn, error) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var greet [18]byte
	if _, err := io.ReadFull(c, greet[:]); err != nil {
		t.Fatal(err)
	}
	opt := binary.BigEndian.AppendUint32(nil, 3) // FIXED_NEWSTYLE | NO_ZEROES
	opt = binary.BigEndian.AppendUint64(opt, 0x49484156454f5054)
	data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint16(data, 0)
	opt = binary.BigEndian.AppendUint32(opt, 7) // NBD_OPT_GO
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(data)))
	if _, err := c.Write(append(opt, data...)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			t.Fatal(err)
		}
		typ, n := binary.BigEndian.Uint32(hdr[12:]), binary.BigEndian.Uint32(hdr[16:])
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			t.Fatal(err)
		}
		switch {
		case typ == 1: // ACK
			c.SetDeadline(time.Time{})
			return c, nil
		case typ&0x80000000 != 0:
			c.Close()
			return nil, errors.New(string(body))
		}
	}
}

// TestDaemon_AdminVerbs: each verb and each refusal, with its message and
// exit code, through the real control socket.
func TestDaemon_AdminVerbs(t *testing.T) {
	d := startDaemon(t)
	sock := filepath.Join(d.runDir, "nbd.sock")
	if fi, err := os.Stat(filepath.Join(d.runDir, "control.sock")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v %v", fi, err)
	}
	states := func(res string) string {
		return strings.TrimSpace(d.must("role", res)) + " " + strings.TrimSpace(d.must("cstate", res)) + " " +
			strings.TrimSpace(d.must("dstate", res))
	}
	if got := states("r0"); got != "Secondary/Unknown StandAlone Diskless/DUnknown" {
		t.Fatalf("down: %s", got)
	}
	refusals := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"promote a diskless resource", []string{"primary", "r0"}, ExitNoUpToDateData,
			"r0: State change failed: (-2) Need access to UpToDate data (local disk Diskless, no peer)\n"},
		{"no such resource", []string{"primary", "r9"}, ExitConfigInvalid, "r9: no such resource in " + d.conf + "\n"},
		{"no resource named", []string{"primary"}, ExitUsage,
			"nbdmirror primary: expected one resource name or all (see 'nbdmirror primary --help')\n"},
		{"invalidate without a disk", []string{"invalidate", "r1"}, ExitRefused,
			"r1: State change failed: (-11) Device is diskless, the requested operation requires a disk\n"},
		{"detach without a disk", []string{"detach", "r1"}, ExitRefused,
			"r1: State change failed: (-11) Device is diskless, the requested operation requires a disk\n"},
		{"new-current-uuid without a disk", []string{"new-current-uuid", "r1"}, ExitRefused,
			"r1: Failure: (138) Device does not have a disk-config (attach it first)\n"},
		{"wait-connect on StandAlone, no timeout", []string{"wait-connect", "r0"}, ExitRefused,
			"r0: StandAlone: it is not trying to connect, so there is nothing to wait for\n"},
		{"disconnect a StandAlone resource", []string{"disconnect", "r0"}, ExitRefused,
			"r0: State change failed: (-9) Can not disconnect a StandAlone device\n"},
		{"connect without a disk", []string{"connect", "r0"}, ExitRefused,
			"r0: State change failed: (-11) Device is diskless, the requested operation requires a disk (attach it first: diskless nodes are not supported)\n"},
	}
	check := func(tc struct {
		name string
		args []string
		code int
		msg  string
	}) {
		t.Helper()
		code, out, errOut := d.cli(tc.args...)
		if code != tc.code || errOut != tc.msg || out != "" {
			t.Errorf("%s: %v: exit %d, stderr %q; want %d, %q", tc.name, tc.args, code, errOut, tc.code, tc.msg)
		}
	}
	for _, tc := range refusals {
		check(tc)
	}
	d.must("up", "all")
	if got := states("r0"); got != "Secondary/Unknown WFConnection Inconsistent/DUnknown" {
		t.Fatalf("up: %s", got)
	}
	if _, err := nbdGo(t, sock, "r0"); err == nil || err.Error() != "resource r0 is Secondary on node alpha: promote it with 'nbdmirror primary r0'" {
		t.Fatalf("NBD client of a Secondary: %v", err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"up twice", []string{"up", "r0"}, ExitRefused, "r0: Failure: (124) Device is attached to a disk (use detach first)\n"},
		{"attach twice", []string{"attach", "r0"}, ExitRefused, "r0: Failure: (124) Device is attached to a disk (use detach first)\n"},
		{"promote an Inconsistent disk", []string{"primary", "r0"}, ExitNoUpToDateData,
			"r0: State change failed: (-2) Need access to UpToDate data (local disk Inconsistent, no peer; 'primary --force' makes this node's data the valid copy)\n"},
	} {
		check(tc)
	}
	d.must("primary", "--force", "r0")
	if got := states("r0"); got != "Primary/Unknown WFConnection UpToDate/DUnknown" {
		t.Fatalf("after primary --force: %s", got)
	}
	conn, err := nbdGo(t, sock, "r0")
	if err != nil {
		t.Fatalf("NBD client of the Primary: %v", err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"demote while a client is connected", []string{"secondary", "r0"}, ExitRefused,
			"r0: State change failed: (-12) Device is held open by someone (1 NBD client: Unix socket)\n"},
		{"down while a client is connected", []string{"down", "r0"}, ExitRefused,
			"r0: State change failed: (-12) Device is held open by someone (1 NBD client: Unix socket)\n"},
		{"detach a Primary", []string{"detach", "r0"}, ExitNoUpToDateData,
			"r0: State change failed: (-2) Need access to UpToDate data (a Primary without a peer cannot give up its disk: demote it first)\n"},
		{"invalidate a Primary", []string{"invalidate", "r0"}, ExitRefused,
			"r0: State change failed: (-15) Need a connection to start verify or resync (a Primary's data cannot be replaced under its clients here: demote it first)\n"},
		{"connect while connecting", []string{"connect", "r0"}, ExitRefused,
			"r0: Failure: (125) Device has a net-config (use disconnect first)\n"},
		{"verify without verify-alg", []string{"verify", "r0"}, ExitRefused,
			"r0: State change failed: (-14) Need a verify algorithm to start online verify (set verify-alg in the net section on both nodes)\n"},
		{"resume-sync when not paused", []string{"resume-sync", "r0"}, ExitRefused,
			"r0: Failure: (135) Sync-pause flag is already cleared\n"},
		{"invalidate-remote without a peer", []string{"invalidate-remote", "--reset-bitmap=maybe", "r0"}, ExitUsage,
			"nbdmirror invalidate-remote: --reset-bitmap=maybe: want yes or no\n"},
		{"verify with --stop before --start", []string{"verify", "--start", "16", "--stop", "9", "r0"}, ExitUsage,
			"nbdmirror verify: --stop 9 is not past --start 16: nothing to verify\n"},
	} {
		check(tc)
	}
	d.must("disconnect", "r0")
	check(struct {
		name string
		args []string
		code int
		msg  string
	}{"discard-my-data on a Primary", []string{"connect", "--discard-my-data", "r0"}, ExitRefused,
		"r0: Failure: (123) --discard-my-data not allowed when primary. (demote it with 'secondary' first)\n"})
	d.must("connect", "r0")
	conn.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _, errOut := d.cli("secondary", "r0")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("secondary after the client left: %s", errOut)
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.must("new-current-uuid", "--clear-bitmap", "r0")
	d.must("invalidate", "r0")
	if got := states("r0"); got != "Secondary/Unknown WFConnection Inconsistent/DUnknown" {
		t.Fatalf("after invalidate: %s", got)
	}
	// wait-*: nothing connects without replication; no resync runs.
	if code, _, errOut := d.cli("wait-connect", "--timeout", "200ms", "r0"); code != ExitTimeout ||
		errOut != "r0: still WFConnection after 200ms\n" {
		t.Errorf("wait-connect: %d %q", code, errOut)
	}
	if code, _, errOut := d.cli("wait-sync", "--timeout", "200ms", "r0"); code != ExitTimeout ||
		errOut != "r0: still WFConnection after 200ms\n" {
		t.Errorf("wait-sync: %d %q", code, errOut)
	}
	// A verb for all resources reports each failure; the exit code is the first's.
	code, _, errOut := d.cli("primary", "all")
	if code != ExitNoUpToDateData || strings.Count(errOut, "Need access to UpToDate data") != 3 {
		t.Errorf("primary all: %d %q", code, errOut)
	}
	// Metadata that cannot be used: the failure names the remedy.
	d.must("down", "r1")
	if err := os.WriteFile(filepath.Join(filepath.Dir(d.conf), "m1"), make([]byte, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := d.cli("up", "r1"); code != ExitFailed ||
		errOut != "r1: no nbdmirror metadata found: create it with 'nbdmirror create-md r1'\n" {
		t.Errorf("up without metadata: %d %q", code, errOut)
	}
	// The API refuses what the CLI never sends.
	for _, tc := range []struct{ method, path, body, want string }{
		{"POST", "/v1/resources/r0/frobnicate", "", `{"error":"no verb \"frobnicate\"","code":1}`},
		{"POST", "/v1/resources/r0/primary", `{"forse":true}`, `{"error":"request body: json: unknown field \"forse\"","code":1}`},
		{"POST", "/v1/resources/r0/primary", `{} {}`, `{"error":"request body: more than one JSON object","code":1}`},
		{"GET", "/v1/status?format=xml", "", `{"error":"format \"xml\": want json, text or proc","code":1}`},
		{"GET", "/v1/wait?res=r0&for=connect&timeout=soon", "", `{"error":"timeout \"soon\": want a duration such as 30s","code":1}`},
	} {
		if got := rawAPI(t, d.runDir, tc.method, tc.path, tc.body); got != tc.want {
			t.Errorf("%s %s %s: %s, want %s", tc.method, tc.path, tc.body, got, tc.want)
		}
	}
	if code := d.stop(); code != 0 {
		t.Fatalf("daemon exit %d", code)
	}
	// Stopped cleanly: the metadata says so, and the daemon is gone.
	if code, out, _ := runMain(t, "--config", d.conf, "--node", "alpha", "dump-md", "r0"); code != 0 || !strings.Contains(out, "clean") ||
		strings.Contains(out, "unclean") {
		t.Errorf("dump-md after the daemon stopped: %d\n%s", code, out)
	}
	if code, _, errOut := d.cli("role", "r0"); code != ExitNoDaemon ||
		!strings.HasPrefix(errOut, "nbdmirror: cannot reach the daemon at "+filepath.Join(d.runDir, "control.sock")) {
		t.Errorf("role without a daemon: %d %q", code, errOut)
	}
}

// TestDaemon_StatusAndEvents: the status file, status in both layouts,
// and the event stream.
func TestDaemon_StatusAndEvents(t *testing.T) {
	d := startDaemon(t, "--up", "r0")
	statusFile := filepath.Join(d.runDir, "status")
	waitFile := func(want string) string {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, _ := os.ReadFile(statusFile)
			if strings.Contains(string(b), want) {
				return string(b)
			}
			if time.Now().After(deadline) {
				t.Fatalf("the status file never said %q:\n%s", want, b)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	got := waitFile(" 0: cs:WFConnection ro:Secondary/Unknown ds:Inconsistent/DUnknown C r-----\n")
	if !strings.HasPrefix(got, "version: nbdmirror ") || !strings.Contains(got, " 1: cs:Unconfigured\n") {
		t.Errorf("status file:\n%s", got)
	}

	// events --now: the current state, then each change.
	ctx, cancel := context.WithCancel(context.Background())
	var evOut lockedBuffer
	evDone := make(chan int, 1)
	go func() {
		m := &Main{Stdout: &evOut, Stderr: &evOut, Getenv: func(string) string { return "" }}
		evDone <- m.Run(ctx, []string{"nbdmirror", "--run-dir", d.runDir, "events", "--now", "r0"})
	}()
	waitLines := func(n int) []map[string]any {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			lines := strings.Split(strings.TrimSpace(evOut.String()), "\n")
			if len(lines) >= n && lines[0] != "" {
				var out []map[string]any
				for _, l := range lines {
					var m map[string]any
					if err := json.Unmarshal([]byte(l), &m); err != nil {
						t.Fatalf("event line %q: %v", l, err)
					}
					out = append(out, m)
				}
				return out
			}
			if time.Now().After(deadline) {
				t.Fatalf("wanted %d event lines:\n%s", n, evOut.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	ev := waitLines(1)
	if ev[0]["event"] != "exists" || ev[0]["name"] != "r0" || ev[0]["disk"] != "Inconsistent" {
		t.Fatalf("first event: %v", ev[0])
	}
	d.must("primary", "--force", "r0")
	ev = waitLines(2)
	if last := ev[len(ev)-1]; last["event"] != "change" || last["role"] != "Primary" || last["disk"] != "UpToDate" {
		t.Fatalf("events after primary --force: %v", ev)
	}
	cancel()
	<-evDone

	waitFile(" 0: cs:WFConnection ro:Primary/Unknown ds:UpToDate/DUnknown C r-----\n")
	if out := d.must("status", "r0"); out != "r0 role:Primary\n  disk:UpToDate\n  beta connection:Connecting\n\n" {
		t.Errorf("status:\n%q", out)
	}
	var st []map[string]any
	if err := json.Unmarshal([]byte(d.must("status", "--json")), &st); err != nil || len(st) != 3 {
		t.Fatalf("status --json: %v %v", err, st)
	}
	for _, key := range []string{"version", "name", "role", "peer_role", "cstate", "disk", "peer_disk", "protocol",
		"out_of_sync_bytes", "counters", "uuids", "resync"} {
		if _, ok := st[0][key]; !ok {
			t.Errorf("status --json lacks %q: %v", key, st[0])
		}
	}
	if fmt.Sprint(st[0]["role"]) != "Primary" {
		t.Errorf("status --json role: %v", st[0]["role"])
	}
}

// rawAPI sends one request to the control socket and returns the body.
func rawAPI(t *testing.T, runDir, method, path, body string) string {
	t.Helper()
	c, err := net.Dial("unix", filepath.Join(runDir, "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", method, path, len(body), body)
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	_, b, _ := strings.Cut(string(resp), "\r\n\r\n")
	return strings.TrimSpace(b)
}

// verbError: a verify range off the device is a usage error (1), a state
// refusal 20 (17 for missing UpToDate data), anything else 3.
func TestVerbError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code int
	}{
		{fmt.Errorf("r0: %w: --start 9999 is at or past the end", replicator.ErrVerifyRange), ExitUsage},
		{&replicator.StateError{Resource: "r0", Code: -15, Text: "Need a connection"}, ExitRefused},
		{errors.New("r0: something else"), ExitFailed},
	} {
		msg, code := verbError("r0", tc.err)
		if code != tc.code || msg != tc.err.Error() {
			t.Errorf("verbError(%v) = %q, %d; want the message, %d", tc.err, msg, code, tc.code)
		}
	}
}

// TestDaemon_NBDLimits: --nbd-max-conns and --nbd-handshake-timeout reach
// the daemon's NBD server.
func TestDaemon_NBDLimits(t *testing.T) {
	greeting := func(t *testing.T, sock string) (net.Conn, error) {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		_, err = io.ReadFull(c, make([]byte, 18))
		return c, err
	}
	t.Run("max conns", func(t *testing.T) {
		d := startDaemon(t, "--nbd-max-conns", "1", "--nbd-handshake-timeout", "1m")
		sock := filepath.Join(d.runDir, "nbd.sock")
		if _, err := greeting(t, sock); err != nil {
			t.Fatalf("first connection: %v", err)
		}
		if _, err := greeting(t, sock); !errors.Is(err, io.EOF) {
			t.Fatalf("second connection with --nbd-max-conns 1: %v, want closed without a greeting", err)
		}
	})
	t.Run("handshake timeout", func(t *testing.T) {
		d := startDaemon(t, "--nbd-handshake-timeout", "300ms")
		start := time.Now()
		c, err := greeting(t, filepath.Join(d.runDir, "nbd.sock"))
		if err != nil {
			t.Fatal(err)
		}
		if n, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("stalled client: read %d, %v; want EOF", n, err)
		}
		if took := time.Since(start); took < 300*time.Millisecond || took > 5*time.Second {
			t.Errorf("stalled client dropped after %v, want 300ms (and well under the default 10s)", took)
		}
	})
}
