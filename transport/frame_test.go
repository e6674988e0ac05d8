package transport

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"testing"
	"unsafe"

	"github.com/cespare/xxhash/v2"
	"github.com/zeebo/xxh3"
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
	w, err := newSealer(key, [4]byte{'c', 1}, VersionMax)
	if err != nil {
		t.Fatal(err)
	}
	rs, _ := newSealer(key, [4]byte{'c', 1}, VersionMax)
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
				for i := range 4 { // several frames: the counter advances
					var err error
					if i < 3 {
						wire, err = appendFrame(wire, w, c, comp, typeTest, p)
					} else { // in two parts
						wire, err = appendFrameParts(wire, w, c, comp, typeTest, p[:len(p)/2], p[len(p)/2:])
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				buf.Write(wire)
				for i := range 4 {
					typ, got, err := r.readFrame()
					if err != nil || typ != typeTest || !bytes.Equal(got, p) {
						t.Fatalf("%s/%d/%d bytes frame %d: %v", k.name, comp, len(p), i, err)
					}
				}
				if comp != CompressNone && len(p) == len(compressible) && len(wire) > 4*len(p)/4 {
					t.Errorf("%s/%d: compressible payload sent as %d bytes", k.name, comp, len(wire)/4)
				}
				if len(p) == len(random) && len(wire) > 4*(len(p)+headerSize+tagSize) {
					t.Errorf("%s/%d: incompressible payload grew to %d bytes", k.name, comp, len(wire)/4)
				}
			}
		}
	}
}

// headerOnly yields one frame header and then fails: a reader that reads
// past the header of a frame it must refuse returns errPastHeader.
type headerOnly struct {
	hdr  []byte
	sent bool
}

var errPastHeader = errors.New("read past the header")

func (h *headerOnly) Read(p []byte) (int, error) {
	if h.sent {
		return 0, errPastHeader
	}
	h.sent = true
	return copy(p, h.hdr), nil
}

func header(typ Type, flags uint16, length uint32) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(typ))
	b = binary.BigEndian.AppendUint16(b, flags)
	return binary.BigEndian.AppendUint32(b, length)
}

// TestFrame_LengthRefusedBeforeAllocation: a length past the bound is
// refused from the header alone, before the payload is read or memory is
// allocated for it; during the handshake the bound is 4 KiB and
// compression is refused.
func TestFrame_LengthRefusedBeforeAllocation(t *testing.T) {
	c := testCodecs(t)
	tests := []struct {
		name      string
		handshake bool
		hdr       []byte
		want      error
	}{
		{"past MaxPayload", false, header(typeTest, 0, MaxPayload+1), ErrFrameTooLarge},
		{"4 GiB", false, header(typeTest, 0, 0xffffffff), ErrFrameTooLarge},
		{"handshake past 4 KiB", true, header(typeHello, 0, maxHandshakePayload+1), ErrFrameTooLarge},
		{"handshake compressed", true, header(typeHello, flagS2, 300), ErrFrameFlags},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, r := pair(t, nil, c, &headerOnly{hdr: tc.hdr})
			r.handshake = tc.handshake
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, _, err := r.readFrame()
			runtime.ReadMemStats(&after)
			if !errors.Is(err, tc.want) {
				t.Fatalf("readFrame: %v, want %v", err, tc.want)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 64<<10 {
				t.Fatalf("allocated %d bytes for a refused frame", n)
			}
		})
	}
	// The same lengths are fine after the handshake: the bound is the
	// frame's, not the reader's.
	_, r := pair(t, nil, c, &headerOnly{hdr: header(typeTest, 0, maxHandshakePayload+1)})
	if _, _, err := r.readFrame(); !errors.Is(err, errPastHeader) {
		t.Fatalf("a 4 KiB+1 frame after the handshake: %v, want it read", err)
	}
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
			w, _ := newSealer(key, [4]byte{'s', 1}, VersionMax)
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
	w, _ := pair(t, nil, c, nil)
	if _, err := appendFrame(nil, w, c, CompressNone, typeTest, make([]byte, MaxPayload+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("encoding an oversized payload: %v", err)
	}
}

