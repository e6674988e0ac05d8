//go:build integration

package integration

// End-to-end tests of `nbdmirror daemon` and the admin verbs as real
// processes: ext4 through nbdfuse over a resource's export across
// secondary/down/up/primary, kill -9 under fio (invariant I3: no
// acknowledged write lost, every possibly-written block marked), and the
// signals and systemd notifications of a graceful and a hard stop. The
// refusals of each verb are tested in-process in cmd/nbdmirror.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	binenc "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const extentSize = 4 * mib // an activity-log extent

// freePort returns a TCP port nothing listens on now, so that daemons of
// tests running at the same time can each listen for their (absent) peer.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// node is one nbdmirror node (alpha) with resource r0 over a file disk.
type node struct {
	t      *testing.T
	dir    string
	disk   string
	conf   string
	runDir string
}

// newNode writes a configuration for r0 over a sparse file of size bytes
// with the given al-extents, and creates the metadata.
func newNode(t *testing.T, size int64, alExtents int) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{t: t, dir: dir, disk: sparseFile(t, dir, "d0", size), conf: filepath.Join(dir, "nbdmirror.conf"),
		runDir: filepath.Join(dir, "run")}
	port := freePort(t)
	conf := fmt.Sprintf("resource r0 { disk { al-extents %d; } disk %s; meta-disk internal;\n"+
		"  on alpha { address 127.0.0.1:%d; } on beta { address 127.0.0.2:%d; } }\n", alExtents, n.disk, port, port)
	if err := os.WriteFile(n.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := n.must("create-md", "r0"); !strings.Contains(out, "r0: metadata created on "+n.disk) {
		t.Fatalf("create-md: %s", out)
	}
	return n
}

func (n *node) sock() string { return filepath.Join(n.runDir, "nbd.sock") }
func (n *node) uri() string  { return "nbd+unix:///r0?socket=" + n.sock() }

// cli runs one nbdmirror command for this node and returns its exit code,
// stdout and stderr.
func (n *node) cli(args ...string) (int, string, string) {
	n.t.Helper()
	return runCLI(n.t, time.Minute, append([]string{"--config", n.conf, "--node", "alpha", "--run-dir", n.runDir}, args...))
}

// runCLI runs nbdmirror with args and returns its exit code, stdout and
// stderr; it fails the test if the command cannot run or times out.
func runCLI(t *testing.T, timeout time.Duration, args []string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	// The race detector sleeps a second before a program exits, by default.
	cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout.String(), stderr.String()
	case ctx.Err() != nil:
		t.Fatalf("nbdmirror %s: timed out", strings.Join(args, " "))
	case errors.As(err, &ee):
		return ee.ExitCode(), stdout.String(), stderr.String()
	default:
		t.Fatalf("nbdmirror %s: %v", strings.Join(args, " "), err)
	}
	return -1, "", ""
}

