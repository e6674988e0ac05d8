package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/nbdmirror/nbdmirror/transport"
)

// ErrMalformed is wrapped by every decoding error: the payload is not a
// valid message of its type. A peer that sends one is broken or hostile,
// and the session should end.
var ErrMalformed = errors.New("malformed message")

// Message types (transport frame types). Part of the wire format: never
// renumber.
const (
	TypeParams        transport.Type = 16 + iota // 16
	TypeState                                    // 17
	TypeUUIDs                                    // 18
	TypeBitmap                                   // 19
	TypeSyncUUID                                 // 20
	TypeWrite                                    // 21
	TypeBarrier                                  // 22
	TypeBarrierAck                               // 23
	TypeWriteAck                                 // 24
	TypeResyncRequest                            // 25
	TypeResyncReply                              // 26
	TypeResyncAck                                // 27
	TypeVerifyRequest                            // 28
	TypeVerifyReply                              // 29
	TypeOutOfSync                                // 30
	TypeCommand                                  // 31
)

// typeEnd is one past the last message type.
const typeEnd = TypeReadReply + 1

// Bounds. Part of the wire format.
const (
	// MaxData bounds the data of a Write or ResyncReply, and the Length of
	// every message that names a range.
	MaxData = 32 << 20
	// MaxDigest bounds a digest (SHA-512 would fit).
	MaxDigest = 64
	// MaxName bounds an algorithm name.
	MaxName = 64

	// version is the first byte of every payload.
	version = 1
	// sectorSize aligns a Write's offset and length.
	sectorSize = 512
	// blockSize aligns the ranges of resync, verify and out-of-sync
	// messages: one bit of the bitmap.
	blockSize = 4096
	// maxBitmapCount bounds the blocks one Bitmap chunk describes.
	maxBitmapCount = 1 << 32
	// maxEpoch bounds Params.MaxEpoch (DRBD's max-epoch-size).
	maxEpoch = 20000
)

// Types returns every message type, for transport.Config.Types.
func Types() []transport.Type {
	ts := make([]transport.Type, 0, typeEnd-TypeParams)
	for t := TypeParams; t < typeEnd; t++ {
		ts = append(ts, t)
	}
	return ts
}

// names are the message types' names, from TypeParams on.
var names = [...]string{"Params", "State", "UUIDs", "Bitmap", "SyncUUID", "Write", "Barrier", "BarrierAck",
	"WriteAck", "ResyncRequest", "ResyncReply", "ResyncAck", "VerifyRequest", "VerifyReply", "OutOfSync",
	"Command", "Sizes", "ReadRequest", "ReadReply"}

// Name returns the name of message type t ("Write"), or "type N" for a
// type this package does not define: for logs and errors.
func Name(t transport.Type) string {
	if t >= TypeParams && t < typeEnd {
		return names[t-TypeParams]
	}
	return fmt.Sprintf("type %d", t)
}

// Message is one of the message structs of this package (Params, State,
// UUIDs, Bitmap, SyncUUID, Write, Barrier, BarrierAck, WriteAck,
// ResyncRequest, ResyncReply, ResyncAck, VerifyRequest, VerifyReply,
// OutOfSync, Command, Sizes, ReadRequest, ReadReply), as a value, not a pointer. Each also has a
// Validate method, which reports (wrapping ErrMalformed) the first field
// that Decode would reject.
type Message interface {
	// Type is the message's transport frame type.
	Type() transport.Type
	// Append appends the encoded payload to dst. It encodes the fields as
	// they are: a message whose Validate method fails encodes to a
	// payload that Decode rejects.
	Append(dst []byte) []byte
}

// BulkMessage is a message whose payload is a header followed by bulk
// data (Write, ResyncReply), for a sender that sends the data from where
// it is rather than copying it into the payload: the payload is
// AppendHeader's bytes followed by Bulk's.
type BulkMessage interface {
	Message
	AppendHeader(dst []byte) []byte
	Bulk() []byte
}

// Encode returns m's payload: m.Append(nil).
func Encode(m Message) []byte {
	return m.Append(nil)
}

