package wire

import (
	"encoding/binary"

	"github.com/nbdmirror/nbdmirror/transport"
)

// TypeSizes is the online-resize message (Data stream). Nodes send it only
// to a peer whose session speaks transport protocol version 4 or newer
// (SizesVersion): an older node does not register the type and would end
// the session on it.
const TypeSizes transport.Type = 32

// SizesVersion is the first transport protocol version whose nodes
// understand Sizes.
const SizesVersion = 4

// Sizes is one step of an online resize (`nbdmirror resize`), which the
// Primary drives: it asks the peer how much its disk holds now
// (SizesQuery, answered by SizesReply), then tells it the new size
// (SizesSet, answered by SizesDone once the peer's metadata covers it, or
// with Status 1 if it could not).
type Sizes struct {
	Kind   uint8  // SizesQuery … SizesDone
	Flags  uint8  // SizesAssumeClean
	Status uint8  // SizesDone: SizesOK, SizesFailed or SizesMarked; 0 otherwise
	Disk   uint64 // the sender's capacity: the most data its disk and metadata can hold now (bytes)
	Size   uint64 // SizesSet, SizesDone: the new size; SizesQuery, SizesReply: the sender's current size
}

// Sizes kinds. Part of the wire format: never renumber.
const (
	SizesQuery = 1 // how much can your disk hold? (answer: SizesReply)
	SizesReply = 2 // this much (Disk)
	SizesSet   = 3 // resize to Size (answer: SizesDone)
	SizesDone  = 4 // resized to Size (Status 0), or not (Status 1)
)

// SizesDone statuses. Part of the wire format.
const (
	SizesOK     = 0 // resized
	SizesFailed = 1 // not resized (the sender logs why)
	// SizesMarked: resized, and blocks were marked out of sync on the
	// sender (its old internal metadata area, now data): the Primary
	// resyncs them even with assume-clean.
	SizesMarked = 2
)

// MaxSize bounds the sizes a Sizes message carries (64 PiB): more than
// any disk, and far from overflowing the signed 64-bit sizes that nodes
// compute with.
const MaxSize = 1 << 56

// SizesAssumeClean (SizesSet) says that the grown area is not resynced:
// both disks hold the same there (`resize --assume-clean`).
const SizesAssumeClean = 1

// Type returns TypeSizes.
func (Sizes) Type() transport.Type { return TypeSizes }

// Append appends m's payload to dst.
func (m Sizes) Append(dst []byte) []byte {
	dst = append(dst, version, m.Kind, m.Flags, m.Status)
	dst = binary.BigEndian.AppendUint64(dst, m.Disk)
	return binary.BigEndian.AppendUint64(dst, m.Size)
}

// Validate reports the first field that Decode would reject.
func (m Sizes) Validate() error {
	switch {
	case m.Kind < SizesQuery || m.Kind > SizesDone:
		return malformed("Sizes", "kind %d unknown", m.Kind)
	case m.Flags&^SizesAssumeClean != 0:
		return malformed("Sizes", "reserved flags %#x set", m.Flags&^SizesAssumeClean)
	case m.Flags != 0 && m.Kind != SizesSet:
		return malformed("Sizes", "flags %#x on kind %d", m.Flags, m.Kind)
	case m.Status > SizesMarked || m.Status != 0 && m.Kind != SizesDone:
		return malformed("Sizes", "status %d on kind %d", m.Status, m.Kind)
	case m.Disk%blockSize != 0:
		return malformed("Sizes", "disk size %d not a multiple of %d", m.Disk, blockSize)
	case m.Size%blockSize != 0:
		return malformed("Sizes", "size %d not a multiple of %d", m.Size, blockSize)
	case m.Disk > MaxSize:
		return malformed("Sizes", "disk size %d above the maximum %d", m.Disk, uint64(MaxSize))
	case m.Size > MaxSize:
		return malformed("Sizes", "size %d above the maximum %d", m.Size, uint64(MaxSize))
	case m.Kind == SizesSet && m.Size == 0:
		return malformed("Sizes", "resize to 0 bytes")
	}
	return nil
}

func decodeSizes(p []byte) (Message, error) {
	d := newDecoder("Sizes", p)
	m := Sizes{Kind: d.u8("kind"), Flags: d.u8("flags"), Status: d.u8("status"), Disk: d.u64("disk size"), Size: d.u64("size")}
	return finish(&d, m)
}
