//go:build integration

package integration

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHandlers_FencingNodeLoss: fencing resource-and-stonith, and the
// Primary's peer node is lost (its daemon killed). The daemon runs the
// fence-peer handler with DRBD's environment; the handler fails (exit 1),
// so application I/O stays suspended: `status` says suspended:fencing, a
// write through NBD waits, and `events` reports the handler's call and
// response. `resume-io` lets the write go; the peer comes back and resyncs.
func TestHandlers_FencingNodeLoss(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	script := filepath.Join(dir, "fence.sh")
	envFile := filepath.Join(dir, "env")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nenv > "+envFile+"\necho fencing failed on purpose\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, 64*mib, fmt.Sprintf(`net { protocol C; } disk { fencing resource-and-stonith; c-plan-ahead 0; resync-rate 500M; }
  handlers { fence-peer %q; handler-timeout 60; }`, script))
	c.initialSync()
	events := start(t, binary, "--config", c.alpha.conf, "--node", "alpha", "--run-dir", c.alpha.run_, "events", "--now", "r0")
	waitHandlerEvent(t, events, func(e handlerEvent) bool { return e.Event == "exists" }) // subscribed

	c.beta.kill()
	response := waitHandlerEvent(t, events, func(e handlerEvent) bool { return e.Event == "response" && e.Helper.Name == "fence-peer" })
	if e := response.Helper; e.Status == nil || *e.Status != 1 || e.Command != script {
		t.Fatalf("fence-peer's response event: %+v", e)
	}
	if !strings.Contains(events.out.String(), `"event":"call"`) {
		t.Errorf("no call event before the response:\n%s", events.out.String())
	}
	env, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"DRBD_RESOURCE=r0", "DRBD_PEER_ADDRESS=" + c.h.ipB, "DRBD_MY_ADDRESS=" + c.h.ipA,
		"DRBD_PEER=beta", "DRBD_MY_NODE_ID=0", "DRBD_PEER_NODE_ID=1", "DRBD_NODE_ID_1=beta", "UP_TO_DATE_NODES=0x1",
		"NBDMIRROR_HANDLER=fence-peer", "NBDMIRROR_ROLE=Primary", "DRBD_CONF=" + c.alpha.conf} {
		if !strings.Contains(string(env), want+"\n") {
			t.Errorf("fence-peer's environment lacks %s:\n%s", want, env)
		}
	}
	if !strings.Contains(string(env), "DRBD_CSTATE=NetworkFailure") && !strings.Contains(string(env), "DRBD_CSTATE=Timeout") {
		t.Errorf("DRBD_CSTATE does not say why the connection was lost:\n%s", env)
	}
	if out := c.alpha.must("status", "r0"); !strings.Contains(out, "r0 role:Primary suspended:fencing") {
		t.Fatalf("status while fencing holds I/O:\n%s", out)
	}
	data := make([]byte, 64<<10)
	rand.Read(data)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.alpha.writeAt(8*mib, data)
	}()
	// The write stays held: the daemon counts it nowhere until I/O resumes.
	select {
	case <-done:
		t.Fatal("a write completed while fencing holds I/O")
	case <-time.After(200 * time.Millisecond):
	}
	c.alpha.must("resume-io", "r0")
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the held write did not complete after resume-io")
	}
	if out := c.alpha.must("status", "r0"); strings.Contains(out, "suspended") {
		t.Fatalf("still suspended after resume-io:\n%s", out)
	}
	if !strings.Contains(c.alpha.d.out.String(), "fence-peer helper returned 1 (helper broken)") {
		t.Errorf("the daemon did not log fence-peer's result")
	}

	// The peer returns and is resynced with the write.
	c.beta.start()
	c.beta.must("up", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.demote()
	c.sameData()
}

// handlerEvent is the part of a call/response event line read here.
type handlerEvent struct {
	Event  string `json:"event"`
	Name   string `json:"name"`
	Helper struct {
		Name    string `json:"name"`
		Command string `json:"command"`
		Status  *int   `json:"status"`
	} `json:"helper"`
}

