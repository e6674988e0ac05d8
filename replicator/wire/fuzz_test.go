package wire

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/nbdmirror/nbdmirror/transport"
)

// FuzzDecode decodes arbitrary payloads of arbitrary types: no panic,
// every error wraps ErrMalformed, and an accepted payload is valid and
// re-encodes to exactly its own bytes (the encoding is canonical).
func FuzzDecode(f *testing.F) {
	for _, s := range samples() {
		f.Add(uint16(s.m.Type()), Encode(s.m))
	}
	for _, c := range malformedCases() { // among them, Sizes beyond MaxSize
		f.Add(uint16(c.typ), c.p)
	}
	f.Fuzz(func(t *testing.T, typ uint16, payload []byte) {
		m, err := Decode(transport.Type(typ), payload)
		if err != nil {
			if !errors.Is(err, ErrMalformed) || m != nil {
				t.Fatalf("Decode = %#v, %v: want nil and an error wrapping ErrMalformed", m, err)
			}
			return
		}
		if m.Type() != transport.Type(typ) {
			t.Fatalf("decoded a %T of type %d from type %d", m, m.Type(), typ)
		}
		if err := m.(validator).Validate(); err != nil {
			t.Fatalf("decoded %#v does not validate: %v", m, err)
		}
		if out := Encode(m); !bytes.Equal(out, payload) {
			t.Fatalf("%#v re-encodes to\n%x\nnot\n%x", m, out, payload)
		}
		if b, ok := m.(Bitmap); ok {
			end := b.Start
			b.Each(func(s, n uint64) {
				if s < end || n == 0 || s+n > b.Start+b.Count {
					t.Fatalf("Each gives run %d+%d in %d+%d", s, n, b.Start, b.Count)
				}
				end = s + n
			})
		}
	})
}

// corpusFile formats a seed as a file of the go fuzz v1 corpus format.
func corpusFile(typ uint16, p []byte) string {
	return fmt.Sprintf("go test fuzz v1\nuint16(%d)\n[]byte(%q)\n", typ, p)
}
