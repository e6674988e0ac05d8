package metadisk

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// workload drives metadata the way the write path does, single-threaded
// and deterministic for a seed: writes (BeginWrite, then the blocks are
// "issued" and marked), completions, bitmap flushes, resyncs of ranges with
// no write in flight, and clean restarts. required[b] is true while block
// b may differ from the peer: from the moment a write to it may have
// reached the data disk until a resync clears it.
type workload struct {
	r        *rand.Rand
	dev      *memDev
	layout   Layout
	opts     Options
	m        *Meta
	required []bool
	inflight []inflightWrite
}

type inflightWrite struct {
	span      Span
	first, n  uint64
	off, size int64
}

const crashDataSize = 256 * mib // 64 extents, 3 bitmap pages

func newWorkload(t testing.TB, seed uint64, dev *memDev) *workload {
	l, err := ExternalLayout(crashDataSize, areaSize(crashDataSize))
	if err != nil {
		t.Fatal(err)
	}
	w := &workload{r: rand.New(rand.NewPCG(seed, 1)), dev: dev, layout: l,
		opts: Options{ALExtents: bitmap.MinALExtents}, required: make([]bool, l.Blocks())}
	return w
}

// run runs ops operations on metadata freshly created on w.dev.
func (w *workload) run(t testing.TB, ops int, stop func() bool) {
	w.restart(t)
	for range ops {
		if stop() {
			return
		}
		switch op := w.r.IntN(100); {
		case op < 45 && len(w.inflight) < 2:
			w.write(t)
		case op < 75 && len(w.inflight) > 0:
			i := w.r.IntN(len(w.inflight))
			w.m.EndWrite(w.inflight[i].span)
			w.inflight = slices.Delete(w.inflight, i, i+1)
		case op < 85:
			if err := w.m.FlushBitmap(); err != nil {
				t.Fatal(err)
			}
		case op < 93:
			w.resync(t)
		default:
			for _, in := range w.inflight {
				w.m.EndWrite(in.span)
			}
			w.inflight = nil
			if err := w.m.Close(); err != nil {
				t.Fatal(err)
			}
			w.restart(t)
		}
	}
}

