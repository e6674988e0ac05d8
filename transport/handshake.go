package transport

import (
	"bufio"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"
)

// Protocol versions this implementation speaks (see doc.go, "Versions").
const (
	VersionMin = 2
	VersionMax = 5
)

// Handshake constants. Part of the wire format.
const (
	helloMagic    = "NBDMIRTP"
	challengeSize = 32
	sessionIDSize = 16
	proofSize     = sha256.Size
	maxNameLen    = 64
	maxReasonLen  = 256

	helloFlagSecret = 1 << 0
	helloFlagTLS    = 1 << 1
)

// Stream is one of the two connections of a session.
type Stream uint8

// Streams of a session: bulk data, and control (acks, pings).
const (
	Data    Stream = 1
	Control Stream = 2
)

func (s Stream) String() string {
	switch s {
	case Data:
		return "data"
	case Control:
		return "control"
	}
	return fmt.Sprintf("stream(%d)", uint8(s))
}

// Refusal codes sent in a REFUSE message.
const (
	refuseVersion  = 1
	refuseResource = 2
	refuseNode     = 3
	refuseAuth     = 4
	refuseSecret   = 5
	refuseCrossed  = 6
	refuseSession  = 7
	refuseBusy     = 8
)

// Handshake errors.
var (
	ErrHandshake  = errors.New("transport: malformed handshake message")
	ErrVersion    = errors.New("transport: no common protocol version")
	ErrAuth       = errors.New("transport: peer authentication failed")
	ErrRefused    = errors.New("transport: peer refused the connection")
	ErrPeerName   = errors.New("transport: peer is not the configured node")
	ErrReflection = errors.New("transport: peer presented our own challenge")
)

// authFailure marks a handshake failure that counts against the peer's
// host (Stats.AuthFailures and the hold-off, Transport.block): a proof
// that does not verify, a node name other than the configured pair, a
// TLS certificate that does not verify. A connection that merely breaks
// (EOF, timeout, reset, a port probe) or a configuration mismatch does not
// count.
type authFailure struct{ err error }

func (e *authFailure) Error() string { return e.err.Error() }
func (e *authFailure) Unwrap() error { return e.err }

// countsAgainst reports whether err is an authFailure.
func countsAgainst(err error) bool {
	var af *authFailure
	return errors.As(err, &af)
}

// refusedBusy reports whether the peer refused because it had too many
// connections in their handshake: worth retrying soon.
func refusedBusy(err error) bool {
	var r *RefusedError
	return errors.As(err, &r) && r.Code == refuseBusy
}

// RefusedError is a refusal received from the peer.
type RefusedError struct {
	Code   uint16
	Reason string
}

func (e *RefusedError) Error() string { return "transport: peer refused: " + e.Reason }
func (e *RefusedError) Unwrap() error { return ErrRefused }

// hello opens the handshake of each stream (client to server).
type hello struct {
	minVersion, maxVersion uint16
	stream                 Stream
	flags                  uint8
	sessionID              [sessionIDSize]byte
	instance               uint64
	challenge              [challengeSize]byte
	resource, from, to     string
}

func appendName(b []byte, s string) []byte { return append(append(b, byte(len(s))), s...) }

func (h *hello) appendBinary(b []byte) []byte {
	b = append(b, helloMagic...)
	b = binary.BigEndian.AppendUint16(b, h.minVersion)
	b = binary.BigEndian.AppendUint16(b, h.maxVersion)
	b = append(b, byte(h.stream), h.flags, 0, 0)
	b = append(b, h.sessionID[:]...)
	b = binary.BigEndian.AppendUint64(b, h.instance)
	b = append(b, h.challenge[:]...)
	b = appendName(b, h.resource)
	b = appendName(b, h.from)
	return appendName(b, h.to)
}

