package transport

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzFrame reads arbitrary bytes as frames, plain (as each protocol
// version checksums them) and sealed: no panic, no allocation past
// MaxPayload, and a frame that reads back re-encodes to a frame that reads
// the same.
func FuzzFrame(f *testing.F) {
	c, _ := newCodecs()
	key := bytes.Repeat([]byte{7}, 32)
	for _, k := range [][]byte{nil, key} {
		for v := uint16(VersionMin); v <= VersionMax; v++ {
			for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
				w, _ := newSealer(k, [4]byte{'c', 1}, v)
				b, _ := appendFrame(nil, w, c, comp, typeTest, bytes.Repeat([]byte("frame payload "), 40))
				b, _ = appendFrame(b, w, c, comp, typePing, []byte{0, 0, 0, 0, 0, 0, 0, 1})
				f.Add(b, k != nil)
			}
		}
	}
	f.Fuzz(func(t *testing.T, in []byte, sealed bool) {
		var k []byte
		if sealed {
			k = key
		}
		for v := uint16(VersionMin); v <= VersionMax; v++ {
			rs, _ := newSealer(k, [4]byte{'c', 1}, v)
			r := &frameReader{r: bufio.NewReader(bytes.NewReader(in)), s: rs, c: c, known: func(ty Type) bool { return ty == typeTest }}
			for range 8 {
				typ, p, err := r.readFrame()
				if err != nil {
					break
				}
				if len(p) > MaxPayload || cap(r.buf) > ownAbove+tagSize {
					t.Fatalf("payload of %d bytes", len(p))
				}
				w, _ := newSealer(nil, [4]byte{'c', 1}, v)
				out, err := appendFrame(nil, w, c, CompressNone, typ, p)
				if err != nil {
					t.Fatal(err)
				}
				rr, _ := newSealer(nil, [4]byte{'c', 1}, v)
				back := &frameReader{r: bufio.NewReader(bytes.NewReader(out)), s: rr, c: c, known: r.known}
				if typ2, p2, err := back.readFrame(); err != nil || typ2 != typ || !bytes.Equal(p2, p) {
					t.Fatalf("version %d: re-encoded frame reads back as %d/%v", v, typ2, err)
				}
			}
		}
	})
}

// FuzzHandshake decodes arbitrary HELLO, ACK, REFUSE and proof (AUTH, OK)
// payloads, which arrive before the peer is authenticated: no panic, and
// an accepted HELLO, ACK or proof re-encodes to the same bytes.
func FuzzHandshake(f *testing.F) {
	h := hello{minVersion: VersionMin, maxVersion: VersionMax, stream: Control, flags: helloFlagSecret, instance: 5,
		resource: "r0", from: "alpha", to: "beta"}
	f.Add(uint8(0), h.appendBinary(nil))
	a := ack{version: VersionMax, flags: helloFlagSecret, instance: 9}
	f.Add(uint8(1), a.appendBinary(nil))
	f.Add(uint8(2), appendRefuse(nil, refuseAuth, "authentication failed"))
	f.Add(uint8(3), make([]byte, proofSize))
	f.Fuzz(func(t *testing.T, which uint8, p []byte) {
		switch which % 4 {
		case 0:
			h, err := decodeHello(p)
			if err == nil && !bytes.Equal(h.appendBinary(nil), p) {
				t.Fatal("hello re-encodes differently")
			}
		case 1:
			a, err := decodeAck(p)
			if err == nil && !bytes.Equal(a.appendBinary(nil), p) {
				t.Fatal("ack re-encodes differently")
			}
		case 2:
			r, err := decodeRefuse(p)
			if err == nil && len(r.Reason) > maxReasonLen {
				t.Fatal("refusal reason too long")
			}
		case 3:
			pr, err := decodeProof(p)
			if err == nil && !bytes.Equal(pr[:], p) {
				t.Fatal("proof decodes to other bytes")
			}
		}
	})
}
