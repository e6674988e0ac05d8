//go:build integration

package integration

// The sequence writer (reference/testing.md §5): one write at a time, each
// a 4 KiB block holding (magic, seq, offset, filler, crc), logged when it
// is acknowledged. Its checker finds the largest seq S present on a
// replica and asserts that every block written holds the last write with
// seq ≤ S that touched it: the replica is a consistent prefix of the
// writes (what a Secondary must be, protocol A included).

import (
	binenc "encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"
)

const seqMagic = "NBMSEQ01"

type seqWriter struct {
	t      *testing.T
	span   int64 // blocks are written in [0, span)
	rng    *rand.Rand
	mu     sync.Mutex
	issued []int64       // offset of write seq i+1
	acked  uint64        // highest acknowledged seq
	pace   time.Duration // the least time from one write to the next (0: none)
}

func newSeqWriter(t *testing.T, span int64) *seqWriter {
	return &seqWriter{t: t, span: span, rng: rand.New(rand.NewPCG(1, 2))}
}

// block returns write seq's 4 KiB block for offset off.
func seqBlock(seq uint64, off int64) []byte {
	b := make([]byte, 4096)
	copy(b, seqMagic)
	binenc.BigEndian.PutUint64(b[8:], seq)
	binenc.BigEndian.PutUint64(b[16:], uint64(off))
	for i := 24; i < 4092; i += 8 {
		binenc.BigEndian.PutUint64(b[i:], seq*0x9E3779B97F4A7C15^uint64(i))
	}
	binenc.BigEndian.PutUint32(b[4092:], crc32.ChecksumIEEE(b[:4092]))
	return b
}

// parseSeq returns the seq a block holds (0: not a sequence block).
func parseSeq(b []byte, off int64) uint64 {
	if string(b[:8]) != seqMagic || binenc.BigEndian.Uint32(b[4092:]) != crc32.ChecksumIEEE(b[:4092]) ||
		int64(binenc.BigEndian.Uint64(b[16:])) != off {
		return 0
	}
	return binenc.BigEndian.Uint64(b[8:])
}

// run writes n blocks (n < 0: until the connection fails) through node's
// export and returns how many were acknowledged.
func (w *seqWriter) run(n *rnode, count int) uint64 {
	return w.write(n, count, nil)
}

// start runs the writer on node's export in the background until the
// returned stop is called; a write that fails before is an error of the
// test. stop returns how many writes were acknowledged in all. A test
// that ends before it calls stop has it called in its cleanup, which
// waits for the writer a while (a write held by a fault ends when the
// daemons are stopped; the writer then says nothing more).
func (w *seqWriter) start(n *rnode) (stop func() uint64) {
	quit := make(chan struct{})
	done := make(chan uint64, 1)
	go func() {
		acked := w.write(n, -1, quit)
		if !closed(quit) {
			w.t.Errorf("sequence writer: a write failed on %s after %d acknowledged", n.name, acked)
		}
		done <- acked
	}()
	var once sync.Once
	var acked uint64
	stop = func() uint64 {
		once.Do(func() {
			close(quit)
			acked = <-done
		})
		return acked
	}
	w.t.Cleanup(func() {
		once.Do(func() {
			close(quit)
			select {
			case acked = <-done:
			case <-time.After(time.Minute):
			}
		})
	})
	return stop
}

// ackedCount returns the highest acknowledged seq so far.
func (w *seqWriter) ackedCount() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// issuedCount returns how many writes have been issued so far.
func (w *seqWriter) issuedCount() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return uint64(len(w.issued))
}

func (w *seqWriter) write(n *rnode, count int, stop <-chan struct{}) uint64 {
	rc, err := dialNBDErr(n.sock(), "r0")
	if err != nil {
		w.t.Errorf("sequence writer: %v", err)
		return 0
	}
	defer rc.c.Close()
	next := time.Now()
	for i := 0; count < 0 || i < count; i++ {
		if closed(stop) {
			break
		}
		if w.pace > 0 {
			time.Sleep(time.Until(next))
			next = next.Add(w.pace)
		}
		w.mu.Lock()
		seq := uint64(len(w.issued) + 1)
		off := w.rng.Int64N(w.span/4096) * 4096
		w.issued = append(w.issued, off)
		w.mu.Unlock()
		if err := rc.writeErr(seq, off, seqBlock(seq, off)); err != nil {
			break
		}
		w.mu.Lock()
		w.acked = seq
		w.mu.Unlock()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// killDuring runs the writer on node's export until at least n writes
// are acknowledged, kills the node's daemon (kill -9) and returns how many
// writes were acknowledged in all.
func (w *seqWriter) killDuring(node *rnode, n uint64) uint64 {
	w.t.Helper()
	done := make(chan uint64, 1)
	go func() { done <- w.run(node, -1) }()
	eventually(w.t, time.Minute, fmt.Sprintf("%d acknowledged writes", n), func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.acked >= n, fmt.Sprint(w.acked)
	})
	node.kill()
	return <-done
}

// closed reports whether ch is closed (a nil ch never is).
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// check reads the node's disk and asserts the consistent prefix; it
// returns S, the largest seq present.
func (w *seqWriter) check(n *rnode) uint64 {
	w.t.Helper()
	f, err := os.Open(n.disk)
	if err != nil {
		w.t.Fatal(err)
	}
	defer f.Close()
	w.mu.Lock()
	defer w.mu.Unlock()
	got := map[int64]uint64{}
	var s uint64
	buf := make([]byte, 4096)
	for _, off := range w.issued {
		if _, ok := got[off]; ok {
			continue
		}
		if _, err := f.ReadAt(buf, off); err != nil {
			w.t.Fatal(err)
		}
		seq := parseSeq(buf, off)
		if seq == 0 && string(buf[:8]) == seqMagic {
			// A block begun but not whole: part of a write applied.
			w.t.Errorf("%s: block at %d is torn: it has the writer's magic but not a whole write", n.name, off)
		}
		got[off] = seq
		s = max(s, seq)
	}
	want := map[int64]uint64{}
	for i, off := range w.issued {
		if seq := uint64(i + 1); seq <= s {
			want[off] = seq
		}
	}
	for off, seq := range got {
		if want[off] != seq {
			w.t.Errorf("%s: block at %d holds write %d, but the prefix up to write %d says %d", n.name, off, seq, s, want[off])
		}
	}
	return s
}