// decodeHello decodes a HELLO payload, checking every length.
func decodeHello(p []byte) (hello, error) {
	var h hello
	const fixed = 8 + 2 + 2 + 4 + sessionIDSize + 8 + challengeSize
	if len(p) < fixed || string(p[:8]) != helloMagic {
		return h, fmt.Errorf("%w: not an nbdmirror hello", ErrHandshake)
	}
	h.minVersion = binary.BigEndian.Uint16(p[8:])
	h.maxVersion = binary.BigEndian.Uint16(p[10:])
	h.stream, h.flags = Stream(p[12]), p[13]
	if p[14] != 0 || p[15] != 0 || h.flags&^(helloFlagSecret|helloFlagTLS) != 0 {
		return h, fmt.Errorf("%w: reserved bits set", ErrHandshake)
	}
	if h.stream != Data && h.stream != Control || h.minVersion > h.maxVersion || h.minVersion == 0 {
		return h, fmt.Errorf("%w: stream %d, versions %d-%d", ErrHandshake, h.stream, h.minVersion, h.maxVersion)
	}
	copy(h.sessionID[:], p[16:])
	h.instance = binary.BigEndian.Uint64(p[16+sessionIDSize:])
	copy(h.challenge[:], p[24+sessionIDSize:])
	rest := p[fixed:]
	for _, dst := range []*string{&h.resource, &h.from, &h.to} {
		if len(rest) < 1 || int(rest[0]) > maxNameLen || len(rest) < 1+int(rest[0]) || rest[0] == 0 {
			return h, fmt.Errorf("%w: bad name field", ErrHandshake)
		}
		*dst, rest = string(rest[1:1+rest[0]]), rest[1+rest[0]:]
	}
	if len(rest) != 0 {
		return h, fmt.Errorf("%w: %d trailing bytes", ErrHandshake, len(rest))
	}
	return h, nil
}

// ack is the server's answer to a hello. It carries no proof: the server
// proves itself only to a client that proved itself first (in OK).
type ack struct {
	version   uint16
	flags     uint8
	instance  uint64
	challenge [challengeSize]byte
}

const ackSize = 2 + 1 + 1 + 8 + challengeSize

func (a *ack) appendBinary(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, a.version)
	b = append(b, a.flags, 0)
	b = binary.BigEndian.AppendUint64(b, a.instance)
	return append(b, a.challenge[:]...)
}

func decodeAck(p []byte) (ack, error) {
	var a ack
	if len(p) != ackSize || p[3] != 0 {
		return a, fmt.Errorf("%w: ack of %d bytes", ErrHandshake, len(p))
	}
	a.version, a.flags = binary.BigEndian.Uint16(p), p[2]
	a.instance = binary.BigEndian.Uint64(p[4:])
	copy(a.challenge[:], p[12:])
	return a, nil
}

// decodeProof decodes the payload of an AUTH or OK: one proof (all zero
// without a shared secret).
func decodeProof(p []byte) ([proofSize]byte, error) {
	var pr [proofSize]byte
	if len(p) != proofSize {
		return pr, fmt.Errorf("%w: a %d-byte response", ErrHandshake, len(p))
	}
	copy(pr[:], p)
	return pr, nil
}

func appendRefuse(b []byte, code uint16, reason string) []byte {
	if len(reason) > maxReasonLen {
		reason = reason[:maxReasonLen]
	}
	return append(binary.BigEndian.AppendUint16(b, code), reason...)
}

func decodeRefuse(p []byte) (*RefusedError, error) {
	if len(p) < 2 || len(p) > 2+maxReasonLen {
		return nil, fmt.Errorf("%w: refusal of %d bytes", ErrHandshake, len(p))
	}
	return &RefusedError{Code: binary.BigEndian.Uint16(p), Reason: string(p[2:])}, nil
}

// Proof labels: which side proves. Part of the wire format.
const (
	labelClient = "nbdmirror/1 client proof"
	labelServer = "nbdmirror/1 server proof"
)

