//go:build integration

// Package integration runs nbdmirror as real processes against real NBD
// clients (nbdinfo, qemu-io, qemu-img, nbdcopy, fio, libnbd, nbdfuse plus a
// loop device and ext4). Build tag: integration; run with `make integration`.
//
// A test that lacks root or a tool skips, unless NBDMIRROR_REQUIRE_E2E=1,
// which turns every such skip into a failure (CI sets it). The one skip that
// stays a skip is a kernel without the nbd module.
package integration

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binary is the nbdmirror executable under test, built with -race so data
// races in the real processes fail the tests too.
var binary string

func TestMain(m *testing.M) {
	if cfg := os.Getenv(transportNodeEnv); cfg != "" {
		os.Exit(transportNode(cfg)) // this process is a node of a transport test
	}
	dir, err := os.MkdirTemp("", "nbdmirror-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "nbdmirror")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/nbdmirror")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build nbdmirror:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func requireE2E() bool { return os.Getenv("NBDMIRROR_REQUIRE_E2E") == "1" }

// unavailable skips the test, or fails it under NBDMIRROR_REQUIRE_E2E=1.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if requireE2E() {
		t.Fatalf("%s (NBDMIRROR_REQUIRE_E2E=1 forbids skipping: run 'make deps' as root)", msg)
	}
	t.Skip(msg)
}

// need checks that each tool is installed.
func need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			unavailable(t, "needs %s", tool)
		}
	}
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		unavailable(t, "needs root")
	}
}

// proc is a process started by a test. Its output is kept; when the test
// ends it is stopped (if still running) and its output is checked for
// panics and data races.
type proc struct {
	t    testing.TB
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// syncBuffer keeps a process's output: the first outputHead bytes and the
// last outputTail, so a process that prints without end cannot exhaust
// the test's memory.
type syncBuffer struct {
	mu      sync.Mutex
	b       bytes.Buffer
	tail    []byte
	dropped int
}

const (
	outputHead = 16 << 20
	outputTail = 1 << 20
)

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(p)
	if room := outputHead - s.b.Len(); room > 0 {
		k := min(room, len(p))
		s.b.Write(p[:k])
		p = p[k:]
	}
	if len(p) > 0 {
		s.tail = append(s.tail, p...)
		if over := len(s.tail) - outputTail; over > 0 {
			s.dropped += over
			s.tail = append(s.tail[:0], s.tail[over:]...)
		}
	}
	return n, nil
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.tail) == 0 {
		return s.b.String()
	}
	return fmt.Sprintf("%s\n[... %d bytes of output dropped ...]\n%s", s.b.String(), s.dropped, s.tail)
}

var forbidden = regexp.MustCompile(`DATA RACE|panic:|fatal error:|goroutine \d+ \[`)

func start(t testing.TB, name string, args ...string) *proc {
	t.Helper()
	return startEnv(t, nil, name, args...)
}

// startEnv starts a process with extra environment variables.
func startEnv(t testing.TB, env []string, name string, args ...string) *proc {
	t.Helper()
	return startProc(t, "", env, name, args...)
}

// startProc starts a process in dir ("" = this one's) with extra
// environment variables; its output is kept (bounded) and checked for
// panics and data races when the test ends.
func startProc(t testing.TB, dir string, env []string, name string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: filepath.Base(name), cmd: exec.Command(name, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Dir = dir
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			// The group: a child that outlives the process would keep
			// its output pipe, and Wait, open.
			p.signalGroup(syscall.SIGKILL)
			<-p.done
		}
		if out := p.out.String(); forbidden.MatchString(out) {
			t.Errorf("%s printed a panic or data race:\n%s", p.name, out)
		} else if t.Failed() {
			t.Logf("%s output:\n%s", p.name, out)
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signal signals the process (by its own PID, never by name).
func (p *proc) signal(sig syscall.Signal) {
	if p.cmd.Process != nil {
		p.cmd.Process.Signal(sig)
	}
}

// signalGroup signals the process group the process leads (it was started
// with its own: Setpgid), so its children too.
func (p *proc) signalGroup(sig syscall.Signal) {
	if p.cmd.Process != nil {
		syscall.Kill(-p.cmd.Process.Pid, sig)
	}
}

// stop sends sig and waits for the process to exit; it returns the exit
// error. After 30 s it kills the process and fails the test.
func (p *proc) stop(sig syscall.Signal) error {
	p.t.Helper()
	p.signal(sig)
	select {
	case <-p.done:
		return p.err
	case <-time.After(30 * time.Second):
		p.signal(syscall.SIGKILL)
		<-p.done
		p.t.Fatalf("%s did not exit within 30s of %v", p.name, sig)
		return nil
	}
}

// wait waits for the process to exit on its own.
func (p *proc) wait(timeout time.Duration) error {
	p.t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.t.Fatalf("%s still running after %v", p.name, timeout)
		return nil
	}
}

// waitUnix waits until something accepts connections on the socket.
func waitUnix(t testing.TB, p *proc, path string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		if p != nil && p.exited() {
			t.Fatalf("%s exited before listening on %s: %v\n%s", p.name, path, p.err, p.out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s after 20s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run runs a command to completion within timeout and returns its combined
// output; a non-zero exit fails the test unless allowFail.
func run(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := tryRun(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func tryRun(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return string(out), err
}

// sparseFile creates a file of the given size in dir.
func sparseFile(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path
}

// serve starts `nbdmirror serve` on a Unix socket and returns the NBD URI.
func serve(t testing.TB, file, export string, extra ...string) (*proc, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	args := append([]string{"--log-level", "debug", "serve", "--file", file, "--export", export,
		"--listen", "unix:" + sock}, extra...)
	p := start(t, binary, args...)
	waitUnix(t, p, sock)
	return p, "nbd+unix:///" + export + "?socket=" + sock
}
