package wire

import (
	"encoding/binary"
	"math/bits"
	"slices"

	"github.com/nbdmirror/nbdmirror/transport"
)

// ResyncReply.Status values. Part of the wire format.
const (
	ReplyData    = 0 // Data holds Length bytes
	ReplyInSync  = 1 // every block's digest equals the request's: no data
	ReplyError   = 2 // the source could not read the range: no data
	ReplyPartial = 3 // Present marks the blocks whose digests differ; Data holds them, in order
)

// MaxCsumsBlocks bounds the blocks of a ResyncRequest with digests (one
// digest per 4 KiB block): 256 blocks, 1 MiB.
const MaxCsumsBlocks = 256

// VerifyReply.Status values. Part of the wire format.
const (
	VerifyEqual   = 0
	VerifyDiffers = 1
	VerifyError   = 2 // the target could not read the range
)

// rangeHeader is the size of the version, ID, offset and length that
// start the resync and verify messages.
const rangeHeader = 21

// ResyncRequest asks the SyncSource for [Offset, Offset+Length) (Data
// stream). With Digests (resync by checksum), one digest of the target's
// copy of each 4 KiB block, all of one size, the source sends only the
// blocks whose digest differs from its own (ReplyInSync, ReplyPartial).
type ResyncRequest struct {
	ID     uint64
	Offset uint64 // bytes, a multiple of 4096
	Length uint32 // bytes, a multiple of 4096, 1..MaxData (1..MaxCsumsBlocks blocks with digests)
	// Digests is empty, or Length/4096 digests of 1..MaxDigest bytes each,
	// concatenated; it aliases the payload when decoded.
	Digests []byte
}

// Type returns TypeResyncRequest.
func (ResyncRequest) Type() transport.Type { return TypeResyncRequest }

// Append appends m's payload to dst.
func (m ResyncRequest) Append(dst []byte) []byte {
	dst = appendRange(dst, 2+len(m.Digests), m.ID, m.Offset, m.Length)
	return appendBytes16(dst, m.Digests)
}

// DigestSize returns the size of one block's digest (0 without digests).
func (m ResyncRequest) DigestSize() int {
	if len(m.Digests) == 0 {
		return 0
	}
	return len(m.Digests) / int(m.Length/blockSize)
}

// Validate reports the first field that Decode would reject.
func (m ResyncRequest) Validate() error {
	const msg = "ResyncRequest"
	if err := checkRange(msg, m.Offset, m.Length, blockSize); err != nil {
		return err
	}
	if len(m.Digests) == 0 {
		return nil
	}
	blocks := int(m.Length / blockSize)
	switch {
	case blocks > MaxCsumsBlocks:
		return malformed(msg, "digests for %d blocks, at most %d", blocks, MaxCsumsBlocks)
	case len(m.Digests)%blocks != 0 || len(m.Digests)/blocks > MaxDigest:
		return malformed(msg, "digests of %d bytes for %d blocks: want 1 to %d bytes per block", len(m.Digests), blocks, MaxDigest)
	}
	return nil
}

