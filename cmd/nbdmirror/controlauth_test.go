package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets a test run the CLI in a child process with other
// credentials: with NBDMIRROR_TEST_RUN_MAIN=1 the test binary is nbdmirror.
func TestMain(m *testing.M) {
	if os.Getenv("NBDMIRROR_TEST_RUN_MAIN") == "1" {
		mm := &Main{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}
		os.Exit(mm.Run(context.Background(), append([]string{"nbdmirror"}, os.Args[1:]...)))
	}
	os.Exit(m.Run())
}

// testCLI copies this test binary where any user may run it: the go
// tool's build directory is root's alone.
func testCLI(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	openPath(t, dir)
	bin := filepath.Join(dir, "nbdmirror.test")
	if err := copyExecutable(self, bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

// cliAs runs the CLI (bin, from testCLI) as uid:gid with the supplementary
// groups given, and returns its exit code and output.
func cliAs(t *testing.T, bin string, uid, gid uint32, groups []uint32, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"NBDMIRROR_TEST_RUN_MAIN=1", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String(), errOut.String()
	case err != nil:
		t.Fatalf("run the CLI as %d:%d: %v", uid, gid, err)
	}
	return 0, out.String(), errOut.String()
}

func copyExecutable(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

// openPath makes dir and its parent searchable by every user (t.TempDir
// makes them 0700), so the socket's own mode is what decides.
func openPath(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDaemon_ControlSocketAccess: the control socket serves root (and,
// with --control-group, the group's members) only. The kernel refuses
// others at connect by the socket's mode; the daemon refuses them again by
// their peer credentials when the mode has been widened.
func TestDaemon_ControlSocketAccess(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("NBDMIRROR_REQUIRE_E2E") == "1" {
			t.Fatal("needs root (NBDMIRROR_REQUIRE_E2E=1 forbids skipping)")
		}
		t.Skip("skipped: needs root to run a client as another user")
	}
	const nobody, other = 65534, 65533 // nogroup is 65534 too
	bin := testCLI(t)
	_, conf := offlineSetup(t)
	if code, _, errOut := runMain(t, "--config", conf, "--node", "alpha", "--run-dir", t.TempDir(), "daemon",
		"--control-group", "no-such-group-here"); code != ExitUsage ||
		errOut != "nbdmirror daemon: --control-group no-such-group-here: no group \"no-such-group-here\"\n" {
		t.Errorf("--control-group of no group: exit %d, %q", code, errOut)
	}
	type step struct {
		name       string
		uid, gid   uint32
		groups     []uint32
		widen      bool // chmod the socket 0666 first
		code       int
		out, error string // stdout, stderr (%s: the socket's path)
		logged     string // in the daemon's log
	}
	for _, tc := range []struct {
		name  string
		flags []string
		mode  os.FileMode
		gid   uint32
		steps []step
	}{
		{"root only", nil, 0o600, 0, []step{
			{name: "root", code: 0, out: "Secondary/Unknown\n"},
			{name: "nobody refused by the mode", uid: nobody, gid: nobody, code: ExitFailed,
				error: "nbdmirror: permission denied on the control socket %s: only root (or the members of the daemon's --control-group) may use it\n"},
			{name: "nobody refused by the daemon", uid: nobody, gid: nobody, widen: true, code: ExitFailed,
				error:  "permission denied: uid 65534 may not use the control socket (only root may)\n",
				logged: `msg="control request refused" uid=65534 gid=65534`},
		}},
		{"with a group", []string{"--control-group", "nogroup"}, 0o660, nobody, []step{
			{name: "member by its group", uid: other, gid: nobody, code: 0, out: "Secondary/Unknown\n"},
			{name: "member by a supplementary group", uid: other, gid: other, groups: []uint32{nobody}, code: 0,
				out: "Secondary/Unknown\n"},
			{name: "others refused by the mode", uid: other, gid: other, code: ExitFailed,
				error: "nbdmirror: permission denied on the control socket %s: only root (or the members of the daemon's --control-group) may use it\n"},
			{name: "others refused by the daemon", uid: other, gid: other, widen: true, code: ExitFailed,
				error:  "permission denied: uid 65533 may not use the control socket (only root and members of group nogroup may)\n",
				logged: `msg="control request refused" uid=65533 gid=65533`},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, tc.flags...)
			openPath(t, d.runDir)
			sock := filepath.Join(d.runDir, "control.sock")
			fi, err := os.Stat(sock)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if fi.Mode().Perm() != tc.mode || st.Uid != 0 || st.Gid != tc.gid {
				t.Errorf("control socket mode %v owner %d:%d, want %v 0:%d", fi.Mode().Perm(), st.Uid, st.Gid, tc.mode, tc.gid)
			}
			for _, s := range tc.steps {
				if err := os.Chmod(sock, map[bool]os.FileMode{false: tc.mode, true: 0o666}[s.widen]); err != nil {
					t.Fatal(err)
				}
				code, out, errOut := cliAs(t, bin, s.uid, s.gid, s.groups, "--run-dir", d.runDir, "role", "r0")
				want := s.error
				if strings.Contains(want, "%s") {
					want = strings.ReplaceAll(want, "%s", sock)
				}
				if code != s.code || out != s.out || errOut != want {
					t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d, %q, %q", s.name, code, out, errOut, s.code, s.out, want)
				}
				if s.logged != "" && !strings.Contains(d.log.String(), s.logged) {
					t.Errorf("%s: the daemon did not log %q", s.name, s.logged)
				}
			}
			// Still serving root after the refusals.
			if out := d.must("role", "r0"); out != "Secondary/Unknown\n" {
				t.Errorf("root after the refusals: %q", out)
			}
		})
	}
}

// rawControl sends raw bytes to the control socket, half-closes unless
// stall, and returns the answer's status code and body.
func rawControl(t *testing.T, sock, raw string, stall bool) (int, string) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.Close()
	// Written beside the reading: the daemon may answer (and close)
	// before an oversized request is all sent.
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		if _, err := io.WriteString(c, raw); err == nil && !stall {
			c.(*net.UnixConn).CloseWrite()
		}
	}()
	defer func() { <-wrote }()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("answer to %.60q: %v", raw, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("answer body to %.60q: %v", raw, err)
	}
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// post is a verb request with the body given and a Content-Length of
// declared (len(body) if negative).
func post(path, body string, declared int) string {
	if declared < 0 {
		declared = len(body)
	}
	return fmt.Sprintf("POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", path, declared, body)
}

// TestDaemon_ControlHostileRequests: malformed, oversized, truncated and
// stalled requests, unknown verbs and paths, and arguments of the wrong
// type each get an error answer, never a crash or a hang, and the daemon
// keeps serving.
func TestDaemon_ControlHostileRequests(t *testing.T) {
	old := controlBodyTimeout
	controlBodyTimeout = 500 * time.Millisecond
	t.Cleanup(func() { controlBodyTimeout = old })
	d := startDaemon(t)
	sock := filepath.Join(d.runDir, "control.sock")
	const primary = "/v1/resources/r0/primary"
	for _, tc := range []struct {
		name   string
		raw    string
		status int
		want   string // the body; "" for net/http's own answers
		stall  bool   // keep the connection open after sending
	}{
		{name: "stalled mid-body", raw: post(primary, `{"force":`, 100), stall: true, status: 408,
			want: `{"error":"request body: not complete within 500ms","code":1}`},
		{"malformed JSON", post(primary, `{"force":`, -1), 400, `{"error":"request body: truncated","code":1}`, false},
		{"not JSON", post(primary, `force=1`, -1), 400,
			`{"error":"request body: invalid character 'o' in literal false (expecting 'a')","code":1}`, false},
		{"wrong type", post(primary, `{"force":"yes"}`, -1), 400,
			`{"error":"request body: json: cannot unmarshal string into Go struct field verbRequest.force of type bool","code":1}`, false},
		{"negative sector", post("/v1/resources/r0/verify", `{"verify_start":-8}`, -1), 400,
			`{"error":"request body: json: cannot unmarshal number -8 into Go struct field verbRequest.verify_start of type uint64","code":1}`, false},
		{"size overflowing int64", post("/v1/resources/r0/resize", `{"size":1e30}`, -1), 400,
			`{"error":"request body: json: cannot unmarshal number 1e30 into Go struct field verbRequest.size of type int64","code":1}`, false},
		{"array instead of object", post(primary, `[true]`, -1), 400,
			`{"error":"request body: json: cannot unmarshal array into Go value of type main.verbRequest","code":1}`, false},
		{"oversized", post(primary, `{"force":false,"x":"`+strings.Repeat("a", 1<<20)+`"}`, -1), 413,
			`{"error":"request body: larger than 65536 bytes","code":1}`, false},
		{"truncated", post(primary, `{"force":`, 100), 400, `{"error":"request body: truncated","code":1}`, false},
		{"unknown verb", post("/v1/resources/r0/format-disk", `{}`, -1), 404, `{"error":"no verb \"format-disk\"","code":1}`, false},
		{"unknown resource", post("/v1/resources/..%2f..%2fetc/primary", `{}`, -1), 404,
			`{"error":"../../etc: no such resource in ` + d.conf + `","code":10}`, false},
		{"unknown path", "GET /v2/status HTTP/1.1\r\nHost: x\r\n\r\n", 404, `{"error":"no such request: GET /v2/status","code":1}`, false},
		{"wrong method", "GET " + primary + " HTTP/1.1\r\nHost: x\r\n\r\n", 404,
			`{"error":"no such request: GET /v1/resources/r0/primary","code":1}`, false},
		{"not HTTP", "\x00\x01\x02 garbage\r\n\r\n", 400, "", false},
		{"oversized header", "GET /v1/status HTTP/1.1\r\nHost: x\r\nX: " + strings.Repeat("h", 2<<20) + "\r\n\r\n", 431, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, body := rawControl(t, sock, tc.raw, tc.stall)
			if status != tc.status || (tc.want != "" && body != tc.want) {
				t.Errorf("answer %d %s, want %d %s", status, body, tc.status, tc.want)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("answered after %v", took)
			}
			// The daemon still serves, and nothing was done.
			if out := d.must("role", "r0"); out != "Secondary/Unknown\n" {
				t.Errorf("role after the request: %q", out)
			}
		})
	}
	// A stalled request does not hold the others up: one is pending while
	// the next is served.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, post(primary, `{`, 1000))
	if out := d.must("dstate", "r0"); out != "Diskless/DUnknown\n" {
		t.Errorf("dstate beside a stalled request: %q", out)
	}
	// A body no handler reads is not waited for: a GET that declares one
	// it never sends is answered and its connection closed.
	g, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	io.WriteString(g, "GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
	g.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(g)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("a GET with a body never sent: %v", err)
	}
	io.ReadAll(resp.Body)
	resp.Body.Close()
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("after answering a GET with a body never sent, the connection: %v, want closed (EOF)", err)
	}
	// Beside both stalled connections the daemon stops at once, not at
	// the end of its grace period.
	start := time.Now()
	if code := d.stop(); code != 0 {
		t.Errorf("daemon exit %d after the hostile requests", code)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the daemon took %v to stop beside stalled control requests", took)
	}
}
