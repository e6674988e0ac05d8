//go:build integration

package integration

// Disks that fail (issue #8, rows D1–D3): a node's disk is a file that
// nbdfuse serves from nbdkit, whose error filter fails requests while a
// flag file exists and whose pause filter freezes them on command.

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fuseDisk serves a fresh sparse image of size bytes through nbdkit as a
// plain file (fuseMount) and returns the file's path. args are nbdkit's
// (filters, "file", the image, the filters' parameters); "IMG" in them is
// replaced by the image's path.
func fuseDisk(t *testing.T, dir string, size int64, args ...string) string {
	t.Helper()
	need(t, "nbdkit", "nbdfuse", "fusermount3")
	img := sparseFile(t, dir, "lower.img", size)
	for i, a := range args {
		args[i] = strings.ReplaceAll(a, "IMG", img)
	}
	return fuseMount(t, dir, "disk", size, nil, append([]string{"--socket-activation", "nbdkit"}, args...)...)
}

// pauseCtl sends a command to nbdkit's pause filter ('p' pause, 'r'
// resume) and waits for its answer (upper case: done).
func pauseCtl(t *testing.T, sock string, cmd byte) {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatalf("pause control: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte{cmd}); err != nil {
		t.Fatalf("pause control: %v", err)
	}
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil || b[0] != cmd-'a'+'A' {
		t.Fatalf("pause control %q: answer %q, %v", cmd, b[:], err)
	}
}

// writeBlocks writes count blocks of bs random bytes from block first on,
// over one NBD connection to the node; each must succeed, within limit.
func (n *rnode) writeBlocks(first, count int, bs int64, limit time.Duration) {
	n.t.Helper()
	rc := dialNBD(n.t, n.sock(), "r0")
	defer rc.c.Close()
	buf := make([]byte, bs)
	for i := first; i < first+count; i++ {
		rand.Read(buf)
		start := time.Now()
		if err := rc.writeErr(uint64(i), int64(i)*bs, buf); err != nil {
			n.t.Fatalf("%s: write of block %d: %v", n.name, i, err)
		}
		if d := time.Since(start); d > limit {
			n.t.Fatalf("%s: write of block %d took %v, want within %v", n.name, i, d, limit)
		}
	}
	rc.send(n.t, 3, 1<<40, 0, 0, nil) // NBD_CMD_FLUSH
	if e := rc.reply(n.t, 1<<40); e != 0 {
		n.t.Fatalf("%s: flush: error %d", n.name, e)
	}
}

