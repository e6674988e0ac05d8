package main

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
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
