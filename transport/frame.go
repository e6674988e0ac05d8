package transport

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/xxh3"
)

// Type is a frame type. Types below FirstAppType belong to the transport;
// the application registers the others it uses (Config.Types).
type Type uint16

// Transport frame types. Part of the wire format: never renumber.
const (
	typeHello   Type = 1 // handshake (see handshake.go)
	typeAck     Type = 2
	typeAuth    Type = 3
	typeOK      Type = 4
	typeRefuse  Type = 5
	typePing    Type = 6
	typePong    Type = 7
	typeConfirm Type = 8 // the dialer confirms the session is whole
	typeClose   Type = 9 // a graceful end, with a reason

	// FirstAppType is the smallest type an application may register.
	FirstAppType Type = 16
)

// Frame layout. Part of the wire format.
const (
	headerSize = 8
	sumSize    = 8  // xxhash64 trailer of a plain frame
	tagSize    = 16 // AES-GCM tag of a sealed frame
	// MaxPayload bounds a frame's payload, before and after compression:
	// a 32 MiB write plus room for its header.
	MaxPayload = 32<<20 + 64<<10

	flagS2   = 1 << 0
	flagZstd = 1 << 1
	flagsAll = flagS2 | flagZstd

	// minCompress is the smallest payload worth compressing.
	minCompress = 256

	// maxHandshakePayload bounds a frame's payload during the handshake,
	// before the peer has proved anything: the largest message, a HELLO,
	// is 267 bytes.
	maxHandshakePayload = 4 << 10
)

// Errors of reading frames. Any of them ends the session, whose error
// then also wraps ErrProtocol: no correct peer sends such a frame (a bit
// flipped on the way, which the checksum catches, counts the same, as
// DRBD's integrity check failures do).
var (
	ErrFrameTooLarge = errors.New("transport: frame longer than the maximum")
	ErrFrameChecksum = errors.New("transport: frame checksum mismatch")
	ErrFrameAuth     = errors.New("transport: frame failed authentication (altered, replayed, reordered or from another stream)")
	ErrFrameType     = errors.New("transport: unknown frame type")
	ErrFrameFlags    = errors.New("transport: unknown frame flags")
	ErrDecompress    = errors.New("transport: frame does not decompress")
)

// frameFault reports whether err, from reading a frame, is one of the
// errors above (the frame's fault), not the link's (a read error, EOF).
func frameFault(err error) bool {
	for _, e := range []error{ErrFrameTooLarge, ErrFrameChecksum, ErrFrameAuth, ErrFrameType, ErrFrameFlags, ErrDecompress} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Compression selects per-frame compression.
type Compression uint8

// Compression methods.
const (
	CompressNone Compression = iota
	CompressS2
	CompressZstd
)

// ParseCompression reads a compression name from the configuration.
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "", "none":
		return CompressNone, nil
	case "s2":
		return CompressS2, nil
	case "zstd":
		return CompressZstd, nil
	}
	return 0, fmt.Errorf("transport: unknown compression %q", s)
}

// codecs holds the zstd coders, shared by the streams of a Transport (they
// are safe for concurrent use).
type codecs struct {
	zenc *zstd.Encoder
	zdec *zstd.Decoder
}

func newCodecs() (*codecs, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxPayload))
	if err != nil {
		return nil, err
	}
	return &codecs{enc, dec}, nil
}

// frameSealer protects the frames of one direction of one stream: with an
// AEAD each frame is sealed (nonce = 4-byte direction tag and 8-byte frame
// counter; the header is authenticated data), without one it carries a
// checksum: a session's frames XXH3-64 of the body seeded with the header
// (protocol version 2), or from version 3 the same of the body's first
// splitAt bytes and then of the rest seeded with that; handshake frames,
// which every version must read, xxhash64 of header and body (the zero
// frameSealer).
type frameSealer struct {
	aead    cipher.AEAD
	dirTag  [4]byte
	counter uint64
	xxh3    bool           // session frames: XXH3-64; otherwise xxhash64
	split   bool           // version 3: the body hashed in two parts
	sum     *xxhash.Digest // reused for frames in parts
	sum3    *xxh3.Hasher   // reused for frames in parts
}

// splitAt is where version 3 splits a frame's body for its checksum: a
// frame sent as a message header (a write's is 31 bytes) and the data it
// refers to is checksummed without copying the data (one hash of the
// header and the data's first bytes, gathered in a small buffer, and one
// of the rest of the data where it is), where a streaming hash of the
// two would copy every byte of the data through its buffer (measured:
// 35 µs per MiB against 14).
const splitAt = 64