// TestDiskFail_SecondaryEIO (D1): beta's disk fails every request while
// alpha writes (on-io-error detach, the default). Beta goes Failed, then
// Diskless, and keeps its connection loop; alpha's writes all succeed and
// are marked out of sync, exactly the 2 MiB written after the fault. Once
// the disk is healed, `attach` on beta resyncs exactly what alpha marked
// (not the disk), and the disks end equal.
func TestDiskFail_SecondaryEIO(t *testing.T) {
	for _, proto := range []string{"A", "C"} {
		t.Run("protocol "+proto, func(t *testing.T) {
			dir := t.TempDir()
			fail := filepath.Join(dir, "fail")
			bdisk := fuseDisk(t, dir, 64*mib, "--filter=error", "file", "IMG", "error=EIO", "error-rate=100%", "error-file="+fail)
			c := newClusterDisks(t, 64*mib, "net { protocol "+proto+"; } disk { c-plan-ahead 0; resync-rate 500M; }",
				map[string]string{"beta": bdisk})
			c.skipInitialSync()
			const bs = 64 << 10
			c.alpha.writeBlocks(0, 32, bs, 30*time.Second) // 2 MiB, flushed: on both disks
			if st := c.alpha.status(); st.OutOfSyncBytes != 0 {
				t.Fatalf("alpha marks %d bytes before the fault", st.OutOfSyncBytes)
			}
			if err := os.WriteFile(fail, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			detected := time.Now()
			// The next 2 MiB: the first write that reaches beta fails there.
			c.alpha.writeBlocks(32, 32, bs, 30*time.Second)
			c.beta.waitState(30*time.Second, "", "Diskless", "")
			// Measured after 32 writes and the state's event: an upper
			// bound of the detection.
			took := time.Since(detected)
			t.Logf("beta Diskless %v after the fault", took.Round(time.Millisecond))
			if took > 2*faultMargin {
				t.Errorf("beta Diskless %v after the fault, want within %v", took, 2*faultMargin)
			}
			if log := c.beta.d.out.String(); !strings.Contains(log, "Local IO failed in replicated write. Detaching...") ||
				!strings.Contains(log, "disk( UpToDate -> Failed )") || !strings.Contains(log, "disk( Failed -> Diskless )") {
				t.Fatalf("beta's log lacks the detach after the I/O error:\n%s", tail(log, 40))
			}
			st := c.beta.status()
			if st.CState == "StandAlone" {
				t.Fatalf("beta stopped connecting after detaching: %+v", st)
			}
			a := c.alpha.waitState(30*time.Second, "", "UpToDate", "DUnknown")
			const want = 32 * bs
			if got := c.alpha.status().OutOfSyncBytes; got != want {
				t.Fatalf("alpha marks %d bytes out of sync, want exactly the %d written after the fault (%+v)", got, want, a)
			}
			// More writes while beta is diskless: marked too.
			c.alpha.writeBlocks(64, 16, bs, 30*time.Second)
			if got := c.alpha.status().OutOfSyncBytes; got != want+16*bs {
				t.Fatalf("alpha marks %d bytes out of sync, want %d", got, want+16*bs)
			}
			os.Remove(fail)
			c.beta.must("attach", "r0")
			c.beta.must("wait-connect", "--timeout", "60s", "r0")
			c.beta.must("wait-sync", "--timeout", "2m", "r0")
			c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
			c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
			if got := c.beta.status().Counters.DW * 1024; got != want+16*bs {
				t.Errorf("beta wrote %d bytes in the resync after the reattach, want exactly the %d marked", got, want+16*bs)
			}
			c.alpha.demote()
			c.sameData()
		})
	}
}

// failingPrimary is a cluster of 64 MiB disks whose alpha's disk fails
// (nbdkit's error filter with rate, e.g. "error-rate=100%") while the
// returned flag file exists; with externalMeta its metadata is on a
// healthy disk of its own. Both start with equal disks, alpha Primary.
func failingPrimary(t *testing.T, opts, rate string, externalMeta bool) (*cluster, string) {
	t.Helper()
	dir := t.TempDir()
	fail := filepath.Join(dir, "fail")
	disks := map[string]string{"alpha": fuseDisk(t, dir, 64*mib, "--filter=error", "file", "IMG", "error=EIO", rate, "error-file="+fail)}
	if externalMeta {
		disks["alpha:meta"] = sparseFile(t, dir, "meta", 32*mib)
	}
	c := newClusterDisks(t, 64*mib, opts, disks)
	c.skipInitialSync()
	return c, fail
}

// TestDiskFail_PrimaryPassOn (D2, pass_on): alpha's (the Primary's) disk
// fails. The NBD client never gets success for data that landed nowhere:
// a failed read or write gets EIO, and each failed write's blocks are
// marked out of sync and resynced from beta, which has them, once the
// disk heals.
func TestDiskFail_PrimaryPassOn(t *testing.T) {
	// The metadata is on a healthy disk of its own: the data errors alone.
	c, fail := failingPrimary(t, "net { protocol C; } disk { on-io-error pass_on; c-plan-ahead 0; resync-rate 500M; }",
		"error-rate=100%", true)
	c.alpha.writeBlocks(0, 16, 64<<10, 30*time.Second)
	if err := os.WriteFile(fail, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rc := dialNBD(t, c.alpha.sock(), "r0")
	data := bytes.Repeat([]byte{0xa5}, 64<<10)
	err := rc.writeErr(1, 8*mib, data)
	if err == nil || !strings.Contains(err.Error(), "error 5") {
		t.Fatalf("a write to the failing disk: %v, want NBD error 5 (EIO)", err)
	}
	rc.send(t, 0, 2, 20*mib, 4096, nil) // a read of a block not cached
	if e := rc.reply(t, 2); e != 5 {
		t.Fatalf("a read from the failing disk: error %d, want EIO (5)", e)
	}
	st := c.alpha.status()
	if st.Disk != "UpToDate" || st.Role != "Primary" {
		t.Fatalf("alpha after the errors: %s %s, want Primary UpToDate (errors passed on)", st.Role, st.Disk)
	}
	if st.OutOfSyncBytes != 64<<10 {
		t.Fatalf("alpha marks %d bytes out of sync, want the 65536 of the failed write", st.OutOfSyncBytes)
	}
	os.Remove(fail)
	rc.c.Close()
	// The failed write reached beta (it is replicated before the local
	// write): beta has the data the client was told failed. A resync
	// (alpha's marks) makes the disks equal again; demoted, alpha takes
	// beta's copy of the marked blocks.
	c.alpha.demote()
	before := c.alpha.status().Counters.DW
	c.alpha.must("invalidate", "--reset-bitmap=no", "r0")
	c.alpha.must("wait-sync", "--timeout", "2m", "r0")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	if got := (c.alpha.status().Counters.DW - before) * 1024; got != 64<<10 {
		t.Errorf("alpha took %d bytes from beta, want the 65536 of the failed write", got)
	}
	c.sameData()
}

// readBlock reads n bytes at off through rc (NBD_CMD_READ, handle h).
func readBlock(t *testing.T, rc *rawClient, h uint64, off int64, n int) []byte {
	t.Helper()
	rc.send(t, 0, h, uint64(off), uint32(n), nil)
	if e := rc.reply(t, h); e != 0 {
		t.Fatalf("NBD read of %d bytes at %d: error %d", n, off, e)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(rc.r, buf); err != nil {
		t.Fatal(err)
	}
	return buf
}

// TestDiskFail_DisklessPrimary (D2, detach): alpha's disk (with its
// internal metadata, or with the metadata on a healthy disk of its own)
// fails every request while alpha is Primary and beta UpToDate. With on-io-error detach (the default) the client sees no
// error at all: alpha detaches and serves reads and writes from beta's
// disk (Primary, Diskless/UpToDate). Beta starts a new generation and
// marks every write it takes meanwhile. Demoted, alpha ends its session;
// its disk healed and attached, it resyncs as SyncTarget what beta marked
// (and its own activity log), not the disk.
func TestDiskFail_DisklessPrimary(t *testing.T) {
	for _, tc := range []struct {
		name         string
		externalMeta bool
		readFirst    bool // the first request to fail is a read (else a write)
	}{
		{"internal metadata", false, false},
		{"external metadata, data errors only", true, false},
		{"a read fails first", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) { disklessPrimary(t, tc.externalMeta, tc.readFirst) })
	}
}

func disklessPrimary(t *testing.T, externalMeta, readFirst bool) {
	c, fail := failingPrimary(t, "net { protocol A; } disk { c-plan-ahead 0; resync-rate 500M; }", "error-rate=100%", externalMeta)
	const bs = 64 << 10
	rc := dialNBD(t, c.alpha.sock(), "r0")
	first := bytes.Repeat([]byte{0x11}, bs)
	if err := rc.writeErr(1, 0, first); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fail, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if readFirst {
		// A block never written nor read, so in no cache: zeros on
		// both disks; the client gets beta's, read after the switch.
		if got := readBlock(t, rc, 5, 48*mib, bs); !bytes.Equal(got, make([]byte, bs)) {
			t.Fatalf("a read when the disk failed: %x…, want beta's zeros", got[:8])
		}
		if st := c.alpha.waitState(30*time.Second, "Connected", "Diskless", "UpToDate"); st.Role != "Primary" {
			t.Fatalf("alpha after a failed read: %+v, want a diskless Primary", st)
		}
	}
	// 8 MiB: a new activity-log extent, whose transaction fails.
	second := bytes.Repeat([]byte{0x22}, bs)
	if err := rc.writeErr(2, 8*mib, second); err != nil {
		t.Fatalf("a write when the disk failed: %v, want success through the peer", err)
	}
	st := c.alpha.waitState(30*time.Second, "Connected", "Diskless", "UpToDate")
	if st.Role != "Primary" {
		t.Fatalf("alpha: %+v, want a diskless Primary", st)
	}
	if got := readBlock(t, rc, 3, 8*mib, bs); !bytes.Equal(got, second) {
		t.Fatalf("reading back the write through the peer: %x…", got[:8])
	}
	if got := readBlock(t, rc, 4, 0, bs); !bytes.Equal(got, first) {
		t.Fatalf("reading the older write through the peer: %x…", got[:8])
	}
	// More writes and a flush, served by beta: 1 MiB at 16 MiB.
	for i := range 16 {
		if err := rc.writeErr(uint64(10+i), 16*mib+int64(i)*bs, bytes.Repeat([]byte{byte(i)}, bs)); err != nil {
			t.Fatalf("write %d through the peer: %v", i, err)
		}
	}
	rc.send(t, 3, 99, 0, 0, nil)
	if e := rc.reply(t, 99); e != 0 {
		t.Fatalf("flush through the peer: error %d", e)
	}
	b := c.beta.status()
	if want := uint64(bs + 16*bs); b.OutOfSyncBytes < want || b.OutOfSyncBytes > want+bs {
		t.Fatalf("beta marks %d bytes, want the %d written since alpha's disk was detached", b.OutOfSyncBytes, want)
	}
	if log := c.beta.d.out.String(); !strings.Contains(log, "the Primary's disk failed: new current UUID") {
		t.Fatalf("beta did not start a new generation:\n%s", tail(log, 30))
	}
	if log := c.alpha.d.out.String(); !strings.Contains(log, "this Primary serves reads and writes from the peer's disk") {
		t.Fatalf("alpha's log lacks the switch:\n%s", tail(log, 30))
	}
	rc.c.Close()
	marked := b.OutOfSyncBytes
	c.alpha.demote()
	c.alpha.waitState(30*time.Second, "", "Diskless", "")
	code, _, errOut := c.alpha.cli("primary", "r0")
	if code == 0 {
		t.Fatalf("a demoted diskless node was promoted")
	}
	t.Logf("promoting the diskless node: %s", strings.TrimSpace(errOut))
	os.Remove(fail)
	c.alpha.must("attach", "r0")
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	got := c.alpha.status().Counters.DW * 1024
	t.Logf("alpha resynced %d bytes; beta had marked %d", got, marked)
	if got < marked || got > marked+2*4*mib {
		t.Errorf("alpha resynced %d bytes, want beta's %d marked plus at most its own two activity-log extents", got, marked)
	}
	c.sameData()
}

// freezableCluster is a cluster of 64 MiB disks, protocol C with
// disk-timeout 2 s, in which the device named key ("beta": beta's disk,
// "alpha:meta": alpha's external metadata, of size bytes) is served
// through nbdkit's pause filter. Both nodes start UpToDate, alpha Primary,
// with 1 MiB written and flushed at 0. freeze makes the device's requests
// wait; thaw lets them go (and is done at the end of the test if not
// before).
func freezableCluster(t *testing.T, key string, size int64) (c *cluster, freeze, thaw func()) {
	t.Helper()
	dir := t.TempDir()
	ctl := filepath.Join(dir, "pause.sock")
	dev := fuseDisk(t, dir, size, "--filter=pause", "file", "IMG", "pause-control="+ctl)
	c = newClusterDisks(t, 64*mib, "net { protocol C; } disk { disk-timeout 20; c-plan-ahead 0; resync-rate 500M; }",
		map[string]string{key: dev})
	frozen := false
	freeze = func() { pauseCtl(t, ctl, 'p'); frozen = true }
	thaw = func() { pauseCtl(t, ctl, 'r'); frozen = false }
	t.Cleanup(func() {
		if frozen {
			thaw()
		}
	})
	c.skipInitialSync()
	c.alpha.writeBlocks(0, 16, 64<<10, 30*time.Second)
	return c, freeze, thaw
}

// TestDiskFail_SecondaryHung (D3): beta's disk stops answering (nbdkit's
// pause filter) while alpha writes, with disk-timeout 2 s on beta. No
// write of alpha's waits for more than a bound (protocol A: the send
// buffer and beta's failure, not the hung disk, bound it); beta's disk
// goes Failed once the timeout passed, the session ends and alpha marks
// what beta did not confirm; when the disk answers again beta detaches,
// and after `attach` the resync makes the disks equal.
func TestDiskFail_SecondaryHung(t *testing.T) {
	c, freeze, thaw := freezableCluster(t, "beta", 64*mib)
	const bs = 64 << 10
	freeze()
	paused := time.Now()
	// Protocol C: the first write waits for beta, whose disk hangs, until
	// disk-timeout fails beta's disk and the session; none waits longer
	// than the timeout plus the detection's margin.
	c.alpha.writeBlocks(16, 16, bs, 15*time.Second)
	st := c.beta.waitState(30*time.Second, "", "Failed", "")
	detected := time.Since(paused)
	t.Logf("beta Failed %v after the disk froze (disk-timeout 2 s): %+v", detected.Round(time.Millisecond), st.CState)
	// The writes above took part of the time: the bound is the timeout
	// and the detection's margin.
	if detected > 2*time.Second+2*faultMargin {
		t.Errorf("disk-timeout fired %v after the freeze, want within 2 s + %v", detected, 2*faultMargin)
	}
	if log := c.beta.d.out.String(); !strings.Contains(log, "Local IO failed in disk-timeout") {
		t.Fatalf("beta's log lacks the disk-timeout failure:\n%s", tail(log, 40))
	}
	c.alpha.waitState(30*time.Second, "", "UpToDate", "DUnknown")
	if got := c.alpha.status().OutOfSyncBytes; got < bs || got > 16*bs {
		t.Fatalf("alpha marks %d bytes, want between one write and the 16 written since the freeze", got)
	}
	thaw()
	c.beta.waitState(30*time.Second, "", "Diskless", "")
	c.beta.must("attach", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.alpha.demote()
	c.sameData()
}

// TestDiskFail_PrimaryMetadataEIO (D2, metadata, pass_on): the Primary's
// disk, which holds its internal metadata, fails writes. With pass_on the
// Primary does not go diskless, but metadata errors fail the disk under
// every policy: the write that needs an activity-log transaction gets
// EIO, the metadata is dead until the next attach, so the disk goes
// Failed and every later request fails at once (not after queueing).
// Demoted, alpha detaches; healed and attached again it reconnects, and
// the resync makes the disks equal.
func TestDiskFail_PrimaryMetadataEIO(t *testing.T) {
	c, fail := failingPrimary(t, "net { protocol C; } disk { on-io-error pass_on; c-plan-ahead 0; resync-rate 500M; }",
		"error-pwrite-rate=100%", false)
	c.alpha.writeBlocks(0, 16, 64<<10, 30*time.Second) // extent 0 is now in the activity log
	if err := os.WriteFile(fail, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rc := dialNBD(t, c.alpha.sock(), "r0")
	// 40 MiB: an extent not in the activity log, so a transaction is written.
	if err := rc.writeErr(1, 40*mib, make([]byte, 4096)); err == nil || !strings.Contains(err.Error(), "error 5") {
		t.Fatalf("a write needing the failed metadata: %v, want NBD error 5 (EIO)", err)
	}
	st := c.alpha.waitState(30*time.Second, "", "Failed", "")
	if st.Role != "Primary" {
		t.Fatalf("alpha %s after its metadata failed, want Primary until demoted", st.Role)
	}
	for i, off := range []int64{0, 20 * mib} { // a hot extent too: nothing goes to the failed disk
		start := time.Now()
		err := rc.writeErr(uint64(2+i), off, make([]byte, 4096))
		if err == nil || !strings.Contains(err.Error(), "error 5") {
			t.Fatalf("a write at %d to the Failed disk: %v, want EIO", off, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("a write to the Failed disk took %v to fail, want at once", d)
		}
	}
	rc.c.Close()
	c.alpha.demote()
	c.alpha.waitState(30*time.Second, "", "Diskless", "")
	if b := c.beta.waitState(30*time.Second, "", "UpToDate", "DUnknown"); b.Role != "Secondary" {
		t.Fatalf("beta: %+v", b)
	}
	os.Remove(fail)
	c.alpha.must("attach", "r0") // the counters start again
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	// Alpha's metadata died unclean: its activity log (extent 0; the
	// transaction for 40 MiB failed) comes back from beta, which started
	// a new generation when alpha's disk failed.
	got := c.alpha.status().Counters.DW * 1024
	t.Logf("after the reattach alpha resynced %d bytes", got)
	if got > 4*mib {
		t.Errorf("alpha resynced %d bytes, want at most its activity-log extent (%d)", got, 4*mib)
	}
	c.sameData()
}

// TestDiskFail_SecondarySlow (D3, a slow disk): every write to beta's
// disk takes 100 ms (nbdkit's delay filter) while fio writes 4 MiB through
// alpha under protocol C with 8 requests in flight, and disk-timeout 2 s.
// A slow disk is not a failed one: beta stays Connected/UpToDate (the
// watchdog sees requests complete), every write succeeds, the queues stay
// bounded by what fio keeps in flight, and the disks end equal.
func TestDiskFail_SecondarySlow(t *testing.T) {
	need(t, "fio")
	dir := t.TempDir()
	bdisk := fuseDisk(t, dir, 64*mib, "--filter=delay", "file", "IMG", "delay-write=100ms")
	c := newClusterDisks(t, 64*mib, "net { protocol C; } disk { disk-timeout 20; c-plan-ahead 0; resync-rate 500M; }",
		map[string]string{"beta": bdisk})
	c.skipInitialSync()
	ra, rb := c.alpha.record(), c.beta.record()
	started := time.Now()
	fio := startIn(t, t.TempDir(), "fio", "--name=slow", "--rw=randwrite", "--bs=64k", "--size=4m", "--offset=8m",
		"--ioengine=nbd", "--iodepth=8", "--uri="+c.alpha.uri(), "--verify=crc32c", "--verify_state_save=0", "--do_verify=0")
	var peakPE, peakAP int64
	for !fio.exited() {
		st := c.alpha.status()
		peakPE, peakAP = max(peakPE, st.Counters.PE), max(peakAP, st.Counters.AP)
		if time.Since(started) > 2*time.Minute {
			t.Fatalf("fio did not write 4 MiB within 2 minutes to a disk 100 ms a write")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := fio.wait(time.Second); err != nil {
		t.Fatalf("fio: %v\n%s", err, fio.out)
	}
	took := time.Since(started)
	t.Logf("4 MiB in %v; at the peak %d requests awaiting the peer, %d in the resource; alpha %s; beta %s",
		took.Round(time.Millisecond), peakPE, peakAP, strings.Join(ra.states(started), " → "), strings.Join(rb.states(started), " → "))
	// 64 writes of 100 ms each on beta: at least 0.8 s with 8 in flight.
	if took < 800*time.Millisecond {
		t.Errorf("4 MiB written in %v: the disk was not slow (the delay filter not in place?)", took)
	}
	// In the resource: what fio keeps in flight. Awaiting the peer: those,
	// plus writes already acknowledged whose epoch's barrier ack is still
	// to come (P5 measured 16–25 with the same 8 in flight): bounded by
	// what fio keeps in flight and the few epochs under way, not by the
	// 4 MiB written.
	if peakAP > 8 {
		t.Errorf("%d application requests in the resource at the peak: more than fio's 8", peakAP)
	}
	if peakPE > 48 {
		t.Errorf("%d requests awaiting the peer at the peak", peakPE)
	}
	for _, r := range []*eventRecorder{ra, rb} {
		if st := r.states(started); len(st) != 1 || st[0] != "Connected" {
			t.Errorf("%s went %v while the disk was slow", r.n.name, st)
		}
	}
	if log := c.beta.d.out.String(); strings.Contains(log, "Local IO failed") {
		t.Fatalf("beta failed its slow disk:\n%s", tail(log, 20))
	}
	if st := c.beta.status(); st.Disk != "UpToDate" || c.alpha.status().OutOfSyncBytes != 0 {
		t.Fatalf("after the slow writes: beta %s, alpha marks %d bytes", st.Disk, c.alpha.status().OutOfSyncBytes)
	}
	c.alpha.demote()
	c.sameData()
}

// TestDiskFail_PrimaryMetadataHung (D3, the Primary): alpha's metadata
// device (external, on a disk of its own) stops answering (nbdkit's pause
// filter) while alpha is Primary, with disk-timeout 2 s. A write that
// needs an activity-log transaction hangs; disk-timeout fails the disk
// (no diversion to the peer: a request hung on the disk cannot be
// drained), and from then on requests fail at once with EIO rather than
// queue behind the hung one: nothing deadlocks and nothing piles up. When
// the device answers again the hung write ends; demoted, alpha detaches,
// attaches again and the resync makes the disks equal.
func TestDiskFail_PrimaryMetadataHung(t *testing.T) {
	c, freeze, thaw := freezableCluster(t, "alpha:meta", 32*mib) // extent 0 is in the activity log
	const bs = 64 << 10
	freeze()
	paused := time.Now()
	hung := dialNBD(t, c.alpha.sock(), "r0")
	hungDone := make(chan error, 1)
	hungData := bytes.Repeat([]byte{0x5a}, bs)
	go func() { hungDone <- hung.writeErr(1, 40*mib, hungData) }() // a new extent: a transaction
	t.Cleanup(func() { hung.c.Close() })
	st := c.alpha.waitState(30*time.Second, "", "Failed", "")
	detected := time.Since(paused)
	t.Logf("alpha Failed %v after its metadata froze (disk-timeout 2 s): %s %s", detected.Round(time.Millisecond), st.Role, st.CState)
	if detected < 2*time.Second || detected > 2*time.Second+2*faultMargin {
		t.Errorf("disk-timeout fired %v after the freeze, want 2 s to 2 s + %v", detected, 2*faultMargin)
	}
	if log := c.alpha.d.out.String(); !strings.Contains(log, "Local IO failed in disk-timeout") {
		t.Fatalf("alpha's log lacks the disk-timeout failure:\n%s", tail(log, 40))
	}
	// Beta holds the only good copy from here: a new generation, so that
	// alpha's disk, attached again, is recognisably older.
	eventually(t, 30*time.Second, "beta's new current UUID", func() (bool, string) {
		log := c.beta.d.out.String()
		return strings.Contains(log, "the Primary's disk failed: new current UUID"), tail(log, 5)
	})
	select {
	case err := <-hungDone:
		t.Fatalf("the write on the frozen metadata ended (%v) while the device was frozen", err)
	default:
	}
	// Every new request fails at once: a write to the hot extent (no
	// transaction), to another new one, and a read.
	rc := dialNBD(t, c.alpha.sock(), "r0")
	defer rc.c.Close()
	for i, off := range []int64{0, 24 * mib} {
		start := time.Now()
		if err := rc.writeErr(uint64(2+i), off, make([]byte, 4096)); err == nil || !strings.Contains(err.Error(), "error 5") {
			t.Fatalf("a write at %d to the Failed disk: %v, want EIO", off, err)
		}
		if d := time.Since(start); d > faultMargin {
			t.Fatalf("a write to the Failed disk took %v to fail, want at once", d)
		}
	}
	start := time.Now()
	rc.send(t, 0, 9, 32*mib, 4096, nil)
	if e := rc.reply(t, 9); e != 5 {
		t.Fatalf("a read from the Failed disk: error %d, want EIO (5)", e)
	}
	if d := time.Since(start); d > faultMargin {
		t.Fatalf("a read from the Failed disk took %v to fail, want at once", d)
	}
	// Nothing piles up: one request is held, the hung one.
	if st := c.alpha.status(); st.Counters.AP > 1 || st.Counters.PE > 1 {
		t.Fatalf("alpha holds %d application requests, %d at the peer, with one hung: %+v", st.Counters.AP, st.Counters.PE, st)
	}
	thaw()
	var hungErr error
	select {
	case hungErr = <-hungDone:
		t.Logf("the hung write ended when the metadata answered again: %v", hungErr)
	case <-time.After(30 * time.Second):
		t.Fatalf("the hung write did not end within 30 s of the metadata answering again")
	}
	rc.c.Close()
	hung.c.Close()
	c.alpha.demote()
	c.alpha.waitState(30*time.Second, "", "Diskless", "")
	c.alpha.must("attach", "r0") // the counters start again
	c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	// Alpha's activity log (unclean: the metadata failed) holds extent 0
	// and, if its transaction was written, the hung write's: at most two
	// extents come back from beta.
	got := c.alpha.status().Counters.DW * 1024
	t.Logf("after the reattach alpha resynced %d bytes", got)
	if got > 2*4*mib {
		t.Errorf("alpha resynced %d bytes, want at most its two activity-log extents (%d)", got, 2*4*mib)
	}
	c.sameData()
	if hungErr == nil { // acknowledged: it is on the disks
		f, err := os.Open(c.beta.disk)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got := make([]byte, bs)
		if _, err := f.ReadAt(got, 40*mib); err != nil || !bytes.Equal(got, hungData) {
			t.Errorf("the hung write was acknowledged but beta's disk holds %x… at 40 MiB (%v)", got[:8], err)
		}
	}
}
