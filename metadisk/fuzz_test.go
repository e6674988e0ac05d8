package metadisk

import (
	"bytes"
	"testing"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// FuzzSuperblock decodes arbitrary superblock slots: no panic, and an
// accepted one re-encodes to the same bytes. With fixSum the harness seals
// the input first, so mutations reach the field checks.
func FuzzSuperblock(f *testing.F) {
	sb := Superblock{Seq: 3, Kind: Internal, DataSize: 1 << 30, AreaSize: areaSize(1 << 30), Flags: FlagClean,
		UUIDs: UUIDs{Current: UUIDJustCreated}, ALFloor: 1, Created: 1, DevUUID: 2, Node: "alpha", Resource: "r0"}
	b, _ := sb.AppendBinary(nil)
	f.Add(b, false)
	f.Add(b, true)
	f.Add(make([]byte, BlockSize), true)
	f.Fuzz(func(t *testing.T, b []byte, fixSum bool) {
		if fixSum && len(b) == BlockSize {
			b = sealed(bytes.Clone(b))
		}
		var s Superblock
		if s.UnmarshalBinary(b) != nil {
			return
		}
		out, err := s.AppendBinary(nil)
		if err != nil || !bytes.Equal(out, b) {
			t.Fatalf("accepted superblock re-encodes differently: %v", err)
		}
	})
}

// FuzzALBlock decodes arbitrary activity-log blocks: no panic, counts
// bounded, extents inside the device and ascending, and an accepted block
// re-encodes to the same bytes.
func FuzzALBlock(f *testing.F) {
	f.Add(appendTx(nil, 5, 0, []bitmap.Extent{1, 2, 90}), uint32(100), false)
	two := appendTx(nil, 6, 3, make([]bitmap.Extent, 1500))
	f.Add(two[BlockSize:], uint32(3000), true)
	f.Add(make([]byte, BlockSize), uint32(1), true)
	f.Fuzz(func(t *testing.T, b []byte, maxExtent uint32, fixSum bool) {
		if fixSum && len(b) == BlockSize {
			b = sealedTx(bytes.Clone(b))
		}
		blk, err := decodeTxBlock(b, uint64(maxExtent))
		if err != nil {
			return
		}
		if len(blk.extents) > ExtentsPerTxBk || blk.parts > MaxTxBlocks {
			t.Fatalf("accepted %d extents in %d parts", len(blk.extents), blk.parts)
		}
		for i, e := range blk.extents {
			if uint32(e) >= maxExtent || i > 0 && e <= blk.extents[i-1] {
				t.Fatalf("accepted extent %d", e)
			}
		}
		// Re-encode the part as the writer would (single-part blocks only:
		// a part of a larger transaction re-encodes with its siblings).
		if blk.parts == 1 {
			if out := appendTx(nil, blk.seq, blk.slot, blk.extents); !bytes.Equal(out, b) {
				t.Fatal("accepted block re-encodes differently")
			}
		}
	})
}
