package bitmap

import (
	"errors"
	"fmt"
	"math/bits"
)

// BlockSize is the number of bytes one bit stands for.
const BlockSize = 4096

// Blocks returns the number of blocks (bits) needed to cover size bytes.
func Blocks(size int64) uint64 { return uint64((size + BlockSize - 1) / BlockSize) }

// BlockRange returns the blocks [first, first+n) touched by n bytes at off.
func BlockRange(off, length int64) (first, n uint64) {
	if length <= 0 {
		return uint64(off / BlockSize), 0
	}
	first = uint64(off / BlockSize)
	last := uint64((off + length - 1) / BlockSize)
	return first, last - first + 1
}

// ErrSizeMismatch is returned when two bitmaps of different lengths are
// combined.
var ErrSizeMismatch = errors.New("bitmap: bitmaps of different lengths")

// Bitmap is a set of blocks, 1 bit per 4 KiB, that may differ from the peer.
// It also remembers which of its on-disk pages changed since they were last
// marked clean, so that the metadata layer writes only those.
//
// A Bitmap is not safe for concurrent use: the caller serialises access.
type Bitmap struct {
	words []uint64
	nbits uint64
	count uint64
	dirty []uint64 // one bit per page: changed since MarkClean
}

// New returns an empty bitmap of nbits blocks.
func New(nbits uint64) *Bitmap {
	b := &Bitmap{nbits: nbits, words: make([]uint64, (nbits+63)/64)}
	b.dirty = make([]uint64, (uint64(b.Pages())+63)/64)
	return b
}

// Len returns the number of blocks the bitmap covers.
func (b *Bitmap) Len() uint64 { return b.nbits }

// Count returns the number of set bits.
func (b *Bitmap) Count() uint64 { return b.count }

// Test reports whether block i is set.
func (b *Bitmap) Test(i uint64) bool {
	if i >= b.nbits {
		return false
	}
	return b.words[i/64]&(1<<(i%64)) != 0
}

// clip limits [start, start+n) to the bitmap.
func (b *Bitmap) clip(start, n uint64) (uint64, uint64) {
	if start >= b.nbits {
		return start, 0
	}
	return start, min(n, b.nbits-start)
}

// Set sets blocks [start, start+n) and returns how many were newly set.
// Blocks past the end are ignored.
func (b *Bitmap) Set(start, n uint64) uint64 {
	start, n = b.clip(start, n)
	var added uint64
	b.span(start, n, func(w int, mask uint64) {
		old := b.words[w]
		if nw := old | mask; nw != old {
			added += uint64(bits.OnesCount64(nw ^ old))
			b.words[w] = nw
			b.markWord(w)
		}
	})
	b.count += added
	return added
}

// Clear clears blocks [start, start+n) and returns how many were set.
func (b *Bitmap) Clear(start, n uint64) uint64 {
	start, n = b.clip(start, n)
	var removed uint64
	b.span(start, n, func(w int, mask uint64) {
		old := b.words[w]
		if nw := old &^ mask; nw != old {
			removed += uint64(bits.OnesCount64(nw ^ old))
			b.words[w] = nw
			b.markWord(w)
		}
	})
	b.count -= removed
	return removed
}

// CountRange returns the number of set bits in [start, start+n).
func (b *Bitmap) CountRange(start, n uint64) uint64 {
	start, n = b.clip(start, n)
	var c uint64
	b.span(start, n, func(w int, mask uint64) { c += uint64(bits.OnesCount64(b.words[w] & mask)) })
	return c
}

// span calls f for every word overlapping [start, start+n) with the mask of
// the bits of the range in that word.
func (b *Bitmap) span(start, n uint64, f func(w int, mask uint64)) {
	if n == 0 {
		return
	}
	end := start + n // exclusive
	for w := start / 64; w*64 < end; w++ {
		lo, hi := max(start, w*64), min(end, w*64+64)
		mask := ^uint64(0)
		if hi-lo < 64 {
			mask = (uint64(1)<<(hi-lo) - 1) << (lo - w*64)
		}
		f(int(w), mask)
	}
}

// SetAll sets every block.
func (b *Bitmap) SetAll() { b.Set(0, b.nbits) }

// ClearAll clears every block.
func (b *Bitmap) ClearAll() { b.Clear(0, b.nbits) }

// NextSet returns the first set block at or after from.
func (b *Bitmap) NextSet(from uint64) (uint64, bool) {
	if from >= b.nbits {
		return 0, false
	}
	w := from / 64
	word := b.words[w] &^ (uint64(1)<<(from%64) - 1)
	for {
		if word != 0 {
			i := w*64 + uint64(bits.TrailingZeros64(word))
			return i, i < b.nbits
		}
		w++
		if w >= uint64(len(b.words)) {
			return 0, false
		}
		word = b.words[w]
	}
}

// nextClear returns the first clear block at or after from (or Len).
func (b *Bitmap) nextClear(from uint64) uint64 {
	if from >= b.nbits {
		return b.nbits
	}
	w := from / 64
	word := ^b.words[w] &^ (uint64(1)<<(from%64) - 1)
	for {
		if word != 0 {
			return min(w*64+uint64(bits.TrailingZeros64(word)), b.nbits)
		}
		w++
		if w >= uint64(len(b.words)) {
			return b.nbits
		}
		word = ^b.words[w]
	}
}

// NextRun returns the first run of consecutive set blocks starting at or
// after from: its first block and its length.
func (b *Bitmap) NextRun(from uint64) (start, n uint64, ok bool) {
	start, ok = b.NextSet(from)
	if !ok {
		return 0, 0, false
	}
	return start, b.nextClear(start) - start, true
}

// Or sets every bit that is set in o (the two bitmaps must be of equal
// length), as done when two nodes merge their bitmaps on connect.
func (b *Bitmap) Or(o *Bitmap) error {
	if b.nbits != o.nbits {
		return fmt.Errorf("%w: %d and %d blocks", ErrSizeMismatch, b.nbits, o.nbits)
	}
	for w, ow := range o.words {
		old := b.words[w]
		if nw := old | ow; nw != old {
			b.count += uint64(bits.OnesCount64(nw ^ old))
			b.words[w] = nw
			b.markWord(w)
		}
	}
	return nil
}

// Clone returns a copy of the bitmap (its dirty-page marks included).
func (b *Bitmap) Clone() *Bitmap {
	c := *b
	c.words = append([]uint64(nil), b.words...)
	c.dirty = append([]uint64(nil), b.dirty...)
	return &c
}

// Equal reports whether both bitmaps hold the same blocks.
func (b *Bitmap) Equal(o *Bitmap) bool {
	if b.nbits != o.nbits || b.count != o.count {
		return false
	}
	for w := range b.words {
		if b.words[w] != o.words[w] {
			return false
		}
	}
	return true
}

// Resize changes the number of blocks; new blocks are set when setNew is
// true (an area the peer may not have), else clear. Blocks beyond a smaller
// size are dropped.
func (b *Bitmap) Resize(nbits uint64, setNew bool) {
	old := b.nbits
	if nbits < old {
		b.Clear(nbits, old-nbits)
	}
	words := make([]uint64, (nbits+63)/64)
	copy(words, b.words)
	b.words, b.nbits = words, nbits
	dirty := make([]uint64, (uint64(b.Pages())+63)/64)
	copy(dirty, b.dirty)
	b.dirty = dirty
	if nbits > old && setNew {
		b.Set(old, nbits-old)
	}
}
