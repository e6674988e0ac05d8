package wire

import (
	"encoding/binary"
	"math"
	"slices"

	"github.com/nbdmirror/nbdmirror/transport"
)

const (
	// bitmapHeader is the size of a Bitmap payload before its runs.
	bitmapHeader = 18
	// bitmapLast is the flags bit of the last chunk.
	bitmapLast = 1 << 0
	// minChunkPayload is the least maxPayload BitmapChunks works with.
	minChunkPayload = 64
)

// Bitmap is one chunk of the sender's out-of-sync bitmap, run-length
// encoded (Data stream). Blocks [Start, Start+Count) are described by
// Runs: alternating lengths of clear and set bits, starting with a clear
// run, which may be 0; no other run may be 0, and the runs sum to exactly
// Count, at most 1<<32 per chunk. Last marks the final chunk. A chunk of
// Count 0 has no runs and must be the last: it is how an empty bitmap, or
// an empty end of one, is sent.
//
// The chunks of one bitmap follow each other on the data stream, each
// starting where the one before ended; the receiver checks that.
type Bitmap struct {
	Start, Count uint64
	Last         bool
	Runs         []uint64
}

// Type returns TypeBitmap.
func (Bitmap) Type() transport.Type { return TypeBitmap }

// Append appends m's payload to dst.
func (m Bitmap) Append(dst []byte) []byte {
	dst = slices.Grow(dst, bitmapHeader+len(m.Runs)*3)
	var flags byte
	if m.Last {
		flags = bitmapLast
	}
	dst = append(dst, version, flags)
	dst = binary.BigEndian.AppendUint64(dst, m.Start)
	dst = binary.BigEndian.AppendUint64(dst, m.Count)
	for _, r := range m.Runs {
		dst = binary.AppendUvarint(dst, r)
	}
	return dst
}

// Validate reports the first field that Decode would reject.
func (m Bitmap) Validate() error {
	const msg = "Bitmap"
	switch {
	case m.Count > maxBitmapCount:
		return malformed(msg, "count %d above the %d maximum", m.Count, uint64(maxBitmapCount))
	case m.Start > math.MaxUint64-m.Count:
		return malformed(msg, "start %d + count %d overflows", m.Start, m.Count)
	case m.Count == 0 && !m.Last:
		return malformed(msg, "count 0 in a chunk that is not the last")
	case m.Count == 0 && len(m.Runs) != 0:
		return malformed(msg, "%d runs for count 0", len(m.Runs))
	}
	var sum uint64
	for i, r := range m.Runs {
		if r == 0 && i > 0 {
			return malformed(msg, "run %d is 0", i)
		}
		if r > m.Count-sum {
			return malformed(msg, "runs sum past count %d at run %d", m.Count, i)
		}
		sum += r
	}
	if sum != m.Count {
		return malformed(msg, "runs sum to %d, count %d", sum, m.Count)
	}
	return nil
}

// Each calls f for each run of set bits, in absolute block numbers.
func (m Bitmap) Each(f func(start, n uint64)) {
	pos := m.Start
	for i, r := range m.Runs {
		if i%2 == 1 && r > 0 {
			f(pos, r)
		}
		pos += r
	}
}

func decodeBitmap(p []byte) (Message, error) {
	const msg = "Bitmap"
	d := newDecoder(msg, p)
	flags := d.u8("flags")
	m := Bitmap{Start: d.u64("start"), Count: d.u64("count"), Last: flags&bitmapLast != 0}
	if d.err == nil && flags&^bitmapLast != 0 {
		return nil, malformed(msg, "reserved flags %#x set", flags&^bitmapLast)
	}
	rest := d.rest()
	if d.err != nil {
		return nil, d.err
	}
	// A varint ends at each byte below 0x80: count them to allocate once.
	n := 0
	for _, b := range rest {
		if b < 0x80 {
			n++
		}
	}
	if n > 0 {
		m.Runs = make([]uint64, 0, n)
	}
	for len(rest) > 0 {
		v, k := binary.Uvarint(rest)
		switch {
		case k == 0:
			return nil, malformed(msg, "payload ends inside run %d", len(m.Runs))
		case k < 0:
			return nil, malformed(msg, "run %d overflows 64 bits", len(m.Runs))
		case k > 1 && rest[k-1] == 0:
			return nil, malformed(msg, "run %d not minimally encoded", len(m.Runs))
		}
		m.Runs = append(m.Runs, v)
		rest = rest[k:]
	}
	return finish(&d, m)
}

