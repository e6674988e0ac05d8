package bitmap

import (
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestBitmap_SetClearCount(t *testing.T) {
	tests := []struct {
		name             string
		nbits            uint64
		setStart, setN   uint64
		wantSet          uint64
		clrStart, clrN   uint64
		wantCleared      uint64
		wantCount        uint64
		probeSet, probe0 []uint64
	}{
		{"one bit", 100, 5, 1, 1, 0, 0, 0, 1, []uint64{5}, []uint64{4, 6}},
		{"within a word", 100, 3, 10, 10, 5, 2, 2, 8, []uint64{3, 4, 7, 12}, []uint64{5, 6, 13}},
		{"across words", 300, 60, 10, 10, 64, 1, 1, 9, []uint64{60, 63, 65, 69}, []uint64{64, 70}},
		{"whole words", 1000, 64, 256, 256, 128, 64, 64, 192, []uint64{64, 127, 192, 319}, []uint64{63, 128, 191, 320}},
		{"clipped at the end", 70, 65, 100, 5, 0, 0, 0, 5, []uint64{65, 69}, []uint64{64, 70}},
		{"past the end", 70, 70, 10, 0, 0, 0, 0, 0, nil, []uint64{69, 70}},
		{"everything", 130, 0, 130, 130, 0, 130, 130, 0, nil, []uint64{0, 129}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.nbits)
			if got := b.Set(tc.setStart, tc.setN); got != tc.wantSet {
				t.Errorf("Set newly set %d, want %d", got, tc.wantSet)
			}
			if got := b.Set(tc.setStart, tc.setN); got != 0 {
				t.Errorf("second Set newly set %d", got)
			}
			if got := b.Clear(tc.clrStart, tc.clrN); got != tc.wantCleared {
				t.Errorf("Clear cleared %d, want %d", got, tc.wantCleared)
			}
			if b.Count() != tc.wantCount || b.CountRange(0, tc.nbits) != tc.wantCount {
				t.Errorf("Count %d CountRange %d, want %d", b.Count(), b.CountRange(0, tc.nbits), tc.wantCount)
			}
			for _, i := range tc.probeSet {
				if !b.Test(i) {
					t.Errorf("bit %d clear", i)
				}
			}
			for _, i := range tc.probe0 {
				if b.Test(i) {
					t.Errorf("bit %d set", i)
				}
			}
		})
	}
}

// model is a plain []bool reference implementation.
type model []bool

func (m model) run(from uint64) (uint64, uint64, bool) {
	for i := from; i < uint64(len(m)); i++ {
		if m[i] {
			j := i
			for j < uint64(len(m)) && m[j] {
				j++
			}
			return i, j - i, true
		}
	}
	return 0, 0, false
}

func TestBitmap_AgainstModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 50 {
		n := uint64(1 + r.IntN(5000))
		b, m := New(n), make(model, n)
		for range 200 {
			start, cnt := uint64(r.IntN(int(n))), uint64(r.IntN(300))
			set := r.IntN(3) > 0
			var want uint64
			for i := start; i < min(start+cnt, n); i++ {
				if m[i] != set {
					want++
					m[i] = set
				}
			}
			var got uint64
			if set {
				got = b.Set(start, cnt)
			} else {
				got = b.Clear(start, cnt)
			}
			if got != want {
				t.Fatalf("round %d: changed %d bits, want %d", round, got, want)
			}
		}
		var count uint64
		for _, v := range m {
			if v {
				count++
			}
		}
		if b.Count() != count {
			t.Fatalf("round %d: count %d, want %d", round, b.Count(), count)
		}
		for from := uint64(0); from <= n; from += uint64(1 + r.IntN(50)) {
			ws, wn, wok := m.run(from)
			gs, gn, gok := b.NextRun(from)
			if ws != gs || wn != gn || wok != gok {
				t.Fatalf("round %d: NextRun(%d) = %d,%d,%v want %d,%d,%v", round, from, gs, gn, gok, ws, wn, wok)
			}
		}
	}
}

func TestBitmap_Or(t *testing.T) {
	a, b := New(1000), New(1000)
	a.Set(0, 10)
	b.Set(5, 10)
	b.Set(900, 100)
	if err := a.Or(b); err != nil {
		t.Fatal(err)
	}
	if a.Count() != 115 || !a.Test(14) || !a.Test(999) || a.Test(15) {
		t.Errorf("after Or: count %d", a.Count())
	}
	if err := a.Or(New(999)); !errors.Is(err, ErrSizeMismatch) {
		t.Errorf("Or of different sizes: %v", err)
	}
	c := a.Clone()
	if !c.Equal(a) {
		t.Error("clone differs")
	}
	c.Clear(0, 1)
	if c.Equal(a) || !a.Test(0) {
		t.Error("clone shares storage")
	}
}