// Decode decodes the payload p of a frame of type t, returning the
// message as a value (Write, not *Write). Every error wraps ErrMalformed:
// an unknown type, a short payload, trailing bytes, an unknown version or
// enum value, a reserved bit set, a length out of bounds, a misaligned or
// overflowing range, a non-canonical encoding.
//
// The byte slices of the result (Write.Data, ResyncReply.Data and the
// digests) alias p, which the caller must therefore not reuse while it
// holds the message; a transport.Message's payload belongs to its
// receiver, so passing it here is safe. Decode allocates at most a small
// multiple of len(p) and never panics.
func Decode(t transport.Type, p []byte) (Message, error) {
	switch t {
	case TypeParams:
		return decodeParams(p)
	case TypeState:
		return decodeState(p)
	case TypeUUIDs:
		return decodeUUIDs(p)
	case TypeBitmap:
		return decodeBitmap(p)
	case TypeSyncUUID:
		return decodeSyncUUID(p)
	case TypeWrite:
		return decodeWrite(p)
	case TypeBarrier:
		return decodeBarrier(p)
	case TypeBarrierAck:
		return decodeBarrierAck(p)
	case TypeWriteAck:
		return decodeWriteAck(p)
	case TypeResyncRequest:
		return decodeResyncRequest(p)
	case TypeResyncReply:
		return decodeResyncReply(p)
	case TypeResyncAck:
		return decodeResyncAck(p)
	case TypeVerifyRequest:
		return decodeVerifyRequest(p)
	case TypeVerifyReply:
		return decodeVerifyReply(p)
	case TypeOutOfSync:
		return decodeOutOfSync(p)
	case TypeCommand:
		return decodeCommand(p)
	case TypeSizes:
		return decodeSizes(p)
	case TypeReadRequest:
		return decodeReadRequest(p)
	case TypeReadReply:
		return decodeReadReply(p)
	}
	return nil, fmt.Errorf("wire: unknown message type %d: %w", t, ErrMalformed)
}

// malformed returns an error naming the message, wrapping ErrMalformed.
func malformed(msg, format string, args ...any) error {
	return fmt.Errorf("wire: %s: %s: %w", msg, fmt.Sprintf(format, args...), ErrMalformed)
}

// decoder reads a payload's fields in order. The first error sticks: the
// reads after it return zero values.
type decoder struct {
	msg string // the message's name, for errors
	p   []byte
	off int
	err error
}

// newDecoder starts on p and checks its version byte.
func newDecoder(msg string, p []byte) decoder {
	d := decoder{msg: msg, p: p}
	if v := d.u8("version"); d.err == nil && v != version {
		d.err = malformed(msg, "version %d, want %d", v, version)
	}
	return d
}

// take returns the next n bytes, which alias the payload.
func (d *decoder) take(field string, n int) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.p)-d.off {
		d.err = malformed(d.msg, "payload of %d bytes ends inside %s", len(d.p), field)
		return nil
	}
	b := d.p[d.off : d.off+n : d.off+n]
	d.off += n
	return b
}

func (d *decoder) u8(field string) uint8 {
	if b := d.take(field, 1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u32(field string) uint32 {
	if b := d.take(field, 4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64(field string) uint64 {
	if b := d.take(field, 8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// bytes8 reads a one-byte length and that many bytes; nil when empty.
func (d *decoder) bytes8(field string) []byte {
	n := d.u8(field + " length")
	if b := d.take(field, int(n)); len(b) > 0 {
		return b
	}
	return nil
}

// bytes16 reads a two-byte length and that many bytes (nil when 0).
func (d *decoder) bytes16(field string) []byte {
	hi, lo := d.u8(field+" length"), d.u8(field+" length")
	if b := d.take(field, int(hi)<<8|int(lo)); len(b) > 0 {
		return b
	}
	return nil
}

// rest returns the bytes left, nil when there are none.
func (d *decoder) rest() []byte {
	if d.err != nil || d.off == len(d.p) {
		return nil
	}
	b := d.p[d.off:len(d.p):len(d.p)]
	d.off = len(d.p)
	return b
}

// finish returns the first error, or one for trailing bytes.
func (d *decoder) finish() error {
	if d.err == nil && d.off < len(d.p) {
		d.err = malformed(d.msg, "%d trailing bytes", len(d.p)-d.off)
	}
	return d.err
}

// checkRange checks a range's length (1..MaxData), its alignment and that
// offset+length does not overflow.
func checkRange(msg string, off uint64, length uint32, align uint64) error {
	switch {
	case length == 0:
		return malformed(msg, "length 0")
	case length > MaxData:
		return malformed(msg, "length %d above the %d MiB maximum", length, MaxData>>20)
	case uint64(length)%align != 0:
		return malformed(msg, "length %d not a multiple of %d", length, align)
	case off%align != 0:
		return malformed(msg, "offset %d not a multiple of %d", off, align)
	case off > math.MaxUint64-uint64(length):
		return malformed(msg, "offset %d + length %d overflows", off, length)
	}
	return nil
}

// checkDigest checks a digest's length against [least, MaxDigest].
func checkDigest(msg string, d []byte, least int) error {
	if len(d) < least || len(d) > MaxDigest {
		return malformed(msg, "digest of %d bytes, want %d to %d", len(d), least, MaxDigest)
	}
	return nil
}

// appendBytes16 appends a two-byte length and b. Validate bounds len(b).
func appendBytes16(dst, b []byte) []byte {
	return append(append(dst, byte(len(b)>>8), byte(len(b))), b...)
}

// appendBytes8 appends a one-byte length and b. Validate bounds len(b).
func appendBytes8(dst, b []byte) []byte {
	return append(append(dst, byte(len(b))), b...)
}
