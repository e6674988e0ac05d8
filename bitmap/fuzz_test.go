package bitmap

import (
	"bytes"
	"testing"
)

// FuzzPage decodes arbitrary pages: no panic, and an accepted page
// re-encodes to the same bytes (nothing in it is ignored). With fixSum the
// harness writes the right checksum first, so mutations reach the checks
// behind it.
func FuzzPage(f *testing.F) {
	b := New(BitsPerPage + 5000)
	b.Set(10, 4000)
	b.Set(BitsPerPage+4999, 1)
	f.Add(b.AppendPage(nil, 0), uint16(0), uint64(b.Len()), false)
	f.Add(b.AppendPage(nil, 1), uint16(1), uint64(b.Len()), true)
	f.Add(make([]byte, PageSize), uint16(0), uint64(100), true)
	f.Fuzz(func(t *testing.T, pg []byte, idx uint16, nbits uint64, fixSum bool) {
		nbits = nbits%(4*BitsPerPage) + 1
		bm := New(nbits)
		p := int(idx) % bm.Pages()
		if fixSum && len(pg) == PageSize {
			pg = resum(bytes.Clone(pg))
		}
		if err := bm.LoadPage(pg, p); err != nil {
			return
		}
		if out := bm.AppendPage(nil, p); !bytes.Equal(out, pg) {
			t.Fatalf("accepted page %d re-encodes differently", p)
		}
		if bm.Count() != bm.CountRange(0, nbits) {
			t.Fatal("count out of step")
		}
	})
}