// waitHandlerEvent waits until the events process has printed a line matching
// ok, and returns it.
func waitHandlerEvent(t *testing.T, p *proc, ok func(handlerEvent) bool) handlerEvent {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		for _, l := range strings.Split(p.out.String(), "\n") {
			var e handlerEvent
			if json.Unmarshal([]byte(l), &e) == nil && ok(e) {
				return e
			}
		}
		if time.Now().After(deadline) || p.exited() {
			t.Fatalf("no such event within a minute; events printed:\n%s", p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHandlers_LocalIOError: on-io-error call-local-io-error, and a disk
// that fails reads (nbdkit's error filter behind nbdfuse). The NBD client
// gets EIO and the local-io-error handler runs once for the attach, with
// the error in its environment; the disk serves again once healed.
func TestHandlers_LocalIOError(t *testing.T) {
	needRoot(t)
	need(t, "nbdkit", "nbdfuse", "fusermount3")
	dir := t.TempDir()
	img := sparseFile(t, dir, "lower.img", 64*mib)
	fuseDir, failFlag := filepath.Join(dir, "fuse"), filepath.Join(dir, "fail")
	os.MkdirAll(fuseDir, 0o755)
	disk := filepath.Join(fuseDir, "disk")
	fuse := start(t, "nbdfuse", disk, "--socket-activation", "nbdkit", "--filter=error", "file", img,
		"error=EIO", "error-pread-rate=100%", "error-file="+failFlag)
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", fuseDir).Run()
		select {
		case <-fuse.done:
		case <-time.After(20 * time.Second):
		}
	})
	eventually(t, 20*time.Second, "nbdfuse", func() (bool, string) {
		fi, err := os.Stat(disk)
		return err == nil && fi.Size() == 64*mib, fmt.Sprint(err)
	})
	script, out := filepath.Join(dir, "ioerr.sh"), filepath.Join(dir, "calls")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$DRBD_RESOURCE $NBDMIRROR_HANDLER $DRBD_BACKING_DEV $NBDMIRROR_IO_ERROR\" >> "+out+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, dir: dir, disk: disk, conf: filepath.Join(dir, "nbdmirror.conf"), runDir: filepath.Join(dir, "run")}
	port := freePort(t)
	conf := fmt.Sprintf("resource r0 { disk { on-io-error call-local-io-error; } handlers { local-io-error %q; }\n"+
		"  disk %s; meta-disk internal;\n  on alpha { address 127.0.0.1:%d; } on beta { address 127.0.0.2:%d; } }\n",
		script, disk, port, port)
	if err := os.WriteFile(n.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	n.must("create-md", "r0")
	d := n.daemon(nil)
	n.must("up", "r0")
	n.must("primary", "--force", "r0")

	// Each read is of a block not read before: the page cache does not
	// answer it.
	readErr := func(off uint64) uint32 {
		rc := dialNBD(t, n.sock(), "r0")
		defer rc.c.Close()
		rc.send(t, 0, 1, off, 4096, nil) // NBD_CMD_READ
		return rc.reply(t, 1)
	}
	if e := readErr(1 * mib); e != 0 {
		t.Fatalf("a read before the fault: error %d", e)
	}
	if err := os.WriteFile(failFlag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if e := readErr(20 * mib); e != 5 {
		t.Fatalf("a read from the failing disk: error %d, want EIO (5)", e)
	}
	eventually(t, 30*time.Second, "local-io-error's run logged", func() (bool, string) {
		return strings.Contains(d.out.String(), "handler=local-io-error exit_code=0"), ""
	})
	b, _ := os.ReadFile(out)
	calls := strings.Split(strings.TrimSpace(string(b)), "\n")
	if want := "r0 local-io-error " + disk + " read: "; !strings.HasPrefix(calls[0], want) || !strings.Contains(calls[0], "input/output error") {
		t.Errorf("the handler saw %q, want %q… with the error", calls[0], want)
	}
	// Once per attach: a second error runs nothing more. (Had it queued a
	// run, the idle queue would start it at once, before the two reads
	// below are answered.)
	if e := readErr(40 * mib); e != 5 {
		t.Fatalf("a second read from the failing disk: error %d, want EIO (5)", e)
	}
	os.Remove(failFlag)
	if e := readErr(60 * mib); e != 0 {
		t.Fatalf("a read after the heal: error %d", e)
	}
	if n := strings.Count(d.out.String(), `msg="calling handler" resource=r0 handler=local-io-error`); n != 1 {
		t.Errorf("local-io-error ran %d times, want once", n)
	}
	n.must("secondary", "r0")
	n.must("down", "r0")
}