// With a pool, the reader reads every payload from 1 KiB on straight into
// a pooled buffer the caller keeps (no copy out of its own buffer); below
// that, and without a pool up to ownAbove, the payload is in the reused
// buffer. A compressed frame's payload is decompression's own allocation.
func TestFrame_ReadPooled(t *testing.T) {
	c := testCodecs(t)
	const alignAt = 31 // a write message's header
	for _, tc := range []struct {
		name     string
		pool     bool
		size     int
		comp     Compression
		key      []byte
		owned    bool
		poolable bool
		aligned  bool // byte alignAt of the payload is on a PageAlign boundary
	}{
		{"pool, below 1 KiB", true, 1<<bufMinClass - 1, CompressNone, nil, false, false, false},
		{"pool, 1 KiB", true, 1 << bufMinClass, CompressNone, nil, true, true, false},
		{"pool, 2 KiB", true, 2048, CompressNone, nil, true, true, false},
		{"pool, 4 KiB", true, 4096, CompressNone, nil, true, true, true},
		{"pool, 64 KiB", true, 64 << 10, CompressNone, nil, true, true, true},
		{"pool, 1 MiB", true, 1 << 20, CompressNone, nil, true, true, true},
		{"pool, sealed 1 MiB", true, 1 << 20, CompressNone, bytes.Repeat([]byte{7}, 32), true, true, true},
		{"pool, compressed 64 KiB", true, 64 << 10, CompressS2, nil, true, false, false},
		{"no pool, 4 KiB", false, 4096, CompressNone, nil, false, false, false},
		{"no pool, above ownAbove", false, ownAbove + 1, CompressNone, nil, true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Random, or for compression half random: it still compresses
			// (the frame is sent compressed) to a body read into the pool.
			payload := make([]byte, tc.size)
			if tc.comp == CompressNone {
				rand.Read(payload)
			} else {
				rand.Read(payload[:tc.size/2])
			}
			var in bytes.Buffer
			w, r := pair(t, tc.key, c, &in)
			if tc.pool {
				r.pool = &bufPool{align: alignAt}
			}
			for range 2 {
				b, err := appendFrame(nil, w, c, tc.comp, typeTest, payload)
				if err != nil {
					t.Fatal(err)
				}
				if flags, n := binary.BigEndian.Uint16(b[2:4]), binary.BigEndian.Uint32(b[4:8]); tc.comp != CompressNone && (flags == 0 || n < 1<<bufMinClass) {
					t.Fatalf("frame flags %#x, %d bytes: not a compressed body the pool takes", flags, n)
				}
				in.Write(b)
			}
			var first []byte
			for i := range 2 {
				typ, p, err := r.readFrame()
				if err != nil || typ != typeTest || !bytes.Equal(p, payload) {
					t.Fatalf("frame %d: type %d, %d bytes, err %v", i, typ, len(p), err)
				}
				if r.owned != tc.owned {
					t.Fatalf("frame %d: owned %v, want %v", i, r.owned, tc.owned)
				}
				if _, ok := poolable(cap(p)); ok != tc.poolable {
					t.Fatalf("frame %d: capacity %d poolable %v, want %v", i, cap(p), ok, tc.poolable)
				}
				if addr := uintptr(unsafe.Pointer(&p[alignAt])); (addr%PageAlign == 0) != tc.aligned {
					t.Fatalf("frame %d: byte %d at %#x, PageAlign boundary wanted: %v", i, alignAt, addr, tc.aligned)
				}
				if i == 0 {
					first = p
				} else if !tc.owned && &first[0] != &p[0] {
					t.Fatal("a payload the caller does not own is not in the reused buffer")
				} else if tc.owned && &first[0] == &p[0] {
					t.Fatal("two owned payloads share a buffer")
				}
			}
		})
	}
}

