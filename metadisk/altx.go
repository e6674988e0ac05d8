package metadisk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/cespare/xxhash/v2"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// Activity-log transaction block layout (see doc.go). Part of the format.
const (
	alMagic        = "NMAL"
	alOffVersion   = 4
	alOffPart      = 6
	alOffParts     = 8
	alOffTotal     = 12
	alOffSeq       = 16
	alOffSlot      = 24
	alOffCount     = 28
	alOffExtents   = 40
	alOffSum       = BlockSize - 8
	ExtentsPerTxBk = (alOffSum - alOffExtents) / 4 // 1012
	// MaxTxBlocks is the most blocks one transaction may span: three of
	// the largest fit in the ring.
	MaxTxBlocks = (bitmap.MaxALExtents + ExtentsPerTxBk - 1) / ExtentsPerTxBk
)

// Errors decoding an activity-log block. ErrALNotWritten marks a slot that
// holds no transaction block at all.
var (
	ErrALNotWritten = errors.New("metadisk: activity-log slot never written")
	ErrALChecksum   = errors.New("metadisk: activity-log block checksum mismatch (torn or corrupt)")
	ErrALInvalid    = errors.New("metadisk: activity-log block fields are inconsistent")
)

// TxBlocks returns how many ring blocks a transaction of n extents needs.
func TxBlocks(n int) int { return max(1, (n+ExtentsPerTxBk-1)/ExtentsPerTxBk) }

// txBlock is one decoded block of a transaction.
type txBlock struct {
	seq         uint64
	part, parts int
	total       int
	slot        int // ring slot of part 0
	extents     []bitmap.Extent
}

// appendTx appends the encoding of a transaction (sequence seq, sorted
// extents) starting at ring slot slot: TxBlocks(len(extents)) blocks.
func appendTx(dst []byte, seq uint64, slot int, extents []bitmap.Extent) []byte {
	parts := TxBlocks(len(extents))
	for part := range parts {
		chunk := extents[min(part*ExtentsPerTxBk, len(extents)):min((part+1)*ExtentsPerTxBk, len(extents))]
		start := len(dst)
		dst = append(dst, make([]byte, BlockSize)...)
		b := dst[start:]
		be := binary.BigEndian
		copy(b, alMagic)
		be.PutUint16(b[alOffVersion:], Version)
		be.PutUint16(b[alOffPart:], uint16(part))
		be.PutUint16(b[alOffParts:], uint16(parts))
		be.PutUint32(b[alOffTotal:], uint32(len(extents)))
		be.PutUint64(b[alOffSeq:], seq)
		be.PutUint32(b[alOffSlot:], uint32(slot))
		be.PutUint32(b[alOffCount:], uint32(len(chunk)))
		for i, e := range chunk {
			be.PutUint32(b[alOffExtents+4*i:], uint32(e))
		}
		be.PutUint64(b[alOffSum:], xxhash.Sum64(b[:alOffSum]))
	}
	return dst
}