// must runs a command that must succeed and returns its stdout.
func (n *node) must(args ...string) string {
	n.t.Helper()
	code, out, errOut := n.cli(args...)
	if code != 0 {
		n.t.Fatalf("nbdmirror %s: exit %d: %s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// daemon starts `nbdmirror daemon` with extra environment variables and
// arguments, and waits for its control socket. NOTIFY_SOCKET is not
// inherited from the test's environment.
func (n *node) daemon(env []string, extra ...string) *proc {
	n.t.Helper()
	env = append([]string{"NOTIFY_SOCKET="}, env...)
	args := append([]string{"--config", n.conf, "--node", "alpha", "--run-dir", n.runDir, "--log-level", "debug",
		"daemon"}, extra...)
	p := startEnv(n.t, env, binary, args...)
	waitUnix(n.t, p, filepath.Join(n.runDir, "control.sock"))
	return p
}

// status is the part of `status --json` these tests read.
type status struct {
	Name           string   `json:"name"`
	Role           string   `json:"role"`
	Disk           string   `json:"disk"`
	CState         string   `json:"cstate"`
	OutOfSyncBytes uint64   `json:"out_of_sync_bytes"`
	Clients        []string `json:"clients"`
	Counters       struct {
		DW uint64 `json:"dw"` // KiB written
		DR uint64 `json:"dr"` // KiB read
		AL uint64 `json:"al"` // activity-log transactions
		BM uint64 `json:"bm"` // bitmap page writes
	} `json:"counters"`
}

func (n *node) status() status {
	n.t.Helper()
	out := n.must("status", "--json", "r0")
	var st []status
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 || st[0].Name != "r0" {
		n.t.Fatalf("status --json r0: %v\n%s", err, out)
	}
	return st[0]
}

// dumpMD runs dump-md (the daemon must not hold the metadata) and returns
// its text and its JSON.
func (n *node) dumpMD() (string, mdJSON) {
	n.t.Helper()
	text := n.must("dump-md", "r0")
	var d mdJSON
	out := n.must("dump-md", "--json", "r0")
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		n.t.Fatalf("dump-md --json: %v\n%s", err, out)
	}
	return text, d
}

// mdJSON is the part of `dump-md --json` these tests read.
type mdJSON struct {
	Flags []string `json:"flags"`
	Clean bool     `json:"clean"`
	AL    struct {
		Transaction uint64   `json:"transaction"`
		Extents     []uint64 `json:"extents"`
	} `json:"activity_log"`
	Bitmap struct {
		BitsSet        uint64 `json:"bits_set"`
		OutOfSyncBytes uint64 `json:"out_of_sync_bytes"`
	} `json:"bitmap"`
}

var (
	mdStateRe = regexp.MustCompile(`(?m)^state +(.*)$`)
	mdALRe    = regexp.MustCompile(`(?m)^activity log +transaction (\d+), (\d+) extents(?:: ([0-9 ]+))?$`)
)

// checkMDText checks dump-md's text: the state line says clean or
// unclean (naming apply-al), and the activity-log line lists extents.
func checkMDText(t *testing.T, text string, clean bool, extents []uint64) {
	t.Helper()
	state := mdStateRe.FindStringSubmatch(text)
	want := "unclean: the activity log is not applied; run 'nbdmirror apply-al r0'"
	if clean {
		want = "clean (shut down cleanly, activity log empty)"
	}
	if state == nil || state[1] != want {
		t.Errorf("dump-md state: want %q:\n%s", want, text)
	}
	al := mdALRe.FindStringSubmatch(text)
	var listed []string
	for _, e := range extents {
		listed = append(listed, strconv.FormatUint(e, 10))
	}
	if al == nil || al[2] != strconv.Itoa(len(extents)) || al[3] != strings.Join(listed, " ") {
		t.Errorf("dump-md activity log: want %d extents %v:\n%s", len(extents), extents, text)
	}
}

// eventually polls cond every 20 ms until it holds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %s", what, timeout, detail)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startIn is startEnv with a working directory.
func startIn(t *testing.T, dir, name string, args ...string) *proc {
	t.Helper()
	return startProc(t, dir, nil, name, args...)
}

// ext4 is a file system on an NBD export: nbdfuse exposes the export as a
// file, a loop device is attached to it, ext4 is mounted from the loop
// device. release undoes it all; it runs at the end of the test too.
type ext4 struct {
	t                     *testing.T
	fuseDir, mnt, loop    string
	fuse                  *proc
	mounted, loopAttached bool
}

func mountNBD(t *testing.T, dir, uri string, mkfs bool) *ext4 {
	t.Helper()
	m := &ext4{t: t, fuseDir: filepath.Join(dir, "fuse"), mnt: filepath.Join(dir, "mnt")}
	os.MkdirAll(m.fuseDir, 0o755)
	os.MkdirAll(m.mnt, 0o755)
	m.fuse = start(t, "nbdfuse", filepath.Join(m.fuseDir, "disk"), uri)
	t.Cleanup(func() { m.release(false) })
	eventually(t, 20*time.Second, "nbdfuse", func() (bool, string) {
		if m.fuse.exited() {
			t.Fatalf("nbdfuse exited: %v\n%s", m.fuse.err, m.fuse.out)
		}
		fi, err := os.Stat(filepath.Join(m.fuseDir, "disk"))
		return err == nil && fi.Size() > 0, fmt.Sprint(err)
	})
	m.loop = strings.TrimSpace(run(t, time.Minute, "losetup", "-f", "--show", filepath.Join(m.fuseDir, "disk")))
	m.loopAttached = true
	if mkfs {
		run(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", m.loop)
	}
	run(t, time.Minute, "mount", m.loop, m.mnt)
	m.mounted = true
	return m
}

// release unmounts the file system (then checks it with e2fsck when
// check is set), detaches the loop device and unmounts nbdfuse, which
// then exits: its NBD connections close.
func (m *ext4) release(check bool) {
	t := m.t
	if m.mounted {
		if out, err := tryRun(time.Minute, "umount", m.mnt); err != nil {
			exec.Command("umount", "-l", m.mnt).Run()
			t.Errorf("umount %s: %v\n%s", m.mnt, err, out)
		}
		m.mounted = false
		if check {
			if out, err := tryRun(2*time.Minute, "e2fsck", "-fn", m.loop); err != nil {
				t.Errorf("e2fsck -fn: %v\n%s", err, out)
			}
		}
	}
	if m.loopAttached {
		if out, err := tryRun(time.Minute, "losetup", "-d", m.loop); err != nil {
			t.Errorf("losetup -d %s: %v\n%s", m.loop, err, out)
		}
		m.loopAttached = false
	}
	if m.fuse != nil && !m.fuse.exited() {
		exec.Command("fusermount3", "-u", m.fuseDir).Run()
		select {
		case <-m.fuse.done:
		case <-time.After(20 * time.Second):
			t.Errorf("nbdfuse still running 20s after fusermount3 -u")
		}
	}
}

// TestDaemon_Ext4Lifecycle: ext4 on the export of a Primary; secondary is
// refused while mounted (saying how many clients hold it) and succeeds
// once the client is gone; down/up keeps the bitmap and leaves the disk
// UpToDate, so primary needs no --force; every file reads back after the
// remount; SIGTERM leaves the metadata clean.
func TestDaemon_Ext4Lifecycle(t *testing.T) {
	needRoot(t)
	need(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	n := newNode(t, 256*mib, 7)
	d := n.daemon(nil)
	n.must("up", "r0")
	n.must("primary", "--force", "r0")
	if st := n.status(); st.Role != "Primary" || st.Disk != "UpToDate" || st.CState != "WFConnection" {
		t.Fatalf("after primary --force: %+v", st)
	}
	fs := mountNBD(t, n.dir, n.uri(), true)

	// A few MiB of random data and many small files.
	payload := make([]byte, 6*mib+12345)
	rand.Read(payload)
	if err := os.WriteFile(filepath.Join(fs.mnt, "payload.bin"), payload, 0o644); err != nil {
		t.Fatal(err)
	}
	small := func(i int) []byte { return bytes.Repeat([]byte(fmt.Sprintf("file %d;", i)), i%97+1) }
	smallPath := func(i int) string { return filepath.Join(fs.mnt, "tree", fmt.Sprint(i%16), fmt.Sprintf("f%d", i)) }
	const nSmall = 400
	for i := range nSmall {
		os.MkdirAll(filepath.Dir(smallPath(i)), 0o755)
		if err := os.WriteFile(smallPath(i), small(i), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run(t, time.Minute, "sync")

	statusFile, err := os.ReadFile(filepath.Join(n.runDir, "status"))
	if err != nil || !strings.Contains(string(statusFile), " 0: cs:WFConnection ro:Primary/Unknown ds:UpToDate/DUnknown ") {
		t.Errorf("status file: %v\n%s", err, statusFile)
	}

	// Refused while mounted: exit 20, DRBD's -12, and how many clients.
	st := n.status()
	code, out, errOut := n.cli("secondary", "r0")
	m := regexp.MustCompile(`^r0: State change failed: \(-12\) Device is held open by someone \((\d+) NBD clients?: [^\n]+\)\n$`).
		FindStringSubmatch(errOut)
	if code != 20 || out != "" || m == nil {
		t.Fatalf("secondary while mounted: exit %d, stdout %q, stderr %q; want 20 and (-12) Device is held open by someone (N NBD clients: …)",
			code, out, errOut)
	}
	t.Logf("secondary while mounted: exit %d: %s", code, strings.TrimSpace(errOut))
	if m[1] != strconv.Itoa(len(st.Clients)) || len(st.Clients) == 0 {
		t.Errorf("the refusal names %s clients; status --json lists %d: %q", m[1], len(st.Clients), st.Clients)
	}
	if role := strings.TrimSpace(n.must("role", "r0")); role != "Primary/Unknown" {
		t.Fatalf("role after the refused secondary: %s", role)
	}

	fs.release(true)
	eventually(t, 20*time.Second, "secondary after the NBD client left", func() (bool, string) {
		code, _, errOut := n.cli("secondary", "r0")
		return code == 0, fmt.Sprintf("exit %d: %s", code, errOut)
	})
	before := n.status()
	if before.Role != "Secondary" || before.Disk != "UpToDate" || before.OutOfSyncBytes == 0 || len(before.Clients) != 0 {
		t.Fatalf("after secondary (writes without a peer must be marked out of sync): %+v", before)
	}
	t.Logf("after secondary: %d bytes out of sync", before.OutOfSyncBytes)
	n.must("down", "r0")
	if st := n.status(); st.Disk != "Diskless" || st.OutOfSyncBytes != 0 {
		t.Fatalf("after down: %+v", st)
	}
	n.must("up", "r0")
	after := n.status()
	if after.Disk != "UpToDate" || after.OutOfSyncBytes != before.OutOfSyncBytes {
		t.Fatalf("down/up: disk %s, out of sync %d bytes; want UpToDate and the %d bytes before down",
			after.Disk, after.OutOfSyncBytes, before.OutOfSyncBytes)
	}
	if strings.Contains(d.out.String(), "activity log applied") {
		t.Errorf("a clean down/up applied the activity log:\n%s", d.out)
	}
	n.must("primary", "r0") // no --force: the disk is UpToDate

	fs = mountNBD(t, n.dir, n.uri(), false)
	if got, err := os.ReadFile(filepath.Join(fs.mnt, "payload.bin")); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("payload.bin after the remount: %v (equal %v)", err, bytes.Equal(got, payload))
	}
	for i := range nSmall {
		if got, err := os.ReadFile(smallPath(i)); err != nil || !bytes.Equal(got, small(i)) {
			t.Fatalf("%s after the remount: %v %q", smallPath(i), err, got)
		}
	}
	fs.release(true)
	eventually(t, 20*time.Second, "the NBD clients leave", func() (bool, string) {
		st := n.status()
		return len(st.Clients) == 0, fmt.Sprint(st.Clients)
	})

	// SIGTERM while Primary: a graceful stop.
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.out)
	}
	text, md := n.dumpMD()
	checkMDText(t, text, true, nil)
	if !md.Clean || slices.Contains(md.Flags, "primary") || md.Bitmap.OutOfSyncBytes < before.OutOfSyncBytes {
		t.Errorf("metadata after SIGTERM: %+v\n%s", md, text)
	}
	if _, err := os.Stat(filepath.Join(n.runDir, "status")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("status file left behind: %v", err)
	}
}

// fioJob is the part of fio's JSON output these tests read.
type fioJob struct {
	Error int `json:"error"`
	Read  struct {
		IOKBytes uint64 `json:"io_kbytes"`
		TotalIOs uint64 `json:"total_ios"`
	} `json:"read"`
	Write struct {
		IOKBytes uint64 `json:"io_kbytes"`
		TotalIOs uint64 `json:"total_ios"`
	} `json:"write"`
}

func readFioJSON(t *testing.T, path string) fioJob {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("fio output: %v", err)
	}
	// fio may print messages before the JSON document.
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	var out struct {
		Jobs []fioJob `json:"jobs"`
	}
	if err := json.Unmarshal(b, &out); err != nil || len(out.Jobs) != 1 {
		t.Fatalf("fio JSON %s: %v\n%s", path, err, b)
	}
	return out.Jobs[0]
}

// TestDaemon_KillDuringFio is invariant I3 with real processes: fio writes
// with verification headers through the export of a Primary, the daemon
// is killed with SIGKILL mid-run, and after a restart (which applies the
// activity log) fio's verify pass finds every write it had seen
// acknowledged, and the bitmap covers every block fio wrote and every
// extent of the activity log.
func TestDaemon_KillDuringFio(t *testing.T) {
	need(t, "fio")
	for _, tc := range []struct {
		name      string
		alExtents int
		size      int64 // fio's working set, from 64 MiB on
	}{
		{"working set inside the activity log", 31, 64 * mib},
		{"working set larger than the activity log", 7, 256 * mib},
	} {
		t.Run(tc.name, func(t *testing.T) { killDuringFio(t, tc.alExtents, tc.size) })
	}
}

func killDuringFio(t *testing.T, alExtents int, size int64) {
	const offset = 64 * mib
	inside := size <= int64(alExtents)*extentSize // the working set fits in the activity log
	n := newNode(t, 512*mib, alExtents)
	d := n.daemon(nil)
	n.must("up", "r0")
	n.must("primary", "--force", "r0")

	// fio keeps its verify state in its working directory. The job options
	// that decide the offsets and the data are the same in both runs.
	fioDir := t.TempDir()
	job := []string{"--name=i3", "--ioengine=nbd", "--uri=" + n.uri(), "--rw=randwrite", "--bs=4k",
		fmt.Sprintf("--offset=%d", offset), fmt.Sprintf("--size=%d", size), "--randseed=4242", "--verify=crc32c"}
	// The think time keeps fio to a few thousand writes a second, 8 in
	// flight, so that it is still writing when the daemon is killed
	// (unthrottled it writes 64 MiB in under a second). The completion
	// latency log records the offset of every write fio saw acknowledged.
	write := append(slices.Clone(job), "--iodepth=8", "--do_verify=0", "--verify_state_save=1",
		"--thinktime=20ms", "--thinktime_blocks=64", "--write_lat_log=acked", "--log_offset=1",
		"--output-format=json", "--output=write.json")
	t.Logf("fio %s", strings.Join(write, " "))
	f := startIn(t, fioDir, "fio", write...)
	eventually(t, 60*time.Second, "fio writes 16 MiB", func() (bool, string) {
		if f.exited() {
			t.Fatalf("fio ended before the daemon was killed: %v\n%s", f.err, f.out)
		}
		st := n.status()
		return st.Counters.DW >= 16384 && (inside || st.Counters.AL > uint64(alExtents)), fmt.Sprintf("%+v", st.Counters)
	})
	if f.exited() {
		t.Fatalf("fio ended before the daemon was killed: %v\n%s", f.err, f.out)
	}
	d.stop(syscall.SIGKILL)
	select {
	case <-f.done:
	case <-time.After(30 * time.Second):
		// Seen once in about a hundred runs: fio (3.33, nbd engine) looping,
		// printing gigabytes. SIGTERM makes fio end its jobs, saving the
		// verify state.
		t.Logf("fio still runs 30s after the daemon was killed under it; sending SIGTERM:\n%s", f.out)
		f.signal(syscall.SIGTERM)
		select {
		case <-f.done:
		case <-time.After(15 * time.Second):
			t.Fatalf("fio ignores SIGTERM")
		}
	}
	if f.err == nil {
		t.Fatalf("fio succeeded although the daemon was killed under it:\n%s", f.out)
	}
	w := readFioJSON(t, filepath.Join(fioDir, "write.json"))
	acked := ackedOffsets(t, filepath.Join(fioDir, "acked_clat.1.log"))
	t.Logf("fio: error %d, %d writes acknowledged before the kill, %d issued", w.Error, len(acked), w.Write.TotalIOs)
	if w.Error == 0 || len(acked) < 4096 || uint64(len(acked)) != w.Write.IOKBytes/4 {
		t.Fatalf("fio: error %d, %d KiB written, %d completions logged; want a lost connection after at least 4096 writes",
			w.Error, w.Write.IOKBytes, len(acked))
	}
	if _, err := os.Stat(filepath.Join(fioDir, "local-i3-0-verify.state")); err != nil {
		t.Fatalf("fio saved no verify state: %v\n%s", err, f.out)
	}

	// Before the restart: unclean, the activity log lists the hot extents.
	text, md := n.dumpMD()
	first, last := uint64(offset/extentSize), uint64((offset+size)/extentSize-1)
	if inside { // every extent of the working set is hot
		var want []uint64
		for e := first; e <= last; e++ {
			want = append(want, e)
		}
		checkMDText(t, text, false, want)
	} else { // the log is full of extents of the working set, others were evicted
		if len(md.AL.Extents) != alExtents || md.AL.Transaction <= uint64(alExtents) {
			t.Errorf("activity log: %d extents, transaction %d; want %d extents and evictions", len(md.AL.Extents),
				md.AL.Transaction, alExtents)
		}
		for _, e := range md.AL.Extents {
			if e < first || e > last {
				t.Errorf("activity-log extent %d is outside fio's working set (%d-%d)", e, first, last)
			}
		}
		checkMDText(t, text, false, md.AL.Extents)
	}
	if md.Clean || !slices.Contains(md.Flags, "primary") {
		t.Errorf("metadata after kill -9 of a Primary: %+v", md)
	}

	// Restart: up applies the activity log; the disk is UpToDate.
	d = n.daemon(nil)
	n.must("up", "r0")
	wantLog := fmt.Sprintf(`msg="the last stop was unclean: activity log applied" resource=r0 extents=%d `, len(md.AL.Extents))
	if !strings.Contains(d.out.String(), wantLog) {
		t.Errorf("daemon log lacks %q:\n%s", wantLog, d.out)
	}
	st := n.status()
	if st.Disk != "UpToDate" || st.Role != "Secondary" {
		t.Errorf("%s, disk %s after a crash of a Primary; want Secondary, UpToDate (consistent, was-up-to-date)", st.Role, st.Disk)
	}
	n.must("primary", "r0")

	// Every block fio wrote is marked, and so is every block of every
	// extent of the activity log. Each of fio's writes went to a block of
	// its own (fio's random map covers each block once per pass).
	if st.OutOfSyncBytes < uint64(len(md.AL.Extents))*extentSize || st.OutOfSyncBytes < uint64(len(acked))*4096 ||
		st.OutOfSyncBytes > uint64(size) {
		t.Errorf("out of sync after the restart: %d bytes; want at least %d extents (%d bytes) and %d acknowledged 4 KiB writes, at most the working set (%d)",
			st.OutOfSyncBytes, len(md.AL.Extents), uint64(len(md.AL.Extents))*extentSize, len(acked), size)
	}
	if inside && st.OutOfSyncBytes != uint64(size) {
		t.Errorf("out of sync after the restart: %d bytes; want the working set's %d extents whole (%d bytes)",
			st.OutOfSyncBytes, size/extentSize, size)
	}

	// fio replays its write sequence without writing and reads back each
	// write, up to where its saved state says the acknowledged writes end.
	// fio 3.33's state is approximate: it assumes that the writes in
	// flight at the end were the last iodepth issued, but the daemon
	// completes writes out of order (one waiting for an activity-log
	// transaction while later ones to hot extents complete), and fio
	// checks the state against the reads it has completed, not issued. So
	// fio may also read back a write that was in flight at the kill; that
	// one may or may not be on the disk. Hence --verify_fatal=0 and
	// --iodepth=1: every bad block fio reports must be a write it never saw
	// acknowledged.
	verify := append(slices.Clone(job), "--iodepth=1", "--verify_only", "--do_verify=1", "--verify_state_load=1",
		"--verify_state_save=0", "--verify_fatal=0", "--output-format=json", "--output=verify.json")
	t.Logf("fio %s", strings.Join(verify, " "))
	v := startIn(t, fioDir, "fio", verify...)
	verr := v.wait(2 * time.Minute)
	r := readFioJSON(t, filepath.Join(fioDir, "verify.json"))
	var inFlight []int64
	for _, m := range regexp.MustCompile(`(?m)^verify: .* at file \S+ offset (\d+), length`).FindAllStringSubmatch(v.out.String(), -1) {
		off, _ := strconv.ParseInt(m[1], 10, 64)
		if slices.Contains(acked, off) {
			t.Errorf("fio verify: the write at offset %d was acknowledged before the kill and is lost", off)
		} else {
			inFlight = append(inFlight, off)
		}
	}
	t.Logf("fio verify: exit %v, %d writes read back, %d of them not on the disk and never acknowledged (in flight at the kill): %v",
		verr, r.Read.TotalIOs, len(inFlight), inFlight)
	if verr != nil && len(inFlight) == 0 || len(inFlight) > 8 {
		t.Errorf("fio verify: %v, %d bad blocks not acknowledged (at most iodepth, 8, were in flight)\n%s", verr, len(inFlight), v.out)
	}
	if r.Read.TotalIOs+8 < uint64(len(acked)) {
		t.Errorf("fio read back %d writes; want all but at most the last iodepth (8) of the %d acknowledged",
			r.Read.TotalIOs, len(acked))
	}
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	if text, md := n.dumpMD(); !md.Clean || !slices.Contains(md.Flags, "crashed-primary") {
		t.Errorf("metadata after SIGTERM: want clean, crashed-primary recorded:\n%s", text)
	}
	// And every acknowledged write, to the last, is on the disk: fio's
	// header (magic, offset, header CRC) and its CRC32C of the data.
	if bad := checkFioBlocks(t, n.disk, acked); len(bad) > 0 {
		t.Errorf("%d of %d acknowledged writes are not on the disk, e.g. at offsets %v", len(bad), len(acked), bad[:min(len(bad), 10)])
	}
}

// ackedOffsets reads the offsets of fio's completion-latency log
// (--write_lat_log with --log_offset=1: "msec, nsec, ddir, bs, offset, prio"),
// one line per write completed without error.
func ackedOffsets(t *testing.T, path string) []int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("fio completion log: %v", err)
	}
	var offs []int64
	for line := range strings.Lines(string(b)) {
		f := strings.Split(strings.TrimSpace(line), ", ")
		if len(f) < 5 || f[2] != "1" || f[3] != "4096" {
			t.Fatalf("fio completion log line %q", line)
		}
		off, err := strconv.ParseInt(f[4], 10, 64)
		if err != nil {
			t.Fatalf("fio completion log line %q: %v", line, err)
		}
		offs = append(offs, off)
	}
	return offs
}