// newSealer returns the sealer of a session's stream direction for
// protocol version v.
func newSealer(key []byte, dirTag [4]byte, v uint16) (*frameSealer, error) {
	if key == nil {
		return &frameSealer{dirTag: dirTag, xxh3: true, split: v >= 3}, nil
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &frameSealer{aead: aead, dirTag: dirTag}, nil
}

// checksum returns the trailer of a plain frame with header hdr and a body
// of head followed by tail.
func (s *frameSealer) checksum(hdr, head, tail []byte) uint64 {
	if s.xxh3 {
		seed := binary.BigEndian.Uint64(hdr)
		if s.split && len(head)+len(tail) > splitAt {
			if len(tail) == 0 {
				return xxh3.HashSeed(head[splitAt:], xxh3.HashSeed(head[:splitAt], seed))
			}
			if len(head) < splitAt {
				var first [splitAt]byte
				k := copy(first[:], head)
				k = copy(first[k:], tail)
				return xxh3.HashSeed(tail[k:], xxh3.HashSeed(first[:], seed))
			}
			// A head longer than splitAt (not sent by this package): the
			// rest is in two parts.
			head, seed = head[splitAt:], xxh3.HashSeed(head[:splitAt], seed)
		}
		if len(tail) == 0 {
			return xxh3.HashSeed(head, seed)
		}
		if s.sum3 == nil {
			s.sum3 = xxh3.New()
		}
		s.sum3.ResetSeed(seed)
		s.sum3.Write(head)
		s.sum3.Write(tail)
		return s.sum3.Sum64()
	}
	if s.sum == nil {
		s.sum = xxhash.New()
	}
	s.sum.Reset()
	s.sum.Write(hdr)
	s.sum.Write(head)
	s.sum.Write(tail)
	return s.sum.Sum64()
}

func (s *frameSealer) overhead() int {
	if s.aead != nil {
		return tagSize
	}
	return sumSize
}

func (s *frameSealer) nonce() []byte {
	var n [12]byte
	copy(n[:4], s.dirTag[:])
	binary.BigEndian.PutUint64(n[4:], s.counter)
	s.counter++
	return n[:]
}

// appendFrame appends one frame to dst: header, payload (compressed if
// that makes it smaller) and trailer. It is not safe for concurrent use.
func appendFrame(dst []byte, s *frameSealer, c *codecs, comp Compression, typ Type, payload []byte) ([]byte, error) {
	return appendFrameParts(dst, s, c, comp, typ, payload, nil)
}

// appendFrameParts is appendFrame of the payload head followed by tail,
// which are copied once, straight into the frame.
func appendFrameParts(dst []byte, s *frameSealer, c *codecs, comp Compression, typ Type, head, tail []byte) ([]byte, error) {
	n := len(head) + len(tail)
	if n > MaxPayload {
		return dst, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
	}
	var flags uint16
	var z []byte // the compressed payload, if smaller
	if comp != CompressNone && n >= minCompress {
		payload := head
		if len(tail) > 0 {
			payload = slices.Concat(head, tail)
		}
		switch comp {
		case CompressS2:
			z, flags = s2.Encode(nil, payload), flagS2
		case CompressZstd:
			z, flags = c.zenc.EncodeAll(payload, nil), flagZstd
		}
		if len(z) >= n {
			z, flags = nil, 0
		}
	}
	bodyLen := n
	if z != nil {
		bodyLen = len(z)
	}
	start := len(dst)
	dst = slices.Grow(dst, headerSize+bodyLen+s.overhead())
	dst = binary.BigEndian.AppendUint16(dst, uint16(typ))
	dst = binary.BigEndian.AppendUint16(dst, flags)
	dst = binary.BigEndian.AppendUint32(dst, uint32(bodyLen))
	if s.aead != nil && (z != nil || len(tail) == 0) {
		body := z
		if z == nil {
			body = head
		}
		return s.aead.Seal(dst, s.nonce(), body, dst[start:start+headerSize]), nil
	}
	bodyAt := len(dst)
	if z != nil {
		dst = append(dst, z...)
	} else {
		dst = append(append(dst, head...), tail...)
	}
	if s.aead != nil {
		// Sealed in place: the ciphertext overwrites the plaintext exactly.
		return s.aead.Seal(dst[:bodyAt], s.nonce(), dst[bodyAt:], dst[start:bodyAt]), nil
	}
	return binary.BigEndian.AppendUint64(dst, s.checksum(dst[start:bodyAt], dst[bodyAt:], nil)), nil
}

// frameReader reads frames from one direction of one stream.
type frameReader struct {
	r     *bufio.Reader
	s     *frameSealer
	c     *codecs
	known func(Type) bool
	buf   []byte
	// pool is where payloads of at least 1<<bufMinClass bytes are read
	// into, straight from the socket (no copy out of buf); nil: payloads
	// above ownAbove are allocated, smaller ones read into buf.
	pool  *bufPool
	hdr   [headerSize]byte
	wire  int  // bytes the last frame took on the wire
	owned bool // the last payload is the caller's to keep (not the reused buffer)
	// handshake bounds payloads to maxHandshakePayload and refuses
	// compressed frames: the peer is not authenticated yet.
	handshake bool
	// lowat, if set, sets the socket's SO_RCVLOWAT: while the rest of a
	// large frame is on its way, the reader is woken once it is all
	// there rather than for every segment (nil: not a TCP socket).
	lowat func(n int)
}

// A frame body of lowatFrom bytes or more still to come is read with the
// socket's receive low-water mark at what remains, up to lowatMax.
const (
	lowatFrom = 64 << 10
	lowatMax  = 4 << 20
)

// ownAbove is the payload size from which a frame is read into a buffer of
// its own, which the receiver keeps, rather than into the reused one, when
// the reader has no pool.
const ownAbove = 64 << 10

// readFrame reads, verifies and decompresses the next frame. The length is
// checked against MaxPayload (maxHandshakePayload during the handshake)
// before anything is allocated or read. The returned payload is valid
// until the next call.
func (fr *frameReader) readFrame() (Type, []byte, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return 0, nil, err
	}
	typ := Type(binary.BigEndian.Uint16(fr.hdr[0:2]))
	flags := binary.BigEndian.Uint16(fr.hdr[2:4])
	length := binary.BigEndian.Uint32(fr.hdr[4:8])
	limit := uint32(MaxPayload)
	if fr.handshake {
		limit = maxHandshakePayload
	}
	if length > limit {
		return 0, nil, fmt.Errorf("%w: %d bytes (at most %d)", ErrFrameTooLarge, length, limit)
	}
	if fr.handshake && flags != 0 {
		return 0, nil, fmt.Errorf("%w %#x: compression during the handshake", ErrFrameFlags, flags)
	}
	n := int(length) + fr.s.overhead()
	var body []byte
	pooled := fr.pool != nil && length >= 1<<bufMinClass
	if fr.owned = pooled || n > ownAbove; fr.owned {
		if fr.pool != nil {
			body = fr.pool.get(n)
		} else {
			body = make([]byte, n)
		}
	} else {
		if cap(fr.buf) < n {
			fr.buf = make([]byte, n)
		}
		body = fr.buf[:n]
	}
	if err := fr.readBody(body); err != nil {
		return 0, nil, unexpected(err)
	}
	fr.wire = headerSize + n
	var payload []byte
	if fr.s.aead != nil {
		p, err := fr.s.aead.Open(body[:0], fr.s.nonce(), body, fr.hdr[:])
		if err != nil {
			return 0, nil, ErrFrameAuth
		}
		payload = p
	} else {
		payload = body[:length]
		if fr.s.checksum(fr.hdr[:], payload, nil) != binary.BigEndian.Uint64(body[length:]) {
			return 0, nil, ErrFrameChecksum
		}
	}
	// Only now, with the frame known to be intact, judge its contents.
	if typ < FirstAppType && (typ < typeHello || typ > typeClose) || typ >= FirstAppType && !fr.known(typ) {
		return 0, nil, fmt.Errorf("%w %d", ErrFrameType, typ)
	}
	if flags&^flagsAll != 0 || flags == flagsAll {
		return 0, nil, fmt.Errorf("%w %#x", ErrFrameFlags, flags)
	}
	p, err := decompress(fr.c, flags, payload)
	if flags != 0 {
		if fr.owned && fr.pool != nil {
			fr.pool.put(body) // decompression copied the payload out of it
		}
		fr.owned = true // decompression allocated it
	}
	return typ, p, err
}

