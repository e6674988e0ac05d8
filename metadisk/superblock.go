package metadisk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/cespare/xxhash/v2"
)

// Superblock layout (see doc.go). Part of the format.
const (
	superMagic   = "NBDMIRMD"
	Version      = 1
	maxNameLen   = 64
	sbOffVersion = 8
	sbOffKind    = 10
	sbOffIndex   = 12
	sbOffSeq     = 16
	sbOffData    = 24
	sbOffArea    = 32
	sbOffBlock   = 40
	sbOffRing    = 44
	sbOffFlags   = 48
	sbOffUUIDs   = 56 // current, bitmap, history 1, history 2
	sbOffFloor   = 88
	sbOffCreated = 96
	sbOffDevUUID = 104
	sbOffNode    = 112 // 2-byte length + 64 bytes
	sbOffRes     = 178 // 2-byte length + 64 bytes
	sbEnd        = 244 // first reserved byte
	sbOffSum     = BlockSize - 8
)

// Flags are persistent state bits of the superblock.
type Flags uint32

// Superblock flags. Part of the format.
const (
	// FlagConsistent: the data is a consistent image (not in the middle
	// of a resync as target).
	FlagConsistent Flags = 1 << 0
	// FlagWasUpToDate: the data was UpToDate when last attached.
	FlagWasUpToDate Flags = 1 << 1
	// FlagPrimary: the node was Primary.
	FlagPrimary Flags = 1 << 2
	// FlagCrashedPrimary: the node crashed while Primary; its activity
	// log may hold writes the peer never saw.
	FlagCrashedPrimary Flags = 1 << 3
	// FlagPeerOutdated: the peer's data is known to be Outdated.
	FlagPeerOutdated Flags = 1 << 4
	// FlagClean: shut down cleanly: the bitmap on disk is complete and the
	// activity log is empty.
	FlagClean Flags = 1 << 5

	knownFlags = FlagConsistent | FlagWasUpToDate | FlagPrimary | FlagCrashedPrimary | FlagPeerOutdated | FlagClean
)

func (f Flags) String() string {
	var l []string
	for _, x := range []struct {
		f Flags
		n string
	}{{FlagConsistent, "consistent"}, {FlagWasUpToDate, "was-up-to-date"}, {FlagPrimary, "primary"},
		{FlagCrashedPrimary, "crashed-primary"}, {FlagPeerOutdated, "peer-outdated"}, {FlagClean, "clean"}} {
		if f&x.f != 0 {
			l = append(l, x.n)
		}
	}
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ",")
}

// UUIDJustCreated is the current UUID written by create-md, as DRBD's.
const UUIDJustCreated = 4

// UUIDs are the generation identifiers (reference/drbd.md §4.1).
type UUIDs struct {
	Current, Bitmap uint64
	History         [2]uint64
}

// Superblock is the decoded header of the metadata area.
type Superblock struct {
	Seq      uint64 // incremented on every write; the newer valid slot wins
	Kind     Kind
	Index    int
	DataSize int64
	AreaSize int64
	Flags    Flags
	UUIDs    UUIDs
	// ALFloor is the newest activity-log transaction known durable when
	// the superblock was written: the ring must hold one at least as new.
	ALFloor  uint64
	Created  int64  // unix seconds
	DevUUID  uint64 // random identity of this metadata, fixed at create-md
	Node     string
	Resource string
}

// Decoding errors. A slot with ErrNoSuperblock was never written; the
// others were, and cannot be trusted.
var (
	ErrNoSuperblock    = errors.New("metadisk: no superblock (bad magic)")
	ErrSuperChecksum   = errors.New("metadisk: superblock checksum mismatch (torn or corrupt)")
	ErrSuperVersion    = errors.New("metadisk: unsupported metadata format version")
	ErrSuperInvalid    = errors.New("metadisk: superblock fields are inconsistent")
	ErrBlockLength     = errors.New("metadisk: metadata block is not 4096 bytes")
	errNameTooLong     = errors.New("metadisk: node and resource names must be at most 64 bytes")
	errUnknownSbFields = errors.New("metadisk: superblock has unknown flags or reserved bytes set")
)

// AppendBinary appends the 4096-byte encoding of the superblock.
func (s *Superblock) AppendBinary(dst []byte) ([]byte, error) {
	if len(s.Node) > maxNameLen || len(s.Resource) > maxNameLen {
		return dst, errNameTooLong
	}
	start := len(dst)
	dst = append(dst, make([]byte, BlockSize)...)
	b := dst[start:]
	copy(b, superMagic)
	be := binary.BigEndian
	be.PutUint16(b[sbOffVersion:], Version)
	be.PutUint16(b[sbOffKind:], uint16(s.Kind))
	be.PutUint32(b[sbOffIndex:], uint32(s.Index))
	be.PutUint64(b[sbOffSeq:], s.Seq)
	be.PutUint64(b[sbOffData:], uint64(s.DataSize))
	be.PutUint64(b[sbOffArea:], uint64(s.AreaSize))
	be.PutUint32(b[sbOffBlock:], BlockSize)
	be.PutUint32(b[sbOffRing:], ALRingBlocks)
	be.PutUint32(b[sbOffFlags:], uint32(s.Flags))
	for i, u := range []uint64{s.UUIDs.Current, s.UUIDs.Bitmap, s.UUIDs.History[0], s.UUIDs.History[1]} {
		be.PutUint64(b[sbOffUUIDs+8*i:], u)
	}
	be.PutUint64(b[sbOffFloor:], s.ALFloor)
	be.PutUint64(b[sbOffCreated:], uint64(s.Created))
	be.PutUint64(b[sbOffDevUUID:], s.DevUUID)
	putName(b[sbOffNode:], s.Node)
	putName(b[sbOffRes:], s.Resource)
	be.PutUint64(b[sbOffSum:], xxhash.Sum64(b[:sbOffSum]))
	return dst, nil
}

