package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runMain(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	m := &Main{Stdout: &out, Stderr: &errOut, Getenv: func(string) string { return "" }}
	code := m.Run(context.Background(), append([]string{"nbdmirror"}, args...))
	return code, out.String(), errOut.String()
}

func TestMain_UsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"serve"}, ExitUsage, "nbdmirror serve: --file is required (see 'nbdmirror serve --help')\n"},
		{[]string{"serve", "--nope"}, ExitUsage, "nbdmirror serve: flag provided but not defined: -nope (see 'nbdmirror serve --help')\n"},
		{[]string{"--nope"}, ExitUsage, "nbdmirror: flag provided but not defined: -nope (see 'nbdmirror --help')\n"},
		{[]string{"--log-format", "xml", "serve", "--file", "/dev/null"}, ExitUsage, "nbdmirror: --log-format \"xml\": want text or json\n"},
		{[]string{"serve", "--file", "/dev/null"}, ExitFailed, "nbdmirror serve: disk /dev/null is neither a regular file nor a block device\n"},
		{[]string{"serve", "--file", "/dev/null", "--nbd-max-conns", "0"}, ExitUsage, "nbdmirror serve: --nbd-max-conns 0: want at least 1\n"},
		{[]string{"serve", "--file", "/dev/null", "--nbd-max-in-flight", "100"}, ExitUsage,
			"nbdmirror serve: --nbd-max-in-flight \"100\" has no unit: give one of K, M, G, T or s (sectors), e.g. 10G\n"},
		{[]string{"serve", "--file", "/dev/null", "--nbd-handshake-timeout", "0s"}, ExitUsage,
			"nbdmirror serve: --nbd-handshake-timeout 0s: want a positive duration such as 10s\n"},
	}
	for _, tc := range tests {
		code, _, stderr := runMain(t, tc.args...)
		if code != tc.code || stderr != tc.msg {
			t.Errorf("%v: exit %d, stderr %q; want %d, %q", tc.args, code, stderr, tc.code, tc.msg)
		}
	}
}

func TestMain_HelpAndVersion(t *testing.T) {
	code, out, _ := runMain(t, "--version")
	if code != 0 || !strings.HasPrefix(out, "nbdmirror version ") {
		t.Errorf("--version: %d %q", code, out)
	}
	code, out, _ = runMain(t, "help")
	if code != 0 || !strings.Contains(out, "serve") {
		t.Errorf("help: %d %q", code, out)
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	t.Run("tcp", func(t *testing.T) {
		l, err := listen("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
	})
	t.Run("bad address", func(t *testing.T) {
		for _, a := range []string{"nonsense", "unix:", "tcp://x"} {
			if _, err := listen(a); err == nil {
				t.Errorf("listen(%q) succeeded", a)
			}
		}
	})
	t.Run("not a socket", func(t *testing.T) {
		p := filepath.Join(dir, "file")
		os.WriteFile(p, []byte("keep me"), 0o600)
		if _, err := listen("unix:" + p); err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Errorf("listen on a regular file: %v", err)
		}
		if b, _ := os.ReadFile(p); string(b) != "keep me" {
			t.Error("the file was clobbered")
		}
	})
	t.Run("live socket refused, stale socket replaced", func(t *testing.T) {
		p := filepath.Join(dir, "s.sock")
		live, err := listen("unix:" + p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := listen("unix:" + p); err == nil || !strings.Contains(err.Error(), "another server") {
			t.Errorf("second listener on a live socket: %v", err)
		}
		// Leave a stale socket file behind, as a killed process does.
		live.(*net.UnixListener).SetUnlinkOnClose(false)
		live.Close()
		l, err := listen("unix:" + p)
		if err != nil {
			t.Fatalf("stale socket not replaced: %v", err)
		}
		l.Close()
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("socket not removed on close: %v", err)
		}
	})
}
