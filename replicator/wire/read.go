package wire

import (
	"github.com/nbdmirror/nbdmirror/transport"
)

// Reads through the peer, for a Primary whose disk was detached after an
// I/O error (a diskless Primary): it asks its UpToDate peer for the data
// of each application read (ReadRequest) and the peer answers with it
// (ReadReply), both on the Data stream. Nodes send them only to a peer
// whose session speaks transport protocol version 5 or newer
// (ReadVersion): an older node does not register the types.
const (
	TypeReadRequest transport.Type = 33
	TypeReadReply   transport.Type = 34
)

// ReadVersion is the first transport protocol version whose nodes serve
// ReadRequest.
const ReadVersion = 5

// ReadRequest asks the peer for Length bytes at Offset (any alignment).
type ReadRequest struct {
	ID     uint64
	Offset uint64
	Length uint32 // 1..MaxData
}

// Type returns TypeReadRequest.
func (ReadRequest) Type() transport.Type { return TypeReadRequest }

// Append appends m's payload to dst.
func (m ReadRequest) Append(dst []byte) []byte {
	return appendRange(dst, 0, m.ID, m.Offset, m.Length)
}

// Validate reports the first field that Decode would reject.
func (m ReadRequest) Validate() error { return checkRange("ReadRequest", m.Offset, m.Length, 1) }

func decodeReadRequest(p []byte) (Message, error) {
	d := newDecoder("ReadRequest", p)
	m := ReadRequest{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length")}
	return finish(&d, m)
}

// ReadReply statuses. Part of the wire format.
const (
	ReadOK    = 0 // Data holds the range
	ReadError = 1 // the peer could not read it (or serve reads now)
)

// ReadReply answers a ReadRequest, echoing its ID and range.
type ReadReply struct {
	ID     uint64
	Offset uint64
	Length uint32 // 1..MaxData
	Status uint8  // ReadOK or ReadError
	Data   []byte // Length bytes with ReadOK, none otherwise; aliases the payload when decoded
}

// Type returns TypeReadReply.
func (ReadReply) Type() transport.Type { return TypeReadReply }

// Append appends m's payload to dst.
func (m ReadReply) Append(dst []byte) []byte {
	return append(m.AppendHeader(dst), m.Data...)
}

// AppendHeader appends m's payload without its data.
func (m ReadReply) AppendHeader(dst []byte) []byte {
	return append(appendRange(dst, 1+len(m.Data), m.ID, m.Offset, m.Length), m.Status)
}

// Bulk returns m's data, which follows AppendHeader's bytes in the payload.
func (m ReadReply) Bulk() []byte { return m.Data }

// Validate reports the first field that Decode would reject.
func (m ReadReply) Validate() error {
	const msg = "ReadReply"
	if err := checkRange(msg, m.Offset, m.Length, 1); err != nil {
		return err
	}
	switch {
	case m.Status > ReadError:
		return malformed(msg, "status %d unknown", m.Status)
	case m.Status == ReadOK && len(m.Data) != int(m.Length):
		return malformed(msg, "data of %d bytes for length %d", len(m.Data), m.Length)
	case m.Status == ReadError && len(m.Data) != 0:
		return malformed(msg, "data of %d bytes with status %d", len(m.Data), m.Status)
	}
	return nil
}

func decodeReadReply(p []byte) (Message, error) {
	d := newDecoder("ReadReply", p)
	m := ReadReply{ID: d.u64("id"), Offset: d.u64("offset"), Length: d.u32("length"), Status: d.u8("status")}
	m.Data = d.rest()
	return finish(&d, m)
}