// readBody fills body from the stream. With lowat, while at least
// lowatFrom bytes are still to come, each read waits (in the kernel, not
// woken per segment) until all of them are there: the low-water mark is
// always what remains of this frame, which the peer is sending, never more.
func (fr *frameReader) readBody(body []byte) error {
	if fr.lowat == nil || len(body)-fr.r.Buffered() < lowatFrom {
		_, err := io.ReadFull(fr.r, body)
		return err
	}
	set := 1
	defer func() {
		if set != 1 {
			fr.lowat(1)
		}
	}()
	for got := 0; got < len(body); {
		// Bytes already in the reader's buffer come first, without a
		// system call (and without touching the mark); then each read
		// takes what the socket holds. A setsockopt that fails leaves
		// the mark where it was: at 1 the read is a plain one, and a
		// reset can fail only on a socket that is gone.
		if fr.r.Buffered() == 0 {
			if rest := len(body) - got; rest >= lowatFrom {
				set = min(rest, lowatMax)
				fr.lowat(set)
			} else if set != 1 {
				set = 1
				fr.lowat(1)
			}
		}
		k, err := fr.r.Read(body[got:])
		got += k
		if err != nil && got < len(body) {
			return err
		}
	}
	return nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// decompress undoes a frame's compression, refusing output over MaxPayload.
func decompress(c *codecs, flags uint16, p []byte) ([]byte, error) {
	switch flags {
	case flagS2:
		n, err := s2.DecodedLen(p)
		if err != nil || n > MaxPayload {
			return nil, fmt.Errorf("%w: s2 (%d bytes claimed)", ErrDecompress, n)
		}
		out, err := s2.Decode(make([]byte, n), p)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrDecompress, err)
		}
		return out, nil
	case flagZstd:
		out, err := c.zdec.DecodeAll(p, nil)
		if err != nil || len(out) > MaxPayload {
			return nil, fmt.Errorf("%w: zstd: %v", ErrDecompress, err)
		}
		return out, nil
	}
	return p, nil
}