// transcript hashes the exact HELLO and ACK payloads, as sent and as
// received, so that the proofs and the keys cover every field of both:
// versions, flags, stream, session id, instances, challenges and names.
// A man in the middle who changes any byte makes the proofs fail.
func transcript(helloP, ackP []byte) [sha256.Size]byte {
	d := sha256.New()
	d.Write([]byte("nbdmirror/1 transcript"))
	for _, p := range [][]byte{helloP, ackP} {
		d.Write(binary.BigEndian.AppendUint32(nil, uint32(len(p))))
		d.Write(p)
	}
	return [sha256.Size]byte(d.Sum(nil))
}

// proof binds a side's knowledge of the secret to one direction (the
// label) of one exchange (the transcript, which holds both challenges).
func proof(secret []byte, label string, th [sha256.Size]byte) [proofSize]byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(label))
	m.Write(th[:])
	return [proofSize]byte(m.Sum(nil))
}

// keys derives the per-direction keys of one stream with HKDF-SHA256 over
// the secret, both challenges and the transcript.
func keys(secret []byte, cc, cs [challengeSize]byte, th [sha256.Size]byte) (c2s, s2c []byte, err error) {
	salt := append(append([]byte(nil), cc[:]...), cs[:]...)
	info := func(dir string) string { return "nbdmirror/1 " + dir + " key " + string(th[:]) }
	if c2s, err = hkdf.Key(sha256.New, secret, salt, info("c2s"), 32); err != nil {
		return nil, nil, err
	}
	s2c, err = hkdf.Key(sha256.New, secret, salt, info("s2c"), 32)
	return c2s, s2c, err
}

// hsConn is a stream during its handshake: plain frames with checksums.
type hsConn struct {
	conn net.Conn
	r    *bufio.Reader
	out  *frameSealer
	in   frameReader
	buf  []byte
}

func newHSConn(conn net.Conn, c *codecs) *hsConn {
	r := bufio.NewReaderSize(conn, 64<<10)
	h := &hsConn{conn: conn, r: r, out: &frameSealer{}}
	h.in = frameReader{r: r, s: &frameSealer{}, c: c, known: func(Type) bool { return false }, handshake: true}
	return h
}

func (h *hsConn) send(typ Type, payload []byte) error {
	b, err := appendFrame(h.buf[:0], h.out, nil, CompressNone, typ, payload)
	if err != nil {
		return err
	}
	h.buf = b
	_, err = h.conn.Write(b)
	return err
}

// recv reads the next handshake frame, expecting one of the given types;
// a REFUSE is returned as a *RefusedError.
func (h *hsConn) recv(want ...Type) (Type, []byte, error) {
	typ, p, err := h.in.readFrame()
	if err != nil {
		return 0, nil, err
	}
	if typ == typeRefuse {
		r, err := decodeRefuse(p)
		if err != nil {
			return 0, nil, err
		}
		return 0, nil, r
	}
	if !slices.Contains(want, typ) {
		return 0, nil, fmt.Errorf("%w: frame type %d during the handshake", ErrHandshake, typ)
	}
	return typ, p, nil
}

func (h *hsConn) refuse(code uint16, reason string) {
	h.conn.SetWriteDeadline(time.Now().Add(time.Second))
	h.send(typeRefuse, appendRefuse(nil, code, reason))
}

// streamKeys are what a finished handshake gives a stream.
type streamKeys struct {
	send, recv []byte // nil without a secret
	sendTag    [4]byte
	recvTag    [4]byte
	version    uint16 // the protocol version agreed
}

func tags(stream Stream, client bool) (send, recv [4]byte) {
	c, s := [4]byte{'c', byte(stream)}, [4]byte{'s', byte(stream)}
	if client {
		return c, s
	}
	return s, c
}