// A session's frame checksum is the same whether the body is hashed whole
// or as a head and a referenced tail (outBatch), at every length around
// XXH3's stripe and block sizes and version 3's split, for every version;
// version 3's is its definition (doc.go), and differs from version 2's
// past the split; handshake frames keep xxhash64.
func TestFrame_ChecksumParts(t *testing.T) {
	body := make([]byte, 3<<20)
	rand.Read(body)
	hdr := header(typeTest, 0, 0)
	seed := binary.BigEndian.Uint64(hdr)
	sealers := map[string]*frameSealer{
		"handshake (xxhash64)": {},
		"version 2":            {xxh3: true},
		"version 3":            {xxh3: true, split: true},
	}
	for name, s := range sealers {
		for _, n := range []int{0, 1, 16, 17, 63, 64, 65, 96, 128, 129, 240, 241, 1023, 1024, 1025, 4096 + 40, 64<<10 + 40, 1<<20 + 31, 3 << 20} {
			whole := s.checksum(hdr, body[:n], nil)
			for _, cut := range []int{0, 1, 31, 40, 63, 64, 65, 100, n / 2, n - 1} {
				if cut < 0 || cut > n {
					continue
				}
				if got := s.checksum(hdr, body[:cut], body[cut:n]); got != whole {
					t.Fatalf("%s, %d bytes cut at %d: %#x, whole %#x", name, n, cut, got, whole)
				}
			}
			other := header(typeTest, 0, 1)
			if s.checksum(other, body[:n], nil) == whole {
				t.Fatalf("%s, %d bytes: a different header gives the same checksum", name, n)
			}
			switch name {
			case "version 2":
				if want := xxh3.HashSeed(body[:n], seed); whole != want {
					t.Fatalf("version 2, %d bytes: %#x, want XXH3-64 seeded with the header %#x", n, whole, want)
				}
			case "version 3":
				want := xxh3.HashSeed(body[:n], seed)
				if n > splitAt {
					want = xxh3.HashSeed(body[splitAt:n], xxh3.HashSeed(body[:splitAt], seed))
					if whole == xxh3.HashSeed(body[:n], seed) {
						t.Fatalf("version 3, %d bytes: the same checksum as version 2", n)
					}
				}
				if whole != want {
					t.Fatalf("version 3, %d bytes: %#x, want %#x", n, whole, want)
				}
			}
		}
	}
	if (&frameSealer{}).checksum(hdr, body[:100], nil) != xxhash.Sum64(append(append([]byte(nil), hdr...), body[:100]...)) {
		t.Fatal("a handshake frame's checksum is not xxhash64 of header and body")
	}
}

// chunkReader hands out its data in reads of at most the next chunk size
// (cycling), like segments arriving on a socket, and counts what it gave.
// check, if set, runs before each read.
type chunkReader struct {
	data   []byte
	chunks []int
	i      int
	given  int
	check  func()
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.check != nil {
		c.check()
	}
	if c.given == len(c.data) {
		return 0, io.EOF
	}
	n := min(len(p), c.chunks[c.i%len(c.chunks)], len(c.data)-c.given)
	c.i++
	copy(p, c.data[c.given:c.given+n])
	c.given += n
	return n, nil
}

// The receive low-water mark a reader sets while a large frame arrives is
// never more than what the peer has still to send of that frame: a mark
// above it would leave the reader asleep while the peer waits for an
// answer (protocol C). It is back at 1 once the frame is read, and frames
// below lowatFrom never touch it.
func TestFrame_ReadBodyLowat(t *testing.T) {
	c := testCodecs(t)
	for _, size := range []int{lowatFrom - 100, lowatFrom + 100, 1 << 20, 3<<20 + 17, MaxPayload} {
		for _, chunks := range [][]int{{1 << 30}, {1448}, {64 << 10}, {100, 9000, 70000, 3}, {5000, 1 << 20}} {
			name := fmt.Sprintf("%d bytes in reads of %v", size, chunks)
			payload := make([]byte, size)
			rand.Read(payload)
			w, _ := pair(t, nil, c, nil)
			frame, err := appendFrame(nil, w, c, CompressNone, typeTest, payload)
			if err != nil {
				t.Fatal(err)
			}
			// A second frame behind it: the peer may already be sending
			// the next one, which the mark must not count on.
			next, err := appendFrame(nil, w, c, CompressNone, typeTest, []byte("next"))
			if err != nil {
				t.Fatal(err)
			}
			src := &chunkReader{data: append(frame, next...), chunks: chunks}
			_, r := pair(t, nil, c, src)
			r.pool = &bufPool{}
			// A read on a socket with a mark of n waits for n bytes: at
			// every read, the mark in force must be no more than what is
			// left of the frame.
			var marks []int
			mark := 1
			r.lowat = func(n int) { marks, mark = append(marks, n), n }
			src.check = func() {
				if left := len(frame) - src.given; mark > 1 && mark > left {
					t.Fatalf("%s: a read with low-water mark %d and %d bytes of the frame still to come", name, mark, left)
				}
			}
			for i, want := range [][]byte{payload, []byte("next")} {
				typ, p, err := r.readFrame()
				if err != nil || typ != typeTest || !bytes.Equal(p, want) {
					t.Fatalf("%s: frame %d: type %d, %d bytes, %v", name, i, typ, len(p), err)
				}
				if i == 0 {
					switch {
					case size < lowatFrom && len(marks) != 0:
						t.Errorf("%s: marks %v for a small frame", name, marks)
					case len(marks) > 0 && marks[len(marks)-1] != 1:
						t.Errorf("%s: marks %v: not reset to 1 after the frame", name, marks)
					}
				}
			}
			if size > 2*lowatFrom && len(chunks) == 1 && chunks[0] == 1448 && len(marks) == 0 {
				t.Errorf("%s: a large frame arriving in segments read without a low-water mark", name)
			}
		}
	}
}