// checkFioBlocks checks the 4 KiB blocks fio wrote with --verify=crc32c at
// offs in the disk file and returns the offsets of those that do not hold
// fio's data. fio's block: a 40-byte header (magic 0xacca, verify type,
// length, seed, offset, time, thread, numberio, CRC32C of the header
// before it), the CRC32C of the data, the data; fio's CRC32C is the
// complement of the usual one.
func checkFioBlocks(t *testing.T, disk string, offs []int64) []int64 {
	t.Helper()
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tab := crc32.MakeTable(crc32.Castagnoli)
	le := binenc.LittleEndian
	b := make([]byte, 4096)
	var bad []int64
	for _, off := range offs {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		if le.Uint16(b) != 0xacca || le.Uint32(b[4:]) != 4096 || le.Uint64(b[16:]) != uint64(off) ||
			le.Uint32(b[36:]) != ^crc32.Checksum(b[:36], tab) || le.Uint32(b[40:]) != ^crc32.Checksum(b[44:], tab) {
			bad = append(bad, off)
		}
	}
	return bad
}

// notifications collects the datagrams sent to a NOTIFY_SOCKET.
type notifications struct {
	path string
	ch   chan string
}

func listenNotify(t *testing.T) *notifications {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	nt := &notifications{path: path, ch: make(chan string, 64)}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			nt.ch <- string(buf[:k])
		}
	}()
	return nt
}

