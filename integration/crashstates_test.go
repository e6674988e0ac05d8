//go:build integration

package integration

// C1 (reference/testing.md §3.7, §5): the crash states of a Primary's
// metadata, recorded with real tools. nbd-server serves alpha's metadata
// device with a transaction log that keeps the data of every write
// (transactionlog + datalog); nbdfuse makes it a file, alpha's external
// `meta-disk`. A workload through NBD churns the activity log and the
// bitmap; then every prefix of the log is replayed with nbd-trplay onto a
// zeroed image and opened, and invariant I1 is checked at each. This is
// the real-process counterpart of metadisk's in-process crash tests
// (metadisk/crash_test.go), which also drop and tear unflushed blocks out
// of order; a log prefix models a device that persists its writes in the
// order they arrived.

import (
	"bytes"
	crand "crypto/rand"
	binenc "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
)

// fuseMount runs `nbdfuse [opts] dir/fuse/file mode...` and waits until
// the file has the given size. At the end of the test the file system is
// unmounted, which ends nbdfuse.
func fuseMount(t *testing.T, dir, file string, size int64, opts []string, mode ...string) (path string) {
	t.Helper()
	mnt := filepath.Join(dir, "fuse")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(mnt, file)
	fuse := start(t, "nbdfuse", slices.Concat(opts, []string{path}, mode)...)
	t.Cleanup(func() {
		// The daemons were stopped first (cleanups run last-in first-out),
		// but the kernel may release their files a moment later: busy
		// unmounts are retried.
		var out []byte
		deadline := time.Now().Add(20 * time.Second)
		for {
			var err error
			if out, err = exec.Command("fusermount3", "-u", mnt).CombinedOutput(); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		select {
		case <-fuse.done:
			return
		case <-time.After(10 * time.Second):
		}
		// nbdfuse, or the nbdkit it started, lingers (seen under load):
		// its process group is asked to end.
		fuse.signalGroup(syscall.SIGTERM)
		select {
		case <-fuse.done:
			t.Logf("nbdfuse on %s ended only on SIGTERM after the unmount", mnt)
		case <-time.After(10 * time.Second):
			t.Errorf("nbdfuse on %s still runs 20 s after the unmount (fusermount3: %s)", mnt, out)
		}
	})
	eventually(t, 20*time.Second, "nbdfuse", func() (bool, string) {
		fi, err := os.Stat(path)
		if fuse.exited() {
			t.Fatalf("nbdfuse exited: %v\n%s", fuse.err, fuse.out)
		}
		return err == nil && fi.Size() == size, fmt.Sprint(err)
	})
	return path
}

// txlog is nbd-server's transaction log (datalog = true): records of
// requests (28 bytes, the data of a write after it), replies (16 bytes)
// and trace options (28 bytes).
type txlog struct {
	path string
	ops  []txOp
}

// txOp is one logged request that changes the image or flushes it.
type txOp struct {
	flush      bool
	off, n     int64 // bytes
	blocksPast int   // 4 KiB blocks of data logged up to the end of this request: nbd-trplay's -m
	end        int64 // byte offset of the record's end in the log
}

const (
	nbdRequestMagic  = 0x25609513
	nbdReplyMagic    = 0x67446698
	nbdTracelogMagic = 0x25609514
)

func readTxlog(t *testing.T, path string) txlog {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l := txlog{path: path}
	blocks := 0
	for p := 0; p < len(b); {
		if len(b)-p < 16 {
			t.Fatalf("transaction log: %d bytes left at %d", len(b)-p, p)
		}
		switch magic := binenc.BigEndian.Uint32(b[p:]); magic {
		case nbdReplyMagic:
			p += 16
		case nbdTracelogMagic:
			p += 28
		case nbdRequestMagic:
			if len(b)-p < 28 {
				t.Fatalf("transaction log: a request cut at %d", p)
			}
			typ := binenc.BigEndian.Uint32(b[p+4:]) & 0xffff
			off := int64(binenc.BigEndian.Uint64(b[p+16:]))
			n := int64(binenc.BigEndian.Uint32(b[p+24:]))
			p += 28
			switch typ {
			case 1: // NBD_CMD_WRITE, its data follows
				p += int(n)
				blocks += int(n / 4096)
				l.ops = append(l.ops, txOp{off: off, n: n, blocksPast: blocks, end: int64(p)})
			case 3: // NBD_CMD_FLUSH
				l.ops = append(l.ops, txOp{flush: true, blocksPast: blocks, end: int64(p)})
			case 0, 2: // READ, DISC
			default:
				t.Fatalf("transaction log: command %d at %d: the metadata device got neither a write nor a flush", typ, p-28)
			}
		default:
			t.Fatalf("transaction log: magic %#x at %d", magic, p)
		}
	}
	return l
}

// blocksAt is the number of data blocks of the requests logged completely
// within the first size bytes of the log.
func (l txlog) blocksAt(size int64) int {
	n := 0
	for _, op := range l.ops {
		if op.end > size {
			break
		}
		n = op.blocksPast
	}
	return n
}

func (l txlog) blocks() int {
	if len(l.ops) == 0 {
		return 0
	}
	return l.ops[len(l.ops)-1].blocksPast
}

// ackedWrite is a write the NBD client had acknowledged while its blocks
// differed between the nodes, with the log sizes between which they
// certainly differed: from the acknowledgement (its activity-log
// transaction was logged before it) to the reconnect.
type ackedWrite struct {
	first, n          uint64 // blocks
	fromLog, untilLog int64  // bytes of the transaction log
}

// TestCrashStates_MetadataLog (C1): alpha's metadata on nbd-server with a
// transaction log (through nbdfuse), al-extents 7, protocol C. Two rounds
// of: writes while connected across 20 extents, a disconnect, writes while
// disconnected across the same extents with flushes, a reconnect and the
// resync. Then every prefix of the log is replayed with nbd-trplay onto a
// zeroed image. Each prefix from the end of create-md on opens; each one
// before opens or says "no metadata" (or "corrupt"). At each, after the activity log is
// applied, every block written while disconnected and acknowledged before
// the prefix, and not yet reconnected, is marked (I1), and nothing outside
// the extents written is (no full resync).
func TestCrashStates_MetadataLog(t *testing.T) {
	needRoot(t)
	need(t, "nbd-server", "nbd-trplay", "nbdfuse", "fusermount3")
	const (
		size      = 1024 * mib // 256 extents, 9 bitmap pages
		alExtents = bitmap.MinALExtents
		mdSize    = 2 * mib
	)
	// The workload writes 20 extents (more than the activity log holds)
	// spread over 8 bitmap pages: an extent that leaves the log has its
	// own page written, not one another eviction wrote a moment before.
	var extents []uint64
	written := map[uint64]bool{}
	for i := range uint64(20) {
		extents = append(extents, i*12)
		written[i*12] = true
	}
	began := time.Now()
	dir := t.TempDir()
	live := sparseFile(t, dir, "md.img", mdSize)
	txPath := filepath.Join(dir, "tx.log")
	srvSock := filepath.Join(dir, "nbd-server.sock")
	srvConf := filepath.Join(dir, "nbd-server.conf")
	if err := os.WriteFile(srvConf, []byte(fmt.Sprintf("[generic]\n  unixsock = %s\n[md]\n  exportname = %s\n"+
		"  transactionlog = %s\n  datalog = true\n  flush = true\n  fua = true\n", srvSock, live, txPath)), 0o644); err != nil {
		t.Fatal(err)
	}
	// -d: in the foreground, serving one client (nbdfuse's one connection).
	srv := start(t, "nbd-server", "-C", srvConf, "-d")
	t.Cleanup(func() {
		srv.signal(syscall.SIGTERM)
		select {
		case <-srv.done:
		case <-time.After(20 * time.Second):
			srv.signal(syscall.SIGKILL)
		}
	})
	// Its one connection is nbdfuse's: wait for the socket without connecting.
	eventually(t, 20*time.Second, "nbd-server's socket", func() (bool, string) {
		if srv.exited() {
			t.Fatalf("nbd-server exited: %v\n%s", srv.err, srv.out)
		}
		_, err := os.Stat(srvSock)
		return err == nil, fmt.Sprint(err)
	})
	// One connection: the log then has one writer, in the order nbdfuse sent.
	mdFile := fuseMount(t, dir, "md", mdSize, []string{"-C", "1"}, "nbd+unix:///md?socket="+srvSock)

	c := newClusterDisks(t, size, fmt.Sprintf("net { protocol C; } disk { al-extents %d; c-plan-ahead 0; resync-rate 500M; }", alExtents),
		// beta's metadata is external too: with internal metadata its data
		// would be smaller, and the first connect would shrink alpha's.
		map[string]string{"alpha:meta": mdFile, "beta:meta": sparseFile(t, dir, "beta-md.img", mdSize)})
	fi, err := os.Stat(txPath)
	if err != nil {
		t.Fatal(err)
	}
	created := fi.Size() // create-md's writes end here
	c.skipInitialSync()

	r := rand.New(rand.NewPCG(8, 1))
	rc := dialNBD(t, c.alpha.sock(), "r0")
	var handle uint64
	logSize := func() int64 {
		fi, err := os.Stat(txPath)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	flush := func() {
		handle++
		rc.send(t, 3, handle, 0, 0, nil)
		if e := rc.reply(t, handle); e != 0 {
			t.Fatalf("NBD flush: error %d", e)
		}
	}
	// write writes 1-16 blocks at a random place in one of the extents
	// and returns them.
	write := func() (first, n uint64) {
		first = extents[r.IntN(len(extents))]*bitmap.ExtentBlocks + r.Uint64N(bitmap.ExtentBlocks-16)
		n = 1 + r.Uint64N(16)
		data := make([]byte, n*4096)
		crand.Read(data)
		handle++
		rc.send(t, 1, handle, first*4096, uint32(len(data)), data)
		if e := rc.reply(t, handle); e != 0 {
			t.Fatalf("NBD write of %d blocks at block %d: error %d", n, first, e)
		}
		return first, n
	}
	var disconnected []ackedWrite
	var resynced uint64
	for round := range 2 {
		for i := range 30 {
			write()
			if i%6 == 5 {
				flush()
			}
		}
		c.beta.must("disconnect", "r0")
		c.alpha.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
		differ := map[uint64]bool{}
		start := len(disconnected)
		for i := range 40 {
			first, n := write()
			disconnected = append(disconnected, ackedWrite{first: first, n: n, fromLog: logSize()})
			for b := first; b < first+n; b++ {
				differ[b] = true
			}
			if i%5 == 4 {
				flush()
			}
		}
		if st := c.alpha.status(); st.OutOfSyncBytes != uint64(len(differ))*4096 {
			t.Fatalf("round %d: alpha marks %d bytes out of sync, %d blocks were written while disconnected",
				round, st.OutOfSyncBytes, len(differ))
		}
		reconnect := logSize()
		for i := start; i < len(disconnected); i++ {
			disconnected[i].untilLog = reconnect
		}
		before := c.beta.status().Counters.DW
		c.beta.must("connect", "r0")
		c.beta.must("wait-connect", "--timeout", "60s", "r0")
		c.beta.must("wait-sync", "--timeout", "2m", "r0")
		c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
		c.alpha.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
		// The oracle is the truth: the resync wrote exactly these blocks.
		if got := (c.beta.status().Counters.DW - before) * 1024; got != uint64(len(differ))*4096 {
			t.Fatalf("round %d: beta's resync wrote %d bytes, %d blocks differed", round, got, len(differ))
		}
		resynced += uint64(len(differ))
	}
	rc.c.Close()
	c.alpha.demote()
	sameExtents(t, c, extents)
	for _, n := range c.nodes() {
		n.must("down", "r0")
	}
	if err := c.alpha.d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("alpha's daemon: %v", err)
	}

	t.Logf("workload done in %v", time.Since(began).Round(time.Millisecond))
	began = time.Now()
	l := readTxlog(t, txPath)
	checkCrashStates(t, c.alpha, l, crashCheck{
		dir: t.TempDir(), mdSize: mdSize, dataSize: size, alExtents: alExtents,
		created: l.blocksAt(created), writes: disconnected, extents: written,
	})
	t.Logf("%d blocks written while disconnected and resynced; replay and checks in %v", resynced, time.Since(began).Round(time.Millisecond))
}

// crashCheck is what checkCrashStates needs to know of the workload.
type crashCheck struct {
	dir              string
	mdSize, dataSize int64
	alExtents        int
	created          int // log blocks of create-md
	writes           []ackedWrite
	extents          map[uint64]bool // the extents the workload wrote
}

// checkCrashStates replays every prefix of the transaction log onto a
// zeroed image of the metadata device and checks each (see
// TestCrashStates_MetadataLog). `nbdmirror dump-md --json` reads a sample
// of the images and must agree with the metadisk package.
func checkCrashStates(t *testing.T, n *rnode, l txlog, cc crashCheck) {
	t.Helper()
	total := l.blocks()
	layout, err := metadisk.ExternalCapacity(cc.dataSize, cc.mdSize)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(cc.dir, "crash.img")
	conf := filepath.Join(cc.dir, "check.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("resource r0 { disk { al-extents %d; }\n"+
		"  on alpha { disk %s; meta-disk %s; address 127.0.0.1:7789; }\n"+
		"  on beta  { disk /dev/null; meta-disk internal; address 127.0.0.2:7789; }\n}\n",
		cc.alExtents, n.disk, img)), 0o644); err != nil {
		t.Fatal(err)
	}
	var flushes, alWrites, bitmapWrites int
	for _, op := range l.ops {
		switch {
		case op.flush:
			flushes++
		case op.off >= 8<<10 && op.off < 8<<10+1<<20:
			alWrites++
		case op.off >= 8<<10+1<<20:
			bitmapWrites++
		}
	}
	// dump-md reads about a dozen of the images: the first and last
	// without metadata, the first with, and evenly spaced ones after.
	dumpEvery := max(1, (total-cc.created)/10)
	distinct := map[uint64]bool{}
	for _, w := range cc.writes {
		for b := w.first; b < w.first+w.n; b++ {
			distinct[b] = true
		}
	}
	// The prefixes at which each write's blocks certainly differ.
	type span struct{ from, until int }
	spans := make([]span, len(cc.writes))
	for i, w := range cc.writes {
		spans[i] = span{l.blocksAt(w.fromLog), l.blocksAt(w.untilLog)}
	}
	var opened, noMetadata, checks, dumped, maxMarked int
	required := map[uint64]bool{}
	for k := 0; k <= total; k++ {
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, cc.mdSize); err != nil {
			t.Fatal(err)
		}
		if k > 0 {
			out, err := tryRun(time.Minute, "nbd-trplay", "-i", img, "-l", l.path, "-m", fmt.Sprint(k), "-b", "4096")
			if err != nil {
				t.Fatalf("nbd-trplay -m %d: %v\n%s", k, err, out)
			}
		}
		f, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		// NoFlush: apply-al's writes to this scratch copy need no fsync.
		m, err := metadisk.Open(f, layout, metadisk.Options{ALExtents: cc.alExtents, NoFlush: true})
		dump := k == 0 || k == cc.created-1 || k >= cc.created && (k-cc.created)%dumpEvery == 0 || k == total
		if err != nil {
			f.Close()
			if k >= cc.created || !errors.Is(err, metadisk.ErrNoMetadata) && !errors.Is(err, metadisk.ErrCorrupt) {
				t.Fatalf("prefix %d of %d blocks (create-md ended at %d): open: %v", k, total, cc.created, err)
			}
			noMetadata++
			if dump {
				code, _, errOut := runCLI(t, time.Minute, []string{"--config", conf, "--node", "alpha", "dump-md", "r0"})
				if code == 0 || !strings.Contains(errOut, "no nbdmirror metadata found") && !strings.Contains(errOut, "cannot be trusted") {
					t.Fatalf("prefix %d: dump-md of metadata not yet created: exit %d: %s", k, code, errOut)
				}
				dumped++
			}
			continue
		}
		opened++
		rec := m.Recovery()
		if len(rec.TornPages) > 0 || rec.TornALBlocks > 0 {
			t.Fatalf("prefix %d: torn metadata blocks in a replay of whole 4 KiB blocks: %+v", k, rec)
		}
		if dump {
			checkDumpMD(t, conf, k, m, rec)
			dumped++
		}
		if _, err := m.ApplyAL(); err != nil {
			t.Fatalf("prefix %d: apply-al: %v", k, err)
		}
		for i, w := range cc.writes {
			if k < spans[i].from || k > spans[i].until {
				continue
			}
			for b := w.first; b < w.first+w.n; b++ {
				checks++
				required[b] = true
				if !m.Test(b) {
					t.Fatalf("prefix %d of %d: block %d, written while disconnected and acknowledged at prefix %d, "+
						"not marked after apply-al (I1); recovery %+v", k, total, b, spans[i].from, rec)
				}
			}
		}
		for from := uint64(0); ; {
			start, n, ok := m.NextRun(from)
			if !ok {
				break
			}
			for b := start; b < start+n; b += bitmap.ExtentBlocks - b%bitmap.ExtentBlocks {
				if !cc.extents[b/bitmap.ExtentBlocks] {
					t.Fatalf("prefix %d: block %d is marked, outside the extents ever written", k, b)
				}
			}
			from = start + n
		}
		maxMarked = max(maxMarked, int(m.OutOfSync()))
		if k == total && (!rec.Clean || m.OutOfSync() != 0) {
			t.Fatalf("the last prefix (after down): clean %v, %d blocks marked; want clean and none", rec.Clean, m.OutOfSync())
		}
		m.Abandon()
		f.Close()
	}
	t.Logf("%d prefixes replayed (%d log blocks, %d flushes, %d activity-log writes, %d bitmap-page writes); "+
		"%d opened, %d before create-md ended (%d log blocks) had no metadata; %d block checks of %d distinct blocks; "+
		"at most %d blocks marked; %d read by dump-md",
		total+1, total, flushes, alWrites, bitmapWrites, opened, noMetadata, cc.created, checks, len(required), maxMarked, dumped)
	// Only prefixes before the end of create-md lack metadata (checked
	// above), and not the last of them: it writes its superblocks last.
	if noMetadata == 0 || noMetadata >= cc.created || opened != total+1-noMetadata {
		t.Fatalf("prefixes: %d opened, %d without metadata; create-md ended at log block %d of %d",
			opened, noMetadata, cc.created, total)
	}
	// Every block written while disconnected was checked at some prefix.
	if len(required) != len(distinct) {
		t.Fatalf("%d blocks checked, %d were written while disconnected", len(required), len(distinct))
	}
	// The activity log churned: more transactions than it holds extents,
	// and extents left it (their bitmap pages written).
	if alWrites < 4*cc.alExtents || bitmapWrites < cc.alExtents || flushes < alWrites {
		t.Fatalf("the workload did not churn the metadata: %d activity-log writes, %d bitmap writes, %d flushes",
			alWrites, bitmapWrites, flushes)
	}
}