// decodeTxBlock decodes one ring block, bounding every count before use.
// maxExtent is the number of extents of the device: a block naming an
// extent past it is invalid.
func decodeTxBlock(b []byte, maxExtent uint64) (txBlock, error) {
	if len(b) != BlockSize {
		return txBlock{}, ErrBlockLength
	}
	if string(b[:4]) != alMagic {
		return txBlock{}, ErrALNotWritten
	}
	be := binary.BigEndian
	if xxhash.Sum64(b[:alOffSum]) != be.Uint64(b[alOffSum:]) {
		return txBlock{}, ErrALChecksum
	}
	if v := be.Uint16(b[alOffVersion:]); v != Version {
		return txBlock{}, fmt.Errorf("%w: version %d", ErrALInvalid, v)
	}
	t := txBlock{
		seq:   be.Uint64(b[alOffSeq:]),
		part:  int(be.Uint16(b[alOffPart:])),
		parts: int(be.Uint16(b[alOffParts:])),
		total: int(be.Uint32(b[alOffTotal:])),
		slot:  int(be.Uint32(b[alOffSlot:])),
	}
	count := int(be.Uint32(b[alOffCount:]))
	switch {
	case t.parts < 1 || t.parts > MaxTxBlocks || t.part >= t.parts:
		return txBlock{}, fmt.Errorf("%w: part %d of %d", ErrALInvalid, t.part, t.parts)
	case t.total > bitmap.MaxALExtents || t.parts != TxBlocks(t.total):
		return txBlock{}, fmt.Errorf("%w: %d extents in %d blocks", ErrALInvalid, t.total, t.parts)
	case count != min(ExtentsPerTxBk, t.total-t.part*ExtentsPerTxBk):
		return txBlock{}, fmt.Errorf("%w: %d extents in part %d of a %d-extent transaction", ErrALInvalid, count, t.part, t.total)
	case t.slot < 0 || t.slot >= ALRingBlocks:
		return txBlock{}, fmt.Errorf("%w: slot %d", ErrALInvalid, t.slot)
	case be.Uint16(b[10:]) != 0 || !allZero(b[32:alOffExtents]) || !allZero(b[alOffExtents+4*count:alOffSum]):
		return txBlock{}, fmt.Errorf("%w: reserved bytes set", ErrALInvalid)
	}
	t.extents = make([]bitmap.Extent, count)
	for i := range t.extents {
		e := be.Uint32(b[alOffExtents+4*i:])
		if uint64(e) >= maxExtent || (i > 0 && bitmap.Extent(e) <= t.extents[i-1]) {
			return txBlock{}, fmt.Errorf("%w: extent %d out of order or past the device (%d extents)", ErrALInvalid, e, maxExtent)
		}
		t.extents[i] = bitmap.Extent(e)
	}
	return t, nil
}

// ringState is what a scan of the activity-log ring found.
type ringState struct {
	newest   uint64          // sequence of the newest complete transaction (0: none)
	active   []bitmap.Extent // its extents
	maxSeq   uint64          // newest sequence seen in any valid block
	nextSlot int             // where the next transaction goes
	torn     int             // blocks with a bad checksum
}

// scanRing finds the newest complete transaction in the ring: every part
// present, valid, contiguous from its recorded slot, and the parts' extents
// sorted across parts. A torn or partial newer transaction is ignored.
func scanRing(ring []byte, maxExtent uint64) (ringState, error) {
	blocks := make(map[int]txBlock)
	var st ringState
	for i := range ALRingBlocks {
		t, err := decodeTxBlock(ring[i*BlockSize:(i+1)*BlockSize], maxExtent)
		switch {
		case errors.Is(err, ErrALNotWritten):
			continue
		case errors.Is(err, ErrALChecksum):
			st.torn++
			continue
		case err != nil:
			return ringState{}, fmt.Errorf("activity-log slot %d: %w", i, err)
		}
		blocks[i] = t
		st.maxSeq = max(st.maxSeq, t.seq)
	}
	// Complete transactions, newest first.
	seqs := make([]uint64, 0, len(blocks))
	for _, t := range blocks {
		if t.part == 0 {
			seqs = append(seqs, t.seq)
		}
	}
	slices.Sort(seqs)
	for i := len(seqs) - 1; i >= 0; i-- {
		if active, slot, ok := assemble(blocks, seqs[i]); ok {
			st.newest, st.active = seqs[i], active
			st.nextSlot = slot
			return st, nil
		}
	}
	return st, nil
}

// assemble collects the parts of transaction seq; ok if all are present
// and consistent. slot is the ring slot after its last part.
func assemble(blocks map[int]txBlock, seq uint64) (active []bitmap.Extent, slot int, ok bool) {
	var first txBlock
	for i, t := range blocks {
		if t.seq == seq && t.part == 0 && i == t.slot {
			first = t
			ok = true
		}
	}
	if !ok || first.slot+first.parts > ALRingBlocks {
		return nil, 0, false
	}
	for p := range first.parts {
		t, present := blocks[first.slot+p]
		if !present || t.seq != seq || t.part != p || t.parts != first.parts || t.total != first.total || t.slot != first.slot {
			return nil, 0, false
		}
		if len(active) > 0 && len(t.extents) > 0 && t.extents[0] <= active[len(active)-1] {
			return nil, 0, false
		}
		active = append(active, t.extents...)
	}
	if len(active) != first.total {
		return nil, 0, false
	}
	return active, (first.slot + first.parts) % ALRingBlocks, true
}