// expect waits for the next notification and checks it holds want.
func (nt *notifications) expect(t *testing.T, want string) string {
	t.Helper()
	select {
	case msg := <-nt.ch:
		if !slices.Contains(strings.Split(msg, "\n"), want) {
			t.Fatalf("notification %q; want %s", msg, want)
		}
		return msg
	case <-time.After(30 * time.Second):
		t.Fatalf("no %s notification within 30s", want)
		return ""
	}
}

// rawClient is a minimal NBD client, for requests a real client would not
// leave half done.
type rawClient struct {
	c net.Conn
	r *bufio.Reader
}

func dialNBD(t *testing.T, sock, export string) *rawClient {
	t.Helper()
	rc, err := dialNBDErr(sock, export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.c.Close() })
	return rc
}

// dialNBDErr connects to export on the Unix socket sock with NBD_OPT_GO.
func dialNBDErr(sock, export string) (*rawClient, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	fail := func(format string, args ...any) (*rawClient, error) {
		c.Close()
		return nil, fmt.Errorf(format, args...)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	var greet [18]byte
	if _, err := io.ReadFull(r, greet[:]); err != nil || string(greet[:16]) != "NBDMAGICIHAVEOPT" {
		return fail("NBD greeting %q: %v", greet, err)
	}
	msg := binenc.BigEndian.AppendUint32(nil, 3) // FIXED_NEWSTYLE | NO_ZEROES
	msg = binenc.BigEndian.AppendUint64(msg, 0x49484156454f5054)
	msg = binenc.BigEndian.AppendUint32(msg, 7) // NBD_OPT_GO
	msg = binenc.BigEndian.AppendUint32(msg, uint32(4+len(export)+2))
	msg = binenc.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	msg = binenc.BigEndian.AppendUint16(msg, 0)
	if _, err := c.Write(msg); err != nil {
		return fail("NBD option: %v", err)
	}
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return fail("NBD option reply: %v", err)
		}
		body := make([]byte, binenc.BigEndian.Uint32(hdr[16:]))
		if _, err := io.ReadFull(r, body); err != nil {
			return fail("NBD option reply: %v", err)
		}
		switch typ := binenc.BigEndian.Uint32(hdr[12:]); {
		case typ == 1: // NBD_REP_ACK
			c.SetDeadline(time.Time{})
			return &rawClient{c: c, r: r}, nil
		case typ&0x80000000 != 0:
			return fail("NBD_OPT_GO %s refused: %s", export, body)
		}
	}
}