// clientHandshake runs the dialer's side of one stream's handshake and
// returns the peer's instance and the stream keys. The dialer proves
// first; the server's proof, in OK, is checked before the stream is used.
func (t *Transport) clientHandshake(hc *hsConn, stream Stream, sessionID [sessionIDSize]byte) (uint64, streamKeys, error) {
	var k streamKeys
	h := hello{minVersion: VersionMin, maxVersion: t.maxVersion(), stream: stream, sessionID: sessionID,
		instance: t.instance, resource: t.cfg.Resource, from: t.cfg.Local[0], to: t.cfg.Peer[0]}
	if t.cfg.Secret != nil {
		h.flags |= helloFlagSecret
	}
	if t.tls != nil {
		h.flags |= helloFlagTLS
	}
	rand.Read(h.challenge[:])
	hb := h.appendBinary(nil)
	if err := hc.send(typeHello, hb); err != nil {
		return 0, k, err
	}
	_, p, err := hc.recv(typeAck)
	if err != nil {
		return 0, k, err
	}
	a, err := decodeAck(p)
	if err != nil {
		return 0, k, err
	}
	th := transcript(hb, p)
	if a.version < VersionMin || a.version > t.maxVersion() {
		return 0, k, fmt.Errorf("%w: the peer chose version %d", ErrVersion, a.version)
	}
	if a.challenge == h.challenge {
		hc.refuse(refuseAuth, "you presented my own challenge")
		return 0, k, ErrReflection
	}
	if (a.flags&helloFlagSecret != 0) != (t.cfg.Secret != nil) {
		hc.refuse(refuseSecret, "the shared-secret is configured on one side only")
		return 0, k, fmt.Errorf("%w: only one side has a shared-secret", ErrAuth)
	}
	var clientProof [proofSize]byte
	if t.cfg.Secret != nil {
		clientProof = proof(t.cfg.Secret, labelClient, th)
	}
	if err := hc.send(typeAuth, clientProof[:]); err != nil {
		return 0, k, err
	}
	_, p, err = hc.recv(typeOK)
	var refused *RefusedError
	if errors.As(err, &refused) && refused.Code == refuseAuth {
		return 0, k, fmt.Errorf("%w: the peer refused this node's proof (different shared-secret?): %w", ErrAuth, err)
	}
	if err != nil {
		return 0, k, err
	}
	serverProof, err := decodeProof(p)
	if err != nil {
		return 0, k, err
	}
	if t.cfg.Secret != nil {
		// No refusal: the server has moved on to sealed frames; closing
		// the connection is the answer.
		if want := proof(t.cfg.Secret, labelServer, th); !hmac.Equal(want[:], serverProof[:]) {
			return 0, k, &authFailure{fmt.Errorf("%w: the peer's proof does not verify", ErrAuth)}
		}
	}
	k.sendTag, k.recvTag = tags(stream, true)
	k.version = a.version
	if t.cfg.Secret != nil {
		k.send, k.recv, err = keys(t.cfg.Secret, h.challenge, a.challenge, th)
	}
	return a.instance, k, err
}