func putName(b []byte, s string) {
	binary.BigEndian.PutUint16(b, uint16(len(s)))
	copy(b[2:2+maxNameLen], s)
}

func getName(b []byte) (string, error) {
	n := int(binary.BigEndian.Uint16(b))
	if n > maxNameLen {
		return "", fmt.Errorf("%w: name length %d", ErrSuperInvalid, n)
	}
	if !allZero(b[2+n : 2+maxNameLen]) {
		return "", errUnknownSbFields
	}
	return string(b[2 : 2+n]), nil
}

// UnmarshalBinary decodes one 4096-byte superblock slot. It checks the
// length, magic, checksum and version, then Validate checks the fields.
func (s *Superblock) UnmarshalBinary(b []byte) error {
	if len(b) != BlockSize {
		return ErrBlockLength
	}
	if string(b[:8]) != superMagic {
		return ErrNoSuperblock
	}
	be := binary.BigEndian
	if xxhash.Sum64(b[:sbOffSum]) != be.Uint64(b[sbOffSum:]) {
		return ErrSuperChecksum
	}
	if v := be.Uint16(b[sbOffVersion:]); v != Version {
		return fmt.Errorf("%w %d (this nbdmirror reads version %d)", ErrSuperVersion, v, Version)
	}
	if !allZero(b[sbOffFlags+4:sbOffUUIDs]) || !allZero(b[sbEnd:sbOffSum]) {
		return errUnknownSbFields
	}
	*s = Superblock{
		Kind:     Kind(be.Uint16(b[sbOffKind:])),
		Index:    int(be.Uint32(b[sbOffIndex:])),
		Seq:      be.Uint64(b[sbOffSeq:]),
		DataSize: int64(be.Uint64(b[sbOffData:])),
		AreaSize: int64(be.Uint64(b[sbOffArea:])),
		Flags:    Flags(be.Uint32(b[sbOffFlags:])),
		ALFloor:  be.Uint64(b[sbOffFloor:]),
		Created:  int64(be.Uint64(b[sbOffCreated:])),
		DevUUID:  be.Uint64(b[sbOffDevUUID:]),
	}
	s.UUIDs = UUIDs{be.Uint64(b[sbOffUUIDs:]), be.Uint64(b[sbOffUUIDs+8:]),
		[2]uint64{be.Uint64(b[sbOffUUIDs+16:]), be.Uint64(b[sbOffUUIDs+24:])}}
	if bs, ring := be.Uint32(b[sbOffBlock:]), be.Uint32(b[sbOffRing:]); bs != BlockSize || ring != ALRingBlocks {
		return fmt.Errorf("%w: block size %d, ring of %d blocks", ErrSuperInvalid, bs, ring)
	}
	var err error
	if s.Node, err = getName(b[sbOffNode:]); err != nil {
		return err
	}
	if s.Resource, err = getName(b[sbOffRes:]); err != nil {
		return err
	}
	return s.Validate()
}

// Validate checks the fields against each other.
func (s *Superblock) Validate() error {
	switch {
	case s.Kind != Internal && s.Kind != External && s.Kind != Indexed:
		return fmt.Errorf("%w: layout kind %d", ErrSuperInvalid, s.Kind)
	case s.Kind != Indexed && s.Index != 0:
		return fmt.Errorf("%w: index %d on %s metadata", ErrSuperInvalid, s.Index, s.Kind)
	case s.DataSize <= 0 || s.DataSize%BlockSize != 0 || s.DataSize > 1<<56:
		return fmt.Errorf("%w: data size %d", ErrSuperInvalid, s.DataSize)
	case s.Kind != Internal && s.AreaSize != areaSize(s.DataSize),
		s.Kind == Internal && (s.AreaSize < areaSize(s.DataSize) || s.AreaSize > areaSize(1<<56)):
		// Internal metadata may describe less data than its area holds:
		// the size agreed with a smaller peer (see Meta.Resize).
		return fmt.Errorf("%w: metadata area of %d bytes for %d bytes of data (want %d)",
			ErrSuperInvalid, s.AreaSize, s.DataSize, areaSize(s.DataSize))
	case s.Kind == Indexed && s.AreaSize > IndexSlotSize:
		return fmt.Errorf("%w: indexed metadata of %d bytes", ErrSuperInvalid, s.AreaSize)
	case s.Flags&^knownFlags != 0:
		return errUnknownSbFields
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
