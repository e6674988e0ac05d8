package transport

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"testing"
)

const typeTest = FirstAppType

func testCodecs(t testing.TB) *codecs {
	c, err := newCodecs()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pair returns a sealer for writing and a reader for reading the same
// direction, keyed or not.
func pair(t testing.TB, key []byte, c *codecs, r io.Reader) (*frameSealer, *frameReader) {
	w, err := newSealer(key, [4]byte{'c', 1})
	if err != nil {
		t.Fatal(err)
	}
	rs, _ := newSealer(key, [4]byte{'c', 1})
	return w, &frameReader{r: bufio.NewReader(r), s: rs, c: c, known: func(ty Type) bool { return ty == typeTest }}
}

func TestFrame_Layout(t *testing.T) {
	c := testCodecs(t)
	w, _ := pair(t, nil, c, nil)
	b, err := appendFrame([]byte("prefix"), w, c, CompressNone, typePing, []byte{1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	// An appended frame: type 6, no flags, length 3, payload, xxhash64.
	if got, want := hex.EncodeToString(b[6:17]), "0006"+"0000"+"00000003"+"010203"; got != want {
		t.Fatalf("frame % x, want %s", b[6:17], want)
	}
	if len(b) != 6+headerSize+3+sumSize || string(b[:6]) != "prefix" {
		t.Fatalf("frame of %d bytes", len(b))
	}
}

func TestFrame_RoundTrip(t *testing.T) {
	c := testCodecs(t)
	key := make([]byte, 32)
	rand.Read(key)
	compressible := bytes.Repeat([]byte("replicate this block "), 5000)
	random := make([]byte, 100000)
	rand.Read(random)
	for _, k := range []struct {
		name string
		key  []byte
	}{{"plain", nil}, {"sealed", key}} {
		for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
			for _, p := range [][]byte{nil, {7}, compressible, random} {
				var buf bytes.Buffer
				w, r := pair(t, k.key, c, &buf)
				var wire []byte
				for range 3 { // several frames: the counter advances
					var err error
					wire, err = appendFrame(wire, w, c, comp, typeTest, p)
					if err != nil {
						t.Fatal(err)
					}
				}
				buf.Write(wire)
				for i := range 3 {
					typ, got, err := r.readFrame()
					if err != nil || typ != typeTest || !bytes.Equal(got, p) {
						t.Fatalf("%s/%d/%d bytes frame %d: %v", k.name, comp, len(p), i, err)
					}
				}
				if comp != CompressNone && len(p) == len(compressible) && len(wire) > 3*len(p)/4 {
					t.Errorf("%s/%d: compressible payload sent as %d bytes", k.name, comp, len(wire)/3)
				}
				if len(p) == len(random) && len(wire) > 3*(len(p)+headerSize+tagSize) {
					t.Errorf("%s/%d: incompressible payload grew to %d bytes", k.name, comp, len(wire)/3)
				}
			}
		}
	}
}

// hugeHeader is a reader that yields one header claiming 4 GiB and then
// blocks forever: the reader must refuse it without reading or allocating.
type hugeHeader struct{ sent bool }

func (h *hugeHeader) Read(p []byte) (int, error) {
	if h.sent {
		select {}
	}
	h.sent = true
	return copy(p, []byte{0, 16, 0, 0, 0xff, 0xff, 0xff, 0xff}), nil
}

func TestFrame_Refused(t *testing.T) {
	c := testCodecs(t)
	key := make([]byte, 32)
	good := func(key []byte, typ Type, p []byte) []byte {
		w, _ := pair(t, key, c, nil)
		b, _ := appendFrame(nil, w, c, CompressNone, typ, p)
		return b
	}
	twice := func(b []byte) []byte { return append(append([]byte(nil), b...), b...) }
	flip := func(b []byte, i int) []byte { b = append([]byte(nil), b...); b[i] ^= 1; return b }
	tests := []struct {
		name  string
		key   []byte
		input []byte
		skip  int // frames read successfully first
		want  error
	}{
		{"bit flipped in a plain frame", nil, flip(good(nil, typeTest, []byte("data")), headerSize+1), 0, ErrFrameChecksum},
		{"bit flipped in a sealed payload", key, flip(good(key, typeTest, []byte("data")), headerSize+1), 0, ErrFrameAuth},
		{"bit flipped in a sealed header", key, flip(good(key, typeTest, []byte("data")), 3), 0, ErrFrameAuth},
		{"sealed frame replayed", key, twice(good(key, typeTest, []byte("x"))), 1, ErrFrameAuth},
		{"sealed frame from the other direction", key, func() []byte {
			w, _ := newSealer(key, [4]byte{'s', 1})
			b, _ := appendFrame(nil, w, c, CompressNone, typeTest, []byte("x"))
			return b
		}(), 0, ErrFrameAuth},
		{"unknown application type", nil, good(nil, typeTest+1, nil), 0, ErrFrameType},
		{"unknown transport type", nil, good(nil, 12, nil), 0, ErrFrameType},
		{"unknown flags", nil, func() []byte {
			b := good(nil, typeTest, []byte("abc"))
			b[3] = 0x40
			return resumPlain(b)
		}(), 0, ErrFrameFlags},
		{"s2 flag on garbage", nil, func() []byte {
			b := good(nil, typeTest, []byte("abcdefgh"))
			b[3] = flagS2
			return resumPlain(b)
		}(), 0, ErrDecompress},
		{"zstd flag on garbage", nil, func() []byte {
			b := good(nil, typeTest, []byte("abcdefgh"))
			b[3] = flagZstd
			return resumPlain(b)
		}(), 0, ErrDecompress},
		{"length over the maximum", nil, []byte{0, 16, 0, 0, 0x7f, 0, 0, 0}, 0, ErrFrameTooLarge},
		{"truncated payload", nil, good(nil, typeTest, []byte("abcdef"))[:headerSize+3], 0, io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, r := pair(t, tc.key, c, bytes.NewReader(tc.input))
			for range tc.skip {
				if _, _, err := r.readFrame(); err != nil {
					t.Fatalf("frame before the bad one: %v", err)
				}
			}
			if _, p, err := r.readFrame(); !errors.Is(err, tc.want) {
				t.Fatalf("readFrame = %q, %v; want %v", p, err, tc.want)
			}
		})
	}
	// A 4 GiB length is refused before anything is read or allocated.
	_, r := pair(t, nil, c, &hugeHeader{})
	if _, _, err := r.readFrame(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("huge length: %v", err)
	}
	if cap(r.buf) != 0 {
		t.Fatalf("allocated %d bytes for a refused frame", cap(r.buf))
	}
	w, _ := pair(t, nil, c, nil)
	if _, err := appendFrame(nil, w, c, CompressNone, typeTest, make([]byte, MaxPayload+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("encoding an oversized payload: %v", err)
	}
}