// writeErr writes data at off (handle h) and waits for the reply; an
// error reply or a broken connection is returned, not fatal.
func (rc *rawClient) writeErr(h uint64, off int64, data []byte) error {
	msg := binenc.BigEndian.AppendUint32(nil, 0x25609513)
	msg = binenc.BigEndian.AppendUint16(msg, 0)
	msg = binenc.BigEndian.AppendUint16(msg, 1)
	msg = binenc.BigEndian.AppendUint64(msg, h)
	msg = binenc.BigEndian.AppendUint64(msg, uint64(off))
	msg = binenc.BigEndian.AppendUint32(msg, uint32(len(data)))
	rc.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := rc.c.Write(append(msg, data...)); err != nil {
		return err
	}
	var hdr [16]byte
	if _, err := io.ReadFull(rc.r, hdr[:]); err != nil {
		return err
	}
	if binenc.BigEndian.Uint32(hdr[:]) != 0x67446698 || binenc.BigEndian.Uint64(hdr[8:]) != h {
		return fmt.Errorf("NBD reply header %x", hdr)
	}
	if e := binenc.BigEndian.Uint32(hdr[4:]); e != 0 {
		return fmt.Errorf("NBD write error %d", e)
	}
	return nil
}

// send sends one request (NBD_CMD_READ = 0, NBD_CMD_WRITE = 1).
func (rc *rawClient) send(t *testing.T, cmd uint16, handle, off uint64, length uint32, payload []byte) {
	t.Helper()
	msg := binenc.BigEndian.AppendUint32(nil, 0x25609513)
	msg = binenc.BigEndian.AppendUint16(msg, 0)
	msg = binenc.BigEndian.AppendUint16(msg, cmd)
	msg = binenc.BigEndian.AppendUint64(msg, handle)
	msg = binenc.BigEndian.AppendUint64(msg, off)
	msg = binenc.BigEndian.AppendUint32(msg, length)
	if _, err := rc.c.Write(append(msg, payload...)); err != nil {
		t.Fatal(err)
	}
}