// serverHandshake runs the listener's side of one stream's handshake. It
// refuses, telling the peer why, anything that is not the configured peer
// for this resource with the same secret, and it sends its own proof only
// to a client whose proof verified.
func (t *Transport) serverHandshake(hc *hsConn) (hello, streamKeys, error) {
	var k streamKeys
	// A TLS record where a hello belongs (whose type, 1 in two bytes, puts
	// 0 first): the peer has TLS configured and this node has not. The
	// refusal reaches it as a record that is not TLS, which it reports.
	if b, err := hc.r.Peek(2); err == nil && b[0] == tlsRecordHandshake && b[1] == tlsRecordMajor {
		hc.refuse(refuseAuth, "this node does not speak TLS")
		return hello{}, k, fmt.Errorf("%w: the peer speaks TLS (tls-cert, tls-key and tls-ca set on one node only?)", ErrAuth)
	}
	_, p, err := hc.recv(typeHello)
	if errors.Is(err, ErrFrameTooLarge) || errors.Is(err, ErrFrameFlags) || errors.Is(err, ErrFrameChecksum) {
		hc.refuse(refuseVersion, "malformed hello")
	}
	if err != nil {
		return hello{}, k, err
	}
	hb := slices.Clone(p) // the transcript needs it after the next read
	h, err := decodeHello(hb)
	if err != nil {
		hc.refuse(refuseVersion, "malformed hello")
		return h, k, err
	}
	lo, hi := max(h.minVersion, VersionMin), min(h.maxVersion, t.maxVersion())
	switch {
	case lo > hi:
		hc.refuse(refuseVersion, fmt.Sprintf("no common protocol version: you speak %d-%d, I speak %d-%d",
			h.minVersion, h.maxVersion, VersionMin, t.maxVersion()))
		return h, k, fmt.Errorf("%w: the peer speaks %d-%d, this node %d-%d", ErrVersion, h.minVersion, h.maxVersion, VersionMin, t.maxVersion())
	case h.resource != t.cfg.Resource:
		hc.refuse(refuseResource, "no resource "+h.resource+" here")
		return h, k, fmt.Errorf("%w: it asked for resource %s", ErrPeerName, h.resource)
	case !slices.Contains(t.cfg.Peer, h.from) || !slices.Contains(t.cfg.Local, h.to):
		hc.refuse(refuseNode, fmt.Sprintf("resource %s here does not pair node %s with %s", t.cfg.Resource, h.from, h.to))
		return h, k, &authFailure{fmt.Errorf("%w: it claims to be node %s (expected %s) and to call %s", ErrPeerName, h.from, t.cfg.Peer[0], h.to)}
	case (h.flags&helloFlagSecret != 0) != (t.cfg.Secret != nil):
		hc.refuse(refuseSecret, "the shared-secret is configured on one side only")
		return h, k, fmt.Errorf("%w: only one side has a shared-secret", ErrAuth)
	}
	a := ack{version: hi, instance: t.instance}
	if t.cfg.Secret != nil {
		a.flags |= helloFlagSecret
	}
	rand.Read(a.challenge[:])
	if a.challenge == h.challenge {
		hc.refuse(refuseAuth, "challenge collision")
		return h, k, &authFailure{ErrReflection}
	}
	ab := a.appendBinary(nil)
	if err := hc.send(typeAck, ab); err != nil {
		return h, k, err
	}
	th := transcript(hb, ab)
	_, p, err = hc.recv(typeAuth)
	var refused *RefusedError
	if errors.As(err, &refused) {
		return h, k, fmt.Errorf("%w: the peer rejected this node: %s", ErrAuth, refused.Reason)
	}
	if err != nil {
		return h, k, err
	}
	clientProof, err := decodeProof(p)
	if err != nil {
		hc.refuse(refuseAuth, "authentication failed")
		return h, k, &authFailure{fmt.Errorf("%w: %w", ErrAuth, err)}
	}
	var serverProof [proofSize]byte
	if t.cfg.Secret != nil {
		if want := proof(t.cfg.Secret, labelClient, th); !hmac.Equal(want[:], clientProof[:]) {
			hc.refuse(refuseAuth, "authentication failed")
			return h, k, &authFailure{fmt.Errorf("%w: wrong response (different shared-secret?)", ErrAuth)}
		}
		serverProof = proof(t.cfg.Secret, labelServer, th)
	}
	if err := hc.send(typeOK, serverProof[:]); err != nil {
		return h, k, err
	}
	k.sendTag, k.recvTag = tags(h.stream, false)
	k.version = hi
	if t.cfg.Secret != nil {
		c2s, s2c, err := keys(t.cfg.Secret, h.challenge, a.challenge, th)
		if err != nil {
			return h, k, err
		}
		k.send, k.recv = s2c, c2s
	}
	return h, k, nil
}
