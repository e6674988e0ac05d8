package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/cespare/xxhash/v2"
)

// On-disk bitmap page layout (see doc.go). Part of the format: never change
// these without a new format version.
const (
	PageSize     = 4096
	pageHeader   = 120
	PagePayload  = 3968 // bytes of bits: 31 activity-log extents
	pageChecksum = 8
	WordsPerPage = PagePayload / 8
	BitsPerPage  = PagePayload * 8 // 31744 blocks, 124 MiB of data
	pageMagic    = "NMBP"
	PageVersion  = 1
	offMagic     = 0
	offVersion   = 4
	offFlags     = 6
	offIndex     = 8
	offBits      = 16
	offPayload   = pageHeader
	offPageSum   = PageSize - pageChecksum
)

// Page decoding errors. ErrPageChecksum means the page was torn or
// corrupted; the others mean it is not a bitmap page of this format.
var (
	ErrPageMagic    = errors.New("bitmap: not a bitmap page (bad magic)")
	ErrPageVersion  = errors.New("bitmap: unsupported bitmap page version")
	ErrPageChecksum = errors.New("bitmap: bitmap page checksum mismatch (torn or corrupt)")
	ErrPageIndex    = errors.New("bitmap: bitmap page belongs elsewhere")
	ErrPageLength   = errors.New("bitmap: bitmap page is not 4096 bytes")
	// ErrPageBits (which also matches ErrPageIndex) means the page is
	// valid but was written for a bitmap of another length: an
	// interrupted resize, whose reader treats it as torn.
	ErrPageBits = errors.New("bitmap: bitmap page is from a bitmap of another length")
)

// Pages returns the number of on-disk pages the bitmap needs.
func (b *Bitmap) Pages() int { return PagesFor(b.nbits) }

// PagesFor returns the number of pages for nbits blocks.
func PagesFor(nbits uint64) int { return int((nbits + BitsPerPage - 1) / BitsPerPage) }

func (b *Bitmap) markWord(w int) {
	p := w / WordsPerPage
	b.dirty[p/64] |= 1 << (p % 64)
}

// DirtyPages returns the pages changed since they were last marked clean,
// in ascending order.
func (b *Bitmap) DirtyPages() []int {
	var l []int
	for i, w := range b.dirty {
		for w != 0 {
			bit := w & -w
			l = append(l, i*64+bits.TrailingZeros64(bit))
			w ^= bit
		}
	}
	return l
}

// PageDirty reports whether page p changed since it was marked clean.
func (b *Bitmap) PageDirty(p int) bool { return b.dirty[p/64]&(1<<(p%64)) != 0 }

// MarkClean records that page p is on disk as it is now.
func (b *Bitmap) MarkClean(p int) { b.dirty[p/64] &^= 1 << (p % 64) }

// MarkAllDirty marks every page as changed (e.g. for a full write-out).
func (b *Bitmap) MarkAllDirty() {
	for p := range b.Pages() {
		b.dirty[p/64] |= 1 << (p % 64)
	}
}

// PagesOfBlocks returns the first and last page covering blocks
// [start, start+n), n > 0.
func PagesOfBlocks(start, n uint64) (first, last int) {
	return int(start / BitsPerPage), int((start + n - 1) / BitsPerPage)
}

// AppendPage appends the 4096-byte on-disk encoding of page p to dst.
func (b *Bitmap) AppendPage(dst []byte, p int) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, PageSize)...)
	pg := dst[start:]
	copy(pg[offMagic:], pageMagic)
	binary.BigEndian.PutUint16(pg[offVersion:], PageVersion)
	binary.BigEndian.PutUint32(pg[offIndex:], uint32(p))
	binary.BigEndian.PutUint64(pg[offBits:], b.nbits)
	for i := range WordsPerPage {
		w := p*WordsPerPage + i
		if w >= len(b.words) {
			break
		}
		// Block k of the page is bit k%8 of payload byte k/8: the words
		// are stored little-endian.
		binary.LittleEndian.PutUint64(pg[offPayload+8*i:], b.words[w])
	}
	binary.BigEndian.PutUint64(pg[offPageSum:], xxhash.Sum64(pg[:offPageSum]))
	return dst
}