// checkDumpMD runs `nbdmirror dump-md --json` on the image and compares
// what it reports with what the metadisk package read.
func checkDumpMD(t *testing.T, conf string, k int, m *metadisk.Meta, rec metadisk.Recovery) {
	t.Helper()
	code, out, errOut := runCLI(t, time.Minute, []string{"--config", conf, "--node", "alpha", "dump-md", "--json", "r0"})
	if code != 0 {
		t.Fatalf("prefix %d: dump-md: exit %d: %s", k, code, errOut)
	}
	var d mdJSON
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("prefix %d: dump-md --json: %v\n%s", k, err, out)
	}
	var al []uint64
	for _, e := range rec.ALActive {
		al = append(al, uint64(e))
	}
	if d.Clean != rec.Clean || d.Bitmap.BitsSet != m.OutOfSync() || d.AL.Transaction != rec.ALSeq ||
		!slices.Equal(d.AL.Extents, al) && len(d.AL.Extents)+len(al) > 0 {
		t.Fatalf("prefix %d: dump-md says clean %v, %d bits, activity log %d %v; metadisk: clean %v, %d bits, %d %v",
			k, d.Clean, d.Bitmap.BitsSet, d.AL.Transaction, d.AL.Extents, rec.Clean, m.OutOfSync(), rec.ALSeq, al)
	}
}

// sameExtents fails unless both nodes' disks hold the same bytes in the
// given extents (the rest of these 1 GiB disks was never written: hashing
// it would cost seconds).
func sameExtents(t *testing.T, c *cluster, extents []uint64) {
	t.Helper()
	var files []*os.File
	for _, n := range c.nodes() {
		n.checkLog()
		f, err := os.Open(n.disk)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	a, b := make([]byte, bitmap.ExtentSize), make([]byte, bitmap.ExtentSize)
	for _, e := range extents {
		off := int64(e) * bitmap.ExtentSize
		if _, err := files[0].ReadAt(a, off); err != nil {
			t.Fatal(err)
		}
		if _, err := files[1].ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Fatalf("the disks differ in extent %d", e)
		}
	}
}
