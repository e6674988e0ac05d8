package metadisk

import (
	"errors"
	"fmt"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// Fixed sizes of the metadata area (see doc.go). Part of the format.
const (
	BlockSize     = 4096
	superSlots    = 2
	ALRingBlocks  = 256 // 1 MiB: three transactions of the largest activity log
	offSuperA     = 0
	offSuperB     = BlockSize
	offALRing     = superSlots * BlockSize
	offBitmap     = offALRing + ALRingBlocks*BlockSize
	IndexSlotSize = 128 << 20 // one slot of `meta-disk PATH[N]`
)

// Kind is where the metadata lives.
type Kind uint16

// Metadata placements, as drbd.conf's meta-disk.
const (
	Internal Kind = 1 // at the end of the data disk
	External Kind = 2 // from offset 0 of a separate device, sized to the data
	Indexed  Kind = 3 // in 128 MiB slot N of a separate device
)

func (k Kind) String() string {
	switch k {
	case Internal:
		return "internal"
	case External:
		return "external"
	case Indexed:
		return "indexed"
	}
	return fmt.Sprintf("kind(%d)", uint16(k))
}

// ErrTooSmall is returned when a disk or metadata device cannot hold what
// the layout needs.
var ErrTooSmall = errors.New("metadisk: device too small")

// Layout says where the metadata area lies and how much data it covers.
type Layout struct {
	Kind     Kind
	Index    int   // slot number for Indexed
	Offset   int64 // start of the metadata area on the metadata device
	Size     int64 // bytes of the metadata area
	DataSize int64 // bytes of data the bitmap covers (a multiple of 4 KiB)
}

// Blocks returns the number of bitmap blocks of the data.
func (l Layout) Blocks() uint64 { return bitmap.Blocks(l.DataSize) }

// Pages returns the number of bitmap pages.
func (l Layout) Pages() int { return bitmap.PagesFor(l.Blocks()) }

// areaSize returns the metadata area size needed for dataSize bytes.
func areaSize(dataSize int64) int64 {
	return offBitmap + int64(bitmap.PagesFor(bitmap.Blocks(dataSize)))*BlockSize
}

func floorBlock(n int64) int64 { return n / BlockSize * BlockSize }

// InternalLayout places the metadata at the end of a disk of diskSize
// bytes; the data is what remains, rounded down to 4 KiB.
func InternalLayout(diskSize int64) (Layout, error) {
	data := floorBlock(diskSize - offBitmap)
	for data > 0 {
		md := areaSize(data)
		if data+md <= diskSize {
			// The area ends at the last whole 4 KiB of the disk.
			return Layout{Kind: Internal, Offset: floorBlock(diskSize - md), Size: md, DataSize: data}, nil
		}
		data = floorBlock(diskSize - md)
	}
	return Layout{}, fmt.Errorf("%w: a %d-byte disk cannot hold internal metadata (at least %d bytes plus data)",
		ErrTooSmall, diskSize, offBitmap+BlockSize)
}

// ExternalLayout places the metadata at the start of a separate device of
// mdSize bytes, sized to a data disk of diskSize bytes.
func ExternalLayout(diskSize, mdSize int64) (Layout, error) {
	data := floorBlock(diskSize)
	if data <= 0 {
		return Layout{}, fmt.Errorf("%w: the data disk is %d bytes", ErrTooSmall, diskSize)
	}
	md := areaSize(data)
	if mdSize < md {
		return Layout{}, fmt.Errorf("%w: metadata for %d bytes of data needs %d bytes, the metadata device has %d",
			ErrTooSmall, data, md, mdSize)
	}
	return Layout{Kind: External, Offset: 0, Size: md, DataSize: data}, nil
}

// IndexedLayout places the metadata in 128 MiB slot index of a separate
// device of mdSize bytes (drbd.conf's `meta-disk PATH[N]`); one slot covers
// up to about 3.9 TiB of data.
func IndexedLayout(diskSize, mdSize int64, index int) (Layout, error) {
	if index < 0 || index > 1<<20 {
		return Layout{}, fmt.Errorf("metadisk: meta-disk index %d out of range", index)
	}
	data := floorBlock(diskSize)
	if data <= 0 {
		return Layout{}, fmt.Errorf("%w: the data disk is %d bytes", ErrTooSmall, diskSize)
	}
	md := areaSize(data)
	if md > IndexSlotSize {
		return Layout{}, fmt.Errorf("%w: %d bytes of data need %d bytes of metadata, more than a 128 MiB slot: use meta-disk internal or an external device without an index",
			ErrTooSmall, data, md)
	}
	off := int64(index) * IndexSlotSize
	if mdSize < off+IndexSlotSize {
		return Layout{}, fmt.Errorf("%w: slot %d needs a metadata device of at least %d bytes, it has %d",
			ErrTooSmall, index, off+IndexSlotSize, mdSize)
	}
	return Layout{Kind: Indexed, Index: index, Offset: off, Size: md, DataSize: data}, nil
}

// AreaSize returns the bytes of metadata area that dataSize bytes of data
// need: superblocks, activity-log ring and ceil(blocks/31744) bitmap pages.
func AreaSize(dataSize int64) int64 { return areaSize(dataSize) }

// MaxDataIn returns the most data, in bytes, whose bitmap fits in a
// metadata area of area bytes (0 if not even the fixed part fits).
func MaxDataIn(area int64) int64 {
	pages := (area - offBitmap) / BlockSize
	if pages <= 0 {
		return 0
	}
	return pages * bitmap.BitsPerPage * BlockSize
}

// ExternalCapacity is the layout of `meta-disk PATH` for a running
// resource: the area at offset 0 of a metadata device of mdSize bytes,
// covering as much of a data disk of diskSize bytes as the device holds.
// Unlike ExternalLayout (create-md's) it does not fail when the data disk
// has grown past what the metadata device can describe: the data size is
// capped, and a resize past the cap is refused with a clear error.
func ExternalCapacity(diskSize, mdSize int64) (Layout, error) {
	data := min(floorBlock(diskSize), MaxDataIn(mdSize))
	if data <= 0 {
		return Layout{}, fmt.Errorf("%w: a %d-byte data disk with a %d-byte metadata device", ErrTooSmall, diskSize, mdSize)
	}
	return Layout{Kind: External, Offset: 0, Size: areaSize(data), DataSize: data}, nil
}

// IndexedCapacity is IndexedLayout for a running resource: the data size
// is capped at what one 128 MiB slot describes (about 3.9 TiB).
func IndexedCapacity(diskSize, mdSize int64, index int) (Layout, error) {
	data := min(floorBlock(diskSize), MaxDataIn(IndexSlotSize))
	l, err := IndexedLayout(data, mdSize, index)
	if err != nil {
		return Layout{}, err
	}
	return l, nil
}
