package wire

import (
	"encoding/binary"
	"slices"

	"github.com/nbdmirror/nbdmirror/transport"
)

// Write.Kind values. Part of the wire format: never renumber.
const (
	WriteData   = 0 // Data holds Length bytes
	WriteTrim   = 1 // no data
	WriteZeroes = 2 // no data
)

// Write.Flags bits. Part of the wire format.
const (
	WriteFUA       = 1 << 0 // the write is durable on the peer before it is acknowledged
	WriteAckWanted = 1 << 1 // answer with a WriteAck (protocol C)
)

// Ack statuses of WriteAck and ResyncAck. Part of the wire format.
const (
	AckOK     = 0
	AckFailed = 1
)

// WriteDataAt is where a Write's data starts in its payload (the size of
// the header before it): the receiver's transport aligns this offset of
// large payloads in memory (transport.Config.AlignAt).
const WriteDataAt = writeHeader

const (
	// writeHeader is the size of a Write payload before its data.
	writeHeader  = 31
	maxWriteKind = WriteZeroes
	writeFlags   = WriteFUA | WriteAckWanted
)

// Write is one application write, trim or write-zeroes of epoch Epoch
// (Data stream).
type Write struct {
	Seq    uint64 // per-session sequence number, for acks
	Epoch  uint64
	Offset uint64 // bytes, a multiple of 512
	Length uint32 // bytes, a multiple of 512, 1..MaxData
	Kind   uint8  // WriteData, WriteTrim or WriteZeroes
	Flags  uint8  // WriteFUA, WriteAckWanted; other bits zero
	Data   []byte // Length bytes for WriteData, empty otherwise; aliases the payload when decoded
}

// Type returns TypeWrite.
func (Write) Type() transport.Type { return TypeWrite }

// Append appends m's payload to dst.
func (m Write) Append(dst []byte) []byte {
	dst = slices.Grow(dst, writeHeader+len(m.Data))
	return append(m.AppendHeader(dst), m.Data...)
}

// Bulk returns m's data, which follows AppendHeader's bytes in the payload.
func (m Write) Bulk() []byte { return m.Data }

// AppendHeader appends m's payload without its data (the payload is the
// header followed by Data), for a sender that sends the data from where
// it is.
func (m Write) AppendHeader(dst []byte) []byte {
	dst = append(dst, version)
	dst = binary.BigEndian.AppendUint64(dst, m.Seq)
	dst = binary.BigEndian.AppendUint64(dst, m.Epoch)
	dst = binary.BigEndian.AppendUint64(dst, m.Offset)
	dst = binary.BigEndian.AppendUint32(dst, m.Length)
	return append(dst, m.Kind, m.Flags)
}

// Validate reports the first field that Decode would reject.
func (m Write) Validate() error {
	const msg = "Write"
	if err := checkRange(msg, m.Offset, m.Length, sectorSize); err != nil {
		return err
	}
	switch {
	case m.Kind > maxWriteKind:
		return malformed(msg, "kind %d unknown", m.Kind)
	case m.Flags&^writeFlags != 0:
		return malformed(msg, "reserved flags %#x set", m.Flags&^writeFlags)
	case m.Kind == WriteData && len(m.Data) != int(m.Length):
		return malformed(msg, "data of %d bytes for length %d", len(m.Data), m.Length)
	case m.Kind != WriteData && len(m.Data) != 0:
		return malformed(msg, "data of %d bytes in a trim or write-zeroes", len(m.Data))
	}
	return nil
}

func decodeWrite(p []byte) (Message, error) {
	d := newDecoder("Write", p)
	m := Write{
		Seq:    d.u64("seq"),
		Epoch:  d.u64("epoch"),
		Offset: d.u64("offset"),
		Length: d.u32("length"),
		Kind:   d.u8("kind"),
		Flags:  d.u8("flags"),
	}
	m.Data = d.rest()
	return finish(&d, m)
}

// Barrier.Flags bits. Part of the wire format.
const (
	// BarrierFlush: the epoch was closed by a FLUSH (or a demotion): the
	// receiver makes it durable before it applies any later write.
	BarrierFlush  = 1 << 0
	barrierFlags  = BarrierFlush
	barrierLength = 14
)

// Barrier closes epoch Epoch, which held Writes writes (Data stream).
type Barrier struct {
	Epoch  uint64
	Writes uint32
	Flags  uint8 // BarrierFlush; other bits zero
}

// Type returns TypeBarrier.
func (Barrier) Type() transport.Type { return TypeBarrier }

// Append appends m's payload to dst.
func (m Barrier) Append(dst []byte) []byte {
	dst = slices.Grow(dst, barrierLength)
	return append(appendEpoch(dst, m.Epoch, m.Writes), m.Flags)
}

// Validate reports the first field that Decode would reject.
func (m Barrier) Validate() error {
	if m.Flags&^barrierFlags != 0 {
		return malformed("Barrier", "reserved flags %#x set", m.Flags&^barrierFlags)
	}
	return nil
}

func decodeBarrier(p []byte) (Message, error) {
	d := newDecoder("Barrier", p)
	m := Barrier{Epoch: d.u64("epoch"), Writes: d.u32("writes"), Flags: d.u8("flags")}
	return finish(&d, m)
}

// BarrierAck tells that epoch Epoch, of Writes writes, is durable on the
// peer (Control stream).
type BarrierAck struct {
	Epoch  uint64
	Writes uint32
}

// Type returns TypeBarrierAck.
func (BarrierAck) Type() transport.Type { return TypeBarrierAck }

// Append appends m's payload to dst.
func (m BarrierAck) Append(dst []byte) []byte {
	return appendEpoch(dst, m.Epoch, m.Writes)
}

// Validate reports the first field that Decode would reject: none.
func (m BarrierAck) Validate() error { return nil }

func decodeBarrierAck(p []byte) (Message, error) {
	d := newDecoder("BarrierAck", p)
	m := BarrierAck{Epoch: d.u64("epoch"), Writes: d.u32("writes")}
	return finish(&d, m)
}

func appendEpoch(dst []byte, epoch uint64, writes uint32) []byte {
	dst = binary.BigEndian.AppendUint64(append(dst, version), epoch)
	return binary.BigEndian.AppendUint32(dst, writes)
}

// WriteAck answers a Write sent with WriteAckWanted (Control stream).
type WriteAck struct {
	Seq    uint64
	Status uint8 // AckOK or AckFailed
}

// Type returns TypeWriteAck.
func (WriteAck) Type() transport.Type { return TypeWriteAck }

// Append appends m's payload to dst.
func (m WriteAck) Append(dst []byte) []byte {
	return append(binary.BigEndian.AppendUint64(append(dst, version), m.Seq), m.Status)
}

// Validate reports the first field that Decode would reject.
func (m WriteAck) Validate() error {
	if m.Status > AckFailed {
		return malformed("WriteAck", "status %d unknown", m.Status)
	}
	return nil
}

func decodeWriteAck(p []byte) (Message, error) {
	d := newDecoder("WriteAck", p)
	m := WriteAck{Seq: d.u64("seq"), Status: d.u8("status")}
	return finish(&d, m)
}
