package transport

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"
)

// flat returns the bytes a batch puts on the wire.
func flat(o *outBatch) []byte {
	var out []byte
	at := 0
	for _, r := range o.refs {
		out = append(append(out, o.b[at:r.at]...), r.data...)
		at = r.at
	}
	return append(out, o.b[at:]...)
}

// A frame whose tail the batch refers to is, on the wire, the same bytes
// as one copied in; only plain, uncompressed frames with a large tail
// refer to it.
func TestOutBatch_SameBytes(t *testing.T) {
	c := testCodecs(t)
	key := make([]byte, 32)
	rand.Read(key)
	big := make([]byte, 3<<20)
	rand.Read(big)
	type frame struct{ head, tail []byte }
	frames := []frame{
		{[]byte("hdr"), big[:refAbove]},      // referenced: at the threshold
		{[]byte("small"), big[:refAbove-1]},  // copied
		{nil, big[:1<<20]},                   // referenced, no head
		{[]byte("ack"), nil},                 // copied
		{bytes.Repeat([]byte("h"), 40), big}, // referenced
		{[]byte("x"), big[:refAbove]},        // referenced, right after another
	}
	for _, tc := range []struct {
		name string
		key  []byte
		comp Compression
		refs int
	}{
		{"plain", nil, CompressNone, 4},
		{"sealed", key, CompressNone, 0},
		{"zstd", nil, CompressZstd, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s1, _ := pair(t, tc.key, c, nil)
			s2, _ := pair(t, tc.key, c, nil)
			var o outBatch
			var want []byte
			for _, f := range frames {
				if err := o.appendFrame(s1, c, tc.comp, typeTest, f.head, f.tail); err != nil {
					t.Fatal(err)
				}
				var err error
				if want, err = appendFrameParts(want, s2, c, tc.comp, typeTest, f.head, f.tail); err != nil {
					t.Fatal(err)
				}
			}
			if len(o.refs) != tc.refs {
				t.Errorf("%d tails referenced, want %d", len(o.refs), tc.refs)
			}
			if !bytes.Equal(flat(&o), want) || o.size() != len(want) {
				t.Fatalf("the batch's %d bytes differ from the copied frames' %d", o.size(), len(want))
			}
			// What a frame reader makes of it.
			_, r := pair(t, tc.key, c, bytes.NewReader(flat(&o)))
			for i, f := range frames {
				typ, p, err := r.readFrame()
				if err != nil || typ != typeTest || !bytes.Equal(p, append(append([]byte(nil), f.head...), f.tail...)) {
					t.Fatalf("frame %d: %v", i, err)
				}
			}
		})
	}
}

func TestOutBatch_Rollback(t *testing.T) {
	c := testCodecs(t)
	s, _ := pair(t, nil, c, nil)
	var o outBatch
	tail := make([]byte, refAbove)
	if err := o.appendFrame(s, c, CompressNone, typeTest, []byte("a"), tail); err != nil {
		t.Fatal(err)
	}
	keep := append([]byte(nil), flat(&o)...)
	m := o.mark()
	o.appendFrame(s, c, CompressNone, typeTest, []byte("b"), tail)
	err := o.appendFrame(s, c, CompressNone, typeTest, []byte("c"), make([]byte, MaxPayload))
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("an oversized frame: %v", err)
	}
	o.rollback(m)
	if !bytes.Equal(flat(&o), keep) || len(o.refs) != 1 {
		t.Fatalf("after the rollback: %d bytes, %d refs", o.size(), len(o.refs))
	}
	o.reset()
	if o.size() != 0 || len(o.refs) != 0 || cap(o.refs) == 0 {
		t.Fatalf("after reset: %d bytes, %d refs (cap %d)", o.size(), len(o.refs), cap(o.refs))
	}
	if o.refs[:1][0].data != nil {
		t.Fatal("reset kept a reference to a caller's tail")
	}
}

// recConn records writes and the deadlines set before them.
type recConn struct {
	net.Conn
	writes    [][]byte
	deadlines int
	failAt    int // the write that fails (1-based; 0: none)
}

func (c *recConn) Write(p []byte) (int, error) {
	if c.failAt > 0 && len(c.writes)+1 == c.failAt {
		return 0, errors.New("link down")
	}
	c.writes = append(c.writes, append([]byte(nil), p...))
	return len(p), nil
}

func (c *recConn) SetWriteDeadline(time.Time) error { c.deadlines++; return nil }

// writeTo puts the batch's bytes on the connection in order, no chunk
// above the limit, each chunk under a fresh deadline.
func TestOutBatch_WriteTo(t *testing.T) {
	c := testCodecs(t)
	tail := make([]byte, 300<<10)
	rand.Read(tail)
	for _, chunk := range []int{1 << 10, 64 << 10, 256 << 10, 4 << 20} {
		t.Run(fmt.Sprint(chunk), func(t *testing.T) {
			s, _ := pair(t, nil, c, nil)
			var o outBatch
			for _, h := range []string{"one", "two", "three"} {
				if err := o.appendFrame(s, c, CompressNone, typeTest, []byte(h), tail); err != nil {
					t.Fatal(err)
				}
				o.appendFrame(s, c, CompressNone, typeTest, []byte("small "+h), nil)
			}
			want := flat(&o)
			conn := &recConn{}
			var scratch net.Buffers
			if err := o.writeTo(conn, chunk, time.Now, &scratch); err != nil {
				t.Fatal(err)
			}
			if got := bytes.Join(conn.writes, nil); !bytes.Equal(got, want) {
				t.Fatalf("wrote %d bytes, want %d equal ones", len(got), len(want))
			}
			for _, w := range conn.writes {
				if len(w) > chunk || len(w) == 0 {
					t.Fatalf("a write of %d bytes (chunk %d)", len(w), chunk)
				}
			}
			if chunks := (len(want) + chunk - 1) / chunk; conn.deadlines != chunks {
				t.Errorf("%d deadlines for %d chunks", conn.deadlines, chunks)
			}
			for _, p := range scratch[:cap(scratch)] {
				if p != nil {
					t.Fatal("the scratch pieces keep a reference to the data")
				}
			}
		})
	}
	s, _ := pair(t, nil, c, nil)
	var o outBatch
	o.appendFrame(s, c, CompressNone, typeTest, []byte("h"), tail)
	var scratch net.Buffers
	if err := o.writeTo(&recConn{failAt: 2}, 1<<10, time.Now, &scratch); err == nil || err.Error() != "link down" {
		t.Fatalf("a failing write: %v", err)
	}
}
