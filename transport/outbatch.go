package transport

import (
	"encoding/binary"
	"fmt"
	"net"
	"time"
)

// refAbove is the tail size from which a plain, uncompressed frame refers
// to its tail where it is instead of copying it into the batch: the
// socket write gathers it (writev). Below it, a copy is cheaper than
// another piece to gather.
const refAbove = 64 << 10

// outBatch is frames sealed for one socket write: the bytes b, with large
// tails referenced rather than copied in (refs, in the order of their
// positions). A referenced tail must stay unchanged until the batch is
// written: Queue's wait returns only after that.
type outBatch struct {
	b    []byte
	refs []tailRef
}

// tailRef places data before b[at:].
type tailRef struct {
	at   int
	data []byte
}

// size returns the batch's bytes on the wire.
func (o *outBatch) size() int {
	n := len(o.b)
	for _, r := range o.refs {
		n += len(r.data)
	}
	return n
}

// mark and rollback undo what a failed append added.
func (o *outBatch) mark() [2]int { return [2]int{len(o.b), len(o.refs)} }

func (o *outBatch) rollback(m [2]int) {
	o.b = o.b[:m[0]]
	clear(o.refs[m[1]:])
	o.refs = o.refs[:m[1]]
}

// reset empties the batch for reuse, dropping the references to callers'
// data.
func (o *outBatch) reset() { o.rollback([2]int{0, 0}) }

// appendFrame appends one frame, as appendFrameParts does; a plain,
// uncompressed frame's large tail is referenced, with the same bytes on
// the wire.
func (o *outBatch) appendFrame(s *frameSealer, c *codecs, comp Compression, typ Type, head, tail []byte) error {
	n := len(head) + len(tail)
	if len(tail) < refAbove || s.aead != nil || comp != CompressNone {
		b, err := appendFrameParts(o.b, s, c, comp, typ, head, tail)
		if err != nil {
			return err
		}
		o.b = b
		return nil
	}
	if n > MaxPayload {
		return fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
	}
	start := len(o.b)
	o.b = binary.BigEndian.AppendUint16(o.b, uint16(typ))
	o.b = binary.BigEndian.AppendUint16(o.b, 0)
	o.b = binary.BigEndian.AppendUint32(o.b, uint32(n))
	o.b = append(o.b, head...)
	sum := s.checksum(o.b[start:start+headerSize], o.b[start+headerSize:], tail)
	o.refs = append(o.refs, tailRef{at: len(o.b), data: tail})
	o.b = binary.BigEndian.AppendUint64(o.b, sum)
	return nil
}

// writeTo writes the batch to conn in chunks of at most chunk bytes, each
// under a deadline from deadline(): a slow but moving link is not a dead
// one. scratch is reused for the pieces of each chunk.
func (o *outBatch) writeTo(conn net.Conn, chunk int, deadline func() time.Time, scratch *net.Buffers) error {
	if len(o.refs) == 0 { // the common case: one buffer
		for b := o.b; len(b) > 0; {
			n := min(len(b), chunk)
			conn.SetWriteDeadline(deadline())
			w, err := conn.Write(b[:n])
			if err != nil {
				return err
			}
			b = b[w:]
		}
		return nil
	}
	pieces := make([][]byte, 0, 2*len(o.refs)+1)
	at := 0
	for _, r := range o.refs {
		pieces = append(pieces, o.b[at:r.at], r.data)
		at = r.at
	}
	pieces = append(pieces, o.b[at:])
	for len(pieces) > 0 {
		bufs, size := (*scratch)[:0], 0
		for len(pieces) > 0 && size < chunk {
			p := pieces[0]
			if size+len(p) > chunk {
				p = p[:chunk-size]
				pieces[0] = pieces[0][len(p):]
			} else {
				pieces = pieces[1:]
			}
			if len(p) > 0 {
				bufs = append(bufs, p)
				size += len(p)
			}
		}
		*scratch = bufs
		conn.SetWriteDeadline(deadline())
		if _, err := bufs.WriteTo(conn); err != nil {
			clear(*scratch)
			return err
		}
		clear(*scratch) // no references to callers' data stay behind
	}
	return nil
}