// CheckPage validates an encoded page: length, checksum, magic, version,
// that it is page p of a bitmap of nbits blocks, and that no bit past nbits
// is set.
func CheckPage(pg []byte, p int, nbits uint64) error {
	if len(pg) != PageSize {
		return ErrPageLength
	}
	if xxhash.Sum64(pg[:offPageSum]) != binary.BigEndian.Uint64(pg[offPageSum:]) {
		// An all-zero page was never written (e.g. a metadata area
		// created by a tool that skipped it): it is not torn, but it is
		// not a bitmap page either.
		if allZero(pg) {
			return fmt.Errorf("%w (page %d was never written)", ErrPageMagic, p)
		}
		return fmt.Errorf("%w (page %d)", ErrPageChecksum, p)
	}
	if string(pg[offMagic:offMagic+4]) != pageMagic {
		return fmt.Errorf("%w (page %d)", ErrPageMagic, p)
	}
	if v := binary.BigEndian.Uint16(pg[offVersion:]); v != PageVersion {
		return fmt.Errorf("%w %d (page %d)", ErrPageVersion, v, p)
	}
	// Flags and reserved bytes are zero in version 1; anything else is a
	// page this version does not understand.
	if !allZero(pg[offFlags:offIndex]) || !allZero(pg[offIndex+4:offBits]) || !allZero(pg[offBits+8:offPayload]) {
		return fmt.Errorf("%w: page %d has unknown flags or reserved bytes set", ErrPageVersion, p)
	}
	if got := binary.BigEndian.Uint32(pg[offIndex:]); got != uint32(p) {
		return fmt.Errorf("%w: page %d found where page %d belongs", ErrPageIndex, got, p)
	}
	if got := binary.BigEndian.Uint64(pg[offBits:]); got != nbits {
		return fmt.Errorf("%w (%w): page %d is from a bitmap of %d blocks, not %d", ErrPageIndex, ErrPageBits, p, got, nbits)
	}
	// Bits past the end must be clear.
	first := uint64(p) * BitsPerPage
	if valid := nbits - min(first, nbits); valid < BitsPerPage {
		payload := pg[offPayload : offPayload+PagePayload]
		if rem := valid % 8; rem != 0 && payload[valid/8]>>rem != 0 {
			return fmt.Errorf("%w: page %d sets blocks past the end (%d blocks)", ErrPageIndex, p, nbits)
		}
		if !allZero(payload[(valid+7)/8:]) {
			return fmt.Errorf("%w: page %d sets blocks past the end (%d blocks)", ErrPageIndex, p, nbits)
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// LoadPage validates an encoded page and replaces page p's bits with it.
// The page is marked clean: memory now matches the disk.
func (b *Bitmap) LoadPage(pg []byte, p int) error {
	if p < 0 || p >= b.Pages() {
		return fmt.Errorf("%w: page %d of %d", ErrPageIndex, p, b.Pages())
	}
	if err := CheckPage(pg, p, b.nbits); err != nil {
		return err
	}
	for i := range WordsPerPage {
		w := p*WordsPerPage + i
		if w >= len(b.words) {
			break
		}
		nw := binary.LittleEndian.Uint64(pg[offPayload+8*i:])
		b.count += uint64(bits.OnesCount64(nw)) - uint64(bits.OnesCount64(b.words[w]))
		b.words[w] = nw
	}
	b.MarkClean(p)
	return nil
}

// SetPage sets every block covered by page p (used when a page cannot be
// read: every block it covers may differ).
func (b *Bitmap) SetPage(p int) uint64 {
	return b.Set(uint64(p)*BitsPerPage, BitsPerPage)
}