func (w *workload) restart(t testing.TB) {
	m, err := Open(w.dev, w.layout, w.opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	w.m = m
}

func (w *workload) write(t testing.TB) {
	blocks := w.layout.Blocks()
	var first uint64
	if w.r.IntN(4) == 0 { // straddle an extent boundary
		first = uint64(1+w.r.IntN(int(blocks/bitmap.ExtentBlocks)-1))*bitmap.ExtentBlocks - 2
	} else {
		first = w.r.Uint64N(blocks - 16)
	}
	n := 1 + w.r.Uint64N(16)
	off, size := int64(first)*4096, int64(n)*4096
	span, err := w.m.BeginWrite(off, size)
	if err != nil {
		t.Fatal(err)
	}
	// From here the data write may be on its way to the disk.
	for b := first; b < first+n; b++ {
		w.required[b] = true
	}
	w.m.MarkOutOfSync(off, size)
	w.inflight = append(w.inflight, inflightWrite{span, first, n, off, size})
}

func (w *workload) resync(t testing.TB) {
	first := w.r.Uint64N(w.layout.Blocks() - 4096)
	n := 1 + w.r.Uint64N(4096)
	for _, in := range w.inflight {
		if first < in.first+in.n && in.first < first+n {
			return // a write in flight: resync waits for it
		}
	}
	// The peer confirmed these blocks: they no longer differ.
	for b := first; b < first+n; b++ {
		w.required[b] = false
	}
	w.m.MarkInSync(int64(first)*4096, int64(n)*4096)
	if err := w.m.FlushBitmap(); err != nil {
		t.Fatal(err)
	}
}

// TestCrash_RandomPoints crashes the metadata device at random points of a
// random workload with activity-log churn (al-extents 7 over 64 extents),
// losing or tearing unflushed writes, and checks invariant I1 on what is
// left: it opens, applies the activity log, and every block that may differ
// is marked.
func TestCrash_RandomPoints(t *testing.T) {
	iterations := 3000
	if testing.Short() || raceEnabled {
		iterations = 300
	}
	const ops = 60
	// Every run starts from the same freshly created metadata: a crash
	// during create-md needs no test (it is simply run again; no data
	// depends on it yet).
	base := newWorkload(t, 0, newMemDev(int(areaSize(crashDataSize))))
	if err := Create(base.dev, base.layout, "alpha", "r0", false, base.opts); err != nil {
		t.Fatal(err)
	}
	base.dev.Sync()
	fresh := base.dev.clone
	var crashed, torn, evictions int
	for it := range iterations {
		seed := uint64(it)
		// A dry run counts the device operations of this workload.
		dry := newWorkload(t, seed, fresh())
		dry.run(t, ops, func() bool { return false })
		total := dry.dev.ops

		fate := rand.New(rand.NewPCG(seed, 2))
		crashAt := 1 + fate.IntN(total)
		dev := fresh()
		w := newWorkload(t, seed, dev)
		var img *memDev
		var required []bool
		dev.onOp = func(n int) {
			if n == crashAt && img == nil {
				img = dev.Crash(fate)
				required = slices.Clone(w.required)
			}
		}
		w.run(t, ops, func() bool { return img != nil })
		if img == nil {
			continue
		}
		crashed++
		m, err := Open(img, w.layout, Options{ALExtents: bitmap.MinALExtents})
		if err != nil {
			t.Fatalf("iteration %d, crash at op %d of %d: open: %v", it, crashAt, total, err)
		}
		rec := m.Recovery()
		if len(rec.TornPages) > 0 || rec.TornALBlocks > 0 {
			torn++
		}
		if _, err := m.ApplyAL(); err != nil {
			t.Fatalf("iteration %d: apply-al: %v", it, err)
		}
		for b, req := range required {
			if req && !m.Test(uint64(b)) {
				t.Fatalf("iteration %d, crash at op %d of %d: block %d may differ but is not marked (I1); recovery %+v",
					it, crashAt, total, b, rec)
			}
		}
		// Recovery is repeatable: the state survives another cycle.
		oos := m.OutOfSync()
		if err := m.Activate(); err != nil {
			t.Fatal(err)
		}
		if err := m.Close(); err != nil {
			t.Fatal(err)
		}
		m2, err := Open(img, w.layout, Options{})
		if err != nil || m2.OutOfSync() != oos {
			t.Fatalf("iteration %d: reopen after recovery: %v, oos %d want %d", it, err, m2.OutOfSync(), oos)
		}
		if _, ev := w.m.al.Stats(); ev > 0 {
			evictions++
		}
	}
	t.Logf("%d crash points checked (%d with torn metadata blocks, %d with evictions before the crash)", crashed, torn, evictions)
	if crashed < iterations/2 || torn == 0 || evictions == 0 {
		t.Errorf("the crash points did not cover the cases: %d crashes, %d torn, %d with evictions", crashed, torn, evictions)
	}
}

// The kill -9 test runs this test binary again as a writer process.
const writerEnv = "NBDMIRROR_METADISK_WRITER"

func TestMain(m *testing.M) {
	if path := os.Getenv(writerEnv); path != "" {
		os.Exit(writerProcess(path))
	}
	os.Exit(m.Run())
}

// writerProcess opens the metadata in path and writes forever, printing
// "W first n" once a write may have reached the disk and "C first n" once a
// range was resynchronised.
func writerProcess(path string) int {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	l, _ := ExternalLayout(crashDataSize, areaSize(crashDataSize))
	o := Options{ALExtents: bitmap.MinALExtents}
	m, err := Open(f, l, o)
	if err == nil {
		err = m.Activate()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	out := bufio.NewWriter(os.Stdout)
	r := rand.New(rand.NewPCG(uint64(os.Getpid()), 3))
	var held []inflightWrite
	for i := 0; ; i++ {
		switch op := r.IntN(10); {
		case op < 5 && len(held) < 3:
			first := r.Uint64N(l.Blocks() - 64)
			n := 1 + r.Uint64N(64)
			s, err := m.BeginWrite(int64(first)*4096, int64(n)*4096)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			fmt.Fprintf(out, "W %d %d\n", first, n)
			out.Flush()
			m.MarkOutOfSync(int64(first)*4096, int64(n)*4096)
			held = append(held, inflightWrite{span: s, first: first, n: n})
		case op < 8 && len(held) > 0:
			m.EndWrite(held[0].span)
			held = held[1:]
		case op < 9:
			m.FlushBitmap()
		default:
			first := r.Uint64N(l.Blocks() - 2048)
			n := 1 + r.Uint64N(2048)
			busy := false
			for _, h := range held {
				busy = busy || first < h.first+h.n && h.first < first+n
			}
			if !busy {
				m.MarkInSync(int64(first)*4096, int64(n)*4096)
				fmt.Fprintf(out, "C %d %d\n", first, n)
				out.Flush()
			}
		}
	}
}

// TestCrash_Kill9 kills a real writer process (kill -9) at random moments
// and checks I1 on the file it leaves: every block it announced as written,
// and not resynchronised since, is marked after apply-al.
func TestCrash_Kill9(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "md")
	l, _ := ExternalLayout(crashDataSize, areaSize(crashDataSize))
	if err := os.WriteFile(path, make([]byte, l.Size), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Create(f, l, "alpha", "r0", false, Options{}); err != nil {
		t.Fatal(err)
	}
	required := make([]bool, l.Blocks())
	r := rand.New(rand.NewPCG(9, 9))
	rounds := 8
	if testing.Short() {
		rounds = 3
	}
	var lines int
	for round := range rounds {
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), writerEnv+"="+path)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		wait := time.Duration(r.IntN(250)) * time.Millisecond
		sc := bufio.NewScanner(stdout)
		done := make(chan struct{})
		started := make(chan struct{}) // closed at the writer's first line: its metadata is in use
		go func() {
			defer close(done)
			first := true
			for sc.Scan() {
				if first {
					close(started)
					first = false
				}
				fields := strings.Fields(sc.Text())
				if len(fields) != 3 {
					continue
				}
				first, _ := strconv.ParseUint(fields[1], 10, 64)
				n, _ := strconv.ParseUint(fields[2], 10, 64)
				for b := first; b < first+n && b < uint64(len(required)); b++ {
					required[b] = fields[0] == "W"
				}
				lines++
			}
		}()
		// The kill lands a random time after the writer began, however
		// long a loaded machine takes to start it.
		select {
		case <-started:
		case <-done:
			t.Fatalf("round %d: the writer ended before writing", round)
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			t.Fatalf("round %d: the writer wrote nothing in a minute", round)
		}
		time.Sleep(wait)
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
		cmd.Wait()
		m, err := Open(f, l, Options{ALExtents: bitmap.MinALExtents})
		if err != nil {
			t.Fatalf("round %d: open after kill -9: %v", round, err)
		}
		if m.Recovery().Clean {
			t.Fatalf("round %d: metadata clean after kill -9", round)
		}
		if _, err := m.ApplyAL(); err != nil {
			t.Fatal(err)
		}
		for b, req := range required {
			if req && !m.Test(uint64(b)) {
				t.Fatalf("round %d: block %d written before kill -9 is not marked (I1)", round, b)
			}
		}
		m.Abandon()
	}
	if lines < rounds*10 {
		t.Errorf("the writer announced only %d operations in %d rounds", lines, rounds)
	}
}