// reply reads a simple reply without payload and returns its error.
func (rc *rawClient) reply(t *testing.T, handle uint64) uint32 {
	t.Helper()
	rc.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	var hdr [16]byte
	if _, err := io.ReadFull(rc.r, hdr[:]); err != nil {
		t.Fatalf("NBD reply: %v", err)
	}
	if binenc.BigEndian.Uint32(hdr[:]) != 0x67446698 || binenc.BigEndian.Uint64(hdr[8:]) != handle {
		t.Fatalf("NBD reply header %x", hdr)
	}
	return binenc.BigEndian.Uint32(hdr[4:])
}

// TestDaemon_SignalsAndNotify: with NOTIFY_SOCKET set the daemon says
// READY=1 once it serves (resources of --up already up) and STOPPING=1
// when it stops. SIGTERM with an NBD client connected stops gracefully:
// exit 0, metadata clean, the client's writes on disk. When the graceful
// stop cannot finish (a client that does not read its reply), a second
// signal stops at once and leaves the metadata unclean; the next up
// applies the activity log.
func TestDaemon_SignalsAndNotify(t *testing.T) {
	// nbdsh is "python3 -m nbd" with whichever python3 comes first in PATH;
	// the system's has the module.
	need(t, "/usr/bin/python3")
	if err := exec.Command("/usr/bin/python3", "-c", "import nbd").Run(); err != nil {
		unavailable(t, "needs python3-libnbd (nbdsh)")
	}
	n := newNode(t, 64*mib, 7)
	nt := listenNotify(t)
	env := []string{"NOTIFY_SOCKET=" + nt.path}

	d := n.daemon(env, "--up", "r0")
	ready := nt.expect(t, "READY=1")
	if st := n.status(); st.Disk != "Inconsistent" { // --up r0 happened before READY=1
		t.Errorf("at READY=1 (%q): disk %s, want Inconsistent", ready, st.Disk)
	}
	n.must("primary", "--force", "r0")
	// A real client: writes 64 KiB at 0, flushes, stays connected.
	cl := start(t, "/usr/bin/python3", "-m", "nbd", "-u", n.uri(), "-c",
		`h.pwrite(b"\x5a" * 65536, 0); h.flush(); print("written", flush=True); import time; time.sleep(600)`)
	eventually(t, 30*time.Second, "nbdsh writes", func() (bool, string) {
		if cl.exited() {
			t.Fatalf("nbdsh exited: %v\n%s", cl.err, cl.out)
		}
		return strings.Contains(cl.out.String(), "written"), cl.out.String()
	})
	if st := n.status(); len(st.Clients) != 1 {
		t.Fatalf("clients while nbdsh is connected: %q", st.Clients)
	}
	began := time.Now()
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM with a client connected: %v\n%s", err, d.out)
	}
	if took := time.Since(began); took > 10*time.Second {
		t.Errorf("graceful stop with an idle client took %v", took)
	}
	nt.expect(t, "STOPPING=1")
	for _, want := range []string{`msg="shutting down" signal=terminated`, `msg=stopped`} {
		if !strings.Contains(d.out.String(), want) {
			t.Errorf("daemon log lacks %s:\n%s", want, d.out)
		}
	}
	for _, sock := range []string{n.sock(), filepath.Join(n.runDir, "control.sock")} {
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind by a graceful stop: %v", sock, err)
		}
	}
	text, md := n.dumpMD()
	checkMDText(t, text, true, nil)
	if !md.Clean || slices.Contains(md.Flags, "primary") || md.Bitmap.BitsSet != 16 {
		t.Errorf("metadata after a graceful stop: %+v; want clean, not primary, 16 blocks out of sync\n%s", md, text)
	}
	got := make([]byte, 65536)
	if f, err := os.Open(n.disk); err != nil {
		t.Fatal(err)
	} else {
		f.ReadAt(got, 0)
		f.Close()
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 65536)) {
		t.Errorf("nbdsh's write is not on the disk")
	}
	cl.stop(syscall.SIGKILL)

	// Second start: the clean stop of a Primary left the disk UpToDate.
	d = n.daemon(env, "--up", "r0")
	nt.expect(t, "READY=1")
	n.must("primary", "r0")
	rc := dialNBD(t, n.sock(), "r0")
	rc.send(t, 1, 1, 8*mib, 65536, bytes.Repeat([]byte{0xa5}, 65536)) // extent 2
	if e := rc.reply(t, 1); e != 0 {
		t.Fatalf("NBD write: error %d", e)
	}
	// A 32 MiB read whose reply the client never reads: the server reads
	// the disk, then blocks writing the reply, so a graceful stop waits.
	rc.send(t, 0, 2, 0, 32*mib, nil)
	eventually(t, 30*time.Second, "the 32 MiB read reaches the disk", func() (bool, string) {
		st := n.status()
		return st.Counters.DR >= 32*1024, fmt.Sprintf("%+v", st.Counters)
	})
	d.signal(syscall.SIGTERM)
	nt.expect(t, "STOPPING=1")
	if d.exited() {
		t.Fatalf("the daemon stopped gracefully although a reply could not be sent:\n%s", d.out)
	}
	began = time.Now()
	d.signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the daemon still runs 10s after a second signal:\n%s", d.out)
	}
	t.Logf("second signal: the daemon exited after %v: %v", time.Since(began), d.err)
	if d.err == nil || !strings.Contains(d.out.String(), "stopped at once by a second signal") {
		t.Errorf("a hard stop exited %v; want a failure saying so:\n%s", d.err, d.out)
	}
	for _, want := range []string{`level=WARN msg="second signal: stopping at once[^"]*" signal=terminated`,
		`level=WARN msg="abandoned: the metadata is left unclean[^"]*" resource=r0`} {
		if !regexp.MustCompile(want).MatchString(d.out.String()) {
			t.Errorf("daemon log lacks %s:\n%s", want, d.out)
		}
	}
	rc.c.Close()
	text, md = n.dumpMD()
	checkMDText(t, text, false, []uint64{2})
	if md.Clean || !slices.Contains(md.Flags, "primary") { // as after a crash
		t.Errorf("metadata after a hard stop of a Primary: %+v; want unclean, primary\n%s", md, text)
	}

	// Third start: up applies the activity log: extent 2 whole, plus the 16
	// blocks the graceful stop had written to the bitmap.
	d = n.daemon(env)
	nt.expect(t, "READY=1")
	n.must("up", "r0")
	if want := `msg="the last stop was unclean: activity log applied" resource=r0 extents=1 `; !strings.Contains(d.out.String(), want) {
		t.Errorf("daemon log lacks %s:\n%s", want, d.out)
	}
	if st := n.status(); st.Disk != "UpToDate" || st.OutOfSyncBytes != extentSize+65536 {
		t.Errorf("after up: disk %s, %d bytes out of sync; want UpToDate, %d", st.Disk, st.OutOfSyncBytes, extentSize+65536)
	}
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.out)
	}
	nt.expect(t, "STOPPING=1")
}