// BitmapChunks encodes the set bits of blocks [start, start+count) as
// Bitmap chunks whose payloads are at most maxPayload bytes (at least 64;
// smaller values are raised to it), the last one with Last set. next(from)
// returns the next run of set bits at or after from, (runStart, runLen,
// true), or false when there is none; runs are clipped to the range, so
// next may look past it, and a run of length 0 counts as none. Without
// set bits, the result is one chunk with Runs [count] when count ≤ 1<<32;
// with count 0 it is one chunk of Count 0 and no runs. A count past the
// end of the uint64 block space is cut at its end.
func BitmapChunks(start, count uint64, maxPayload int, next func(from uint64) (s, n uint64, ok bool)) []Bitmap {
	count = min(count, math.MaxUint64-start)
	end := start + count
	c := chunker{max: max(maxPayload, minChunkPayload)}
	c.open(start)
	for pos := start; pos < end; {
		s, n, ok := next(pos)
		if !ok || s >= end {
			c.add(false, end-pos)
			break
		}
		if s < pos { // clip a run that started before pos
			n -= min(n, pos-s)
			s = pos
		}
		n = min(n, end-s)
		if n == 0 {
			c.add(false, end-pos)
			break
		}
		c.add(false, s-pos)
		c.add(true, n)
		pos = s + n
	}
	return c.close()
}

// chunker builds Bitmap chunks from alternating runs.
type chunker struct {
	max    int      // largest payload
	chunks []Bitmap // the chunks closed so far
	cur    Bitmap   // the chunk being filled
	size   int      // cur's encoded size
	// pend is the last run, not yet given to cur: a set run followed by
	// another set run (next returned adjacent runs) extends it.
	pend    uint64
	pendSet bool
}

// open starts a chunk at block start.
func (c *chunker) open(start uint64) {
	c.cur = Bitmap{Start: start}
	c.size = bitmapHeader
}

// add appends a run of n bits, set or clear.
func (c *chunker) add(set bool, n uint64) {
	if n == 0 {
		return
	}
	if c.pend > 0 && c.pendSet == set {
		c.pend += n
		return
	}
	c.flush()
	c.pend, c.pendSet = n, set
}

// flush gives the pending run to the chunks, splitting it where a chunk
// fills up (1<<32 blocks or max bytes).
func (c *chunker) flush() {
	n, set := c.pend, c.pendSet
	c.pend = 0
	for n > 0 {
		if c.cur.Count == maxBitmapCount {
			c.next()
		}
		// A chunk's runs alternate from a clear one: a set run opens a
		// chunk with a zero clear run.
		lead := set && len(c.cur.Runs) == 0
		take := min(n, maxBitmapCount-c.cur.Count)
		grow := uvarintLen(take)
		if lead {
			grow++
		}
		if c.size+grow > c.max && len(c.cur.Runs) > 0 {
			c.next()
			continue
		}
		if lead {
			c.cur.Runs = append(c.cur.Runs, 0)
		}
		c.cur.Runs = append(c.cur.Runs, take)
		c.cur.Count += take
		c.size += grow
		n -= take
	}
}

// next closes the current chunk and opens the one after it.
func (c *chunker) next() {
	c.chunks = append(c.chunks, c.cur)
	c.open(c.cur.Start + c.cur.Count)
}

// close ends the last chunk and returns them all.
func (c *chunker) close() []Bitmap {
	c.flush()
	c.cur.Last = true
	return append(c.chunks, c.cur)
}

// uvarintLen is the size of v as a uvarint.
func uvarintLen(v uint64) int {
	n := 1
	for ; v >= 0x80; v >>= 7 {
		n++
	}
	return n
}