func TestBitmap_DirtyPagesAndResize(t *testing.T) {
	b := New(3*BitsPerPage + 10) // 4 pages, the last one partial
	if b.Pages() != 4 || len(b.DirtyPages()) != 0 {
		t.Fatalf("pages %d dirty %v", b.Pages(), b.DirtyPages())
	}
	b.Set(BitsPerPage-1, 2) // pages 0 and 1
	b.Set(3*BitsPerPage+9, 1)
	if got := b.DirtyPages(); !slices.Equal(got, []int{0, 1, 3}) {
		t.Errorf("dirty pages %v", got)
	}
	b.MarkClean(1)
	b.Set(BitsPerPage, 1) // already set: the page stays clean
	if got := b.DirtyPages(); !slices.Equal(got, []int{0, 3}) {
		t.Errorf("dirty pages %v", got)
	}
	b.Resize(5*BitsPerPage, true)
	if b.Pages() != 5 || b.Count() != 3+2*BitsPerPage-10 || !b.Test(5*BitsPerPage-1) {
		t.Errorf("grown: pages %d count %d", b.Pages(), b.Count())
	}
	b.Resize(BitsPerPage, false)
	if b.Count() != 1 || b.Pages() != 1 {
		t.Errorf("shrunk: count %d pages %d", b.Count(), b.Pages())
	}
	if f, l := PagesOfBlocks(BitsPerPage-1, 2); f != 0 || l != 1 {
		t.Errorf("PagesOfBlocks %d %d", f, l)
	}
}

func TestBlockRange(t *testing.T) {
	for _, tc := range []struct{ off, n, first, count int64 }{
		{0, 4096, 0, 1}, {1, 4096, 0, 2}, {4095, 2, 0, 2}, {8192, 1, 2, 1}, {0, 0, 0, 0}, {12288, 8192, 3, 2},
	} {
		f, n := BlockRange(tc.off, tc.n)
		if int64(f) != tc.first || int64(n) != tc.count {
			t.Errorf("BlockRange(%d,%d) = %d,%d want %d,%d", tc.off, tc.n, f, n, tc.first, tc.count)
		}
	}
	if Blocks(4097) != 2 || Blocks(0) != 0 {
		t.Error("Blocks")
	}
}

func TestPage_Encoding(t *testing.T) {
	b := New(BitsPerPage + 100)
	b.Set(0, 3)
	b.Set(BitsPerPage+99, 1)
	pg := b.AppendPage(nil, 0)
	if len(pg) != PageSize {
		t.Fatalf("page of %d bytes", len(pg))
	}
	// The header pins the format: magic, version 1, index 0, block count.
	if got, want := hex.EncodeToString(pg[:24]), "4e4d4250"+"0001"+"0000"+"00000000"+"00000000"+"0000000000007c64"; got != want {
		t.Errorf("header %s, want %s", got, want)
	}
	if pg[offPayload] != 0x07 {
		t.Errorf("first payload byte %#x, want 0x07 (blocks 0-2)", pg[offPayload])
	}
	c := New(b.Len())
	for p := range b.Pages() {
		if err := c.LoadPage(b.AppendPage(nil, p), p); err != nil {
			t.Fatalf("page %d: %v", p, err)
		}
	}
	if !c.Equal(b) || len(c.DirtyPages()) != 0 {
		t.Fatalf("round trip: count %d, dirty %v", c.Count(), c.DirtyPages())
	}
	last := b.AppendPage(nil, 1)
	tests := []struct {
		name   string
		mutate func([]byte) []byte
		page   int
		nbits  uint64
		want   error
	}{
		{"torn", func(p []byte) []byte { p[2000] ^= 0x40; return p }, 1, b.Len(), ErrPageChecksum},
		{"wrong index", func(p []byte) []byte { return p }, 0, b.Len(), ErrPageIndex},
		{"other bitmap size", func(p []byte) []byte { return p }, 1, b.Len() + 1, ErrPageIndex},
		{"never written", func(p []byte) []byte { return make([]byte, PageSize) }, 1, b.Len(), ErrPageMagic},
		{"short", func(p []byte) []byte { return p[:100] }, 1, b.Len(), ErrPageLength},
		{"bit past the end", func(p []byte) []byte {
			p[offPayload+100/8] |= 1 << (100 % 8)
			return resum(p)
		}, 1, b.Len(), ErrPageIndex},
		{"future version", func(p []byte) []byte { p[offVersion+1] = 2; return resum(p) }, 1, b.Len(), ErrPageVersion},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pg := tc.mutate(append([]byte(nil), last...))
			if err := CheckPage(pg, tc.page, tc.nbits); !errors.Is(err, tc.want) {
				t.Errorf("CheckPage: %v, want %v", err, tc.want)
			}
		})
	}
	if err := c.LoadPage(last, 7); !errors.Is(err, ErrPageIndex) {
		t.Errorf("LoadPage of a page beyond the bitmap: %v", err)
	}
	if n := c.SetPage(1); n != 99 || c.Count() != b.Count()+99 {
		t.Errorf("SetPage newly set %d", n)
	}
}