func decodeResyncRequest(p []byte) (Message, error) {
	d := newDecoder("ResyncRequest", p)
	m := ResyncRequest{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length")}
	m.Digests = d.bytes16("digests")
	return finish(&d, m)
}

// ResyncReply answers a ResyncRequest (Data stream), echoing its ID and
// range.
type ResyncReply struct {
	ID     uint64
	Offset uint64 // bytes, a multiple of 4096
	Length uint32 // bytes, a multiple of 4096, 1..MaxData
	Status uint8  // ReplyData, ReplyInSync, ReplyError or ReplyPartial
	// Present (ReplyPartial only) has one bit per block of the range,
	// bit i%8 of byte i/8 for block i, set for the blocks Data holds; at
	// least one bit set, none past the range.
	Present []byte
	// Data is Length bytes for ReplyData, the present blocks for
	// ReplyPartial, empty otherwise; it aliases the payload when decoded.
	Data []byte
}

// Type returns TypeResyncReply.
func (ResyncReply) Type() transport.Type { return TypeResyncReply }

// Append appends m's payload to dst.
func (m ResyncReply) Append(dst []byte) []byte {
	return append(m.AppendHeader(dst), m.Data...)
}

// AppendHeader appends m's payload without its data (the payload is the
// header followed by Data).
func (m ResyncReply) AppendHeader(dst []byte) []byte {
	dst = appendRange(dst, 1+len(m.Present)+len(m.Data), m.ID, m.Offset, m.Length)
	return append(append(dst, m.Status), m.Present...)
}

// Bulk returns m's data, which follows AppendHeader's bytes in the payload.
func (m ResyncReply) Bulk() []byte { return m.Data }

// PresentBlocks returns how many blocks Present marks.
func (m ResyncReply) PresentBlocks() int {
	n := 0
	for _, b := range m.Present {
		n += bits.OnesCount8(b)
	}
	return n
}

// presentLen is the size of Present for a range of length bytes.
func presentLen(length uint32) int { return (int(length/blockSize) + 7) / 8 }

// Validate reports the first field that Decode would reject.
func (m ResyncReply) Validate() error {
	const msg = "ResyncReply"
	if err := checkRange(msg, m.Offset, m.Length, blockSize); err != nil {
		return err
	}
	switch {
	case m.Status > ReplyPartial:
		return malformed(msg, "status %d unknown", m.Status)
	case m.Status != ReplyPartial && len(m.Present) != 0:
		return malformed(msg, "a block map with status %d", m.Status)
	case m.Status == ReplyData && len(m.Data) != int(m.Length):
		return malformed(msg, "data of %d bytes for length %d", len(m.Data), m.Length)
	case m.Status == ReplyInSync && len(m.Data) != 0, m.Status == ReplyError && len(m.Data) != 0:
		return malformed(msg, "data of %d bytes with status %d", len(m.Data), m.Status)
	case m.Status != ReplyPartial:
		return nil
	case len(m.Present) != presentLen(m.Length):
		return malformed(msg, "block map of %d bytes for %d blocks", len(m.Present), m.Length/blockSize)
	}
	if blocks := int(m.Length / blockSize); blocks%8 != 0 && m.Present[len(m.Present)-1]>>(blocks%8) != 0 {
		return malformed(msg, "block map marks blocks past the range")
	}
	if n := m.PresentBlocks(); n == 0 || len(m.Data) != n*blockSize {
		return malformed(msg, "data of %d bytes for %d blocks marked", len(m.Data), n)
	}
	return nil
}

func decodeResyncReply(p []byte) (Message, error) {
	d := newDecoder("ResyncReply", p)
	m := ResyncReply{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length"), Status: d.u8("status")}
	if m.Status == ReplyPartial && d.err == nil {
		if b := d.take("block map", presentLen(m.Length)); len(b) > 0 {
			m.Present = b
		}
	}
	m.Data = d.rest()
	return finish(&d, m)
}

// ResyncAck tells the SyncSource that the SyncTarget made a range durable,
// so the source may clear its bits (Control stream).
type ResyncAck struct {
	ID, Offset uint64
	Length     uint32
	Status     uint8 // AckOK or AckFailed
}

// Type returns TypeResyncAck.
func (ResyncAck) Type() transport.Type { return TypeResyncAck }

// Append appends m's payload to dst.
func (m ResyncAck) Append(dst []byte) []byte {
	return append(appendRange(dst, 1, m.ID, m.Offset, m.Length), m.Status)
}

// Validate reports the first field that Decode would reject.
func (m ResyncAck) Validate() error {
	if err := checkRange("ResyncAck", m.Offset, m.Length, blockSize); err != nil {
		return err
	}
	if m.Status > AckFailed {
		return malformed("ResyncAck", "status %d unknown", m.Status)
	}
	return nil
}

func decodeResyncAck(p []byte) (Message, error) {
	d := newDecoder("ResyncAck", p)
	m := ResyncAck{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length"), Status: d.u8("status")}
	return finish(&d, m)
}

// VerifyRequest asks the VerifyTarget to compare a range with the
// source's digest of it (Data stream).
type VerifyRequest struct {
	ID, Offset uint64 // Offset: bytes, a multiple of 4096
	Length     uint32 // bytes, a multiple of 4096, 1..MaxData
	Digest     []byte // 1..MaxDigest bytes; aliases the payload when decoded
}

// Type returns TypeVerifyRequest.
func (VerifyRequest) Type() transport.Type { return TypeVerifyRequest }

// Append appends m's payload to dst.
func (m VerifyRequest) Append(dst []byte) []byte {
	dst = appendRange(dst, 1+len(m.Digest), m.ID, m.Offset, m.Length)
	return appendBytes8(dst, m.Digest)
}

// Validate reports the first field that Decode would reject.
func (m VerifyRequest) Validate() error {
	if err := checkRange("VerifyRequest", m.Offset, m.Length, blockSize); err != nil {
		return err
	}
	return checkDigest("VerifyRequest", m.Digest, 1)
}

func decodeVerifyRequest(p []byte) (Message, error) {
	d := newDecoder("VerifyRequest", p)
	m := VerifyRequest{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length")}
	m.Digest = d.bytes8("digest")
	return finish(&d, m)
}

// VerifyReply answers a VerifyRequest, echoing its ID and range (Control
// stream).
type VerifyReply struct {
	ID, Offset uint64
	Length     uint32
	Status     uint8 // VerifyEqual, VerifyDiffers or VerifyError
}

// Type returns TypeVerifyReply.
func (VerifyReply) Type() transport.Type { return TypeVerifyReply }

// Append appends m's payload to dst.
func (m VerifyReply) Append(dst []byte) []byte {
	return append(appendRange(dst, 1, m.ID, m.Offset, m.Length), m.Status)
}

// Validate reports the first field that Decode would reject.
func (m VerifyReply) Validate() error {
	if err := checkRange("VerifyReply", m.Offset, m.Length, blockSize); err != nil {
		return err
	}
	if m.Status > VerifyError {
		return malformed("VerifyReply", "status %d unknown", m.Status)
	}
	return nil
}

func decodeVerifyReply(p []byte) (Message, error) {
	d := newDecoder("VerifyReply", p)
	m := VerifyReply{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length"), Status: d.u8("status")}
	return finish(&d, m)
}

// OutOfSync tells the peer, from a Primary in Ahead mode, that a range
// changed without being replicated (Data stream).
type OutOfSync struct {
	Offset uint64 // bytes, a multiple of 4096
	Length uint32 // bytes, a multiple of 4096, 1..MaxData
}

// Type returns TypeOutOfSync.
func (OutOfSync) Type() transport.Type { return TypeOutOfSync }

// Append appends m's payload to dst.
func (m OutOfSync) Append(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint64(append(dst, version), m.Offset)
	return binary.BigEndian.AppendUint32(dst, m.Length)
}

// Validate reports the first field that Decode would reject.
func (m OutOfSync) Validate() error {
	return checkRange("OutOfSync", m.Offset, m.Length, blockSize)
}

func decodeOutOfSync(p []byte) (Message, error) {
	d := newDecoder("OutOfSync", p)
	m := OutOfSync{Offset: d.u64("offset"), Length: d.u32("length")}
	return finish(&d, m)
}

// appendRange appends the version, id, offset and length, growing dst for
// more bytes after them.
func appendRange(dst []byte, more int, id, off uint64, length uint32) []byte {
	dst = slices.Grow(dst, rangeHeader+more)
	dst = append(dst, version)
	dst = binary.BigEndian.AppendUint64(dst, id)
	dst = binary.BigEndian.AppendUint64(dst, off)
	return binary.BigEndian.AppendUint32(dst, length)
}
