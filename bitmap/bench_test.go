package bitmap

import (
	"math/rand/v2"
	"testing"
)

// tib is the number of blocks of a 1 TiB device (a 32 MiB bitmap).
const tib = 1 << 28

func BenchmarkBitmap1TiB_SetRandom4K(b *testing.B) {
	bm := New(tib)
	r := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	for b.Loop() {
		bm.Set(r.Uint64N(tib), 1)
	}
}

func BenchmarkBitmap1TiB_Set1MiB(b *testing.B) {
	bm := New(tib)
	r := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	for b.Loop() {
		bm.Set(r.Uint64N(tib-256), 256)
	}
}

// BenchmarkBitmap1TiB_NextRun walks every dirty run of a bitmap with 1 % of
// its blocks set in runs of 1-16 blocks: one resync pass planning.
func BenchmarkBitmap1TiB_NextRun(b *testing.B) {
	bm := New(tib)
	r := rand.New(rand.NewPCG(2, 2))
	for bm.Count() < tib/100 {
		bm.Set(r.Uint64N(tib), 1+r.Uint64N(16))
	}
	b.SetBytes(tib / 8)
	b.ReportAllocs()
	for b.Loop() {
		var runs int
		for from := uint64(0); ; {
			s, n, ok := bm.NextRun(from)
			if !ok {
				break
			}
			runs++
			from = s + n
		}
		if runs == 0 {
			b.Fatal("no runs")
		}
	}
}

// BenchmarkBitmap1TiB_Or merges two 1 TiB bitmaps, as two nodes do on
// connect.
func BenchmarkBitmap1TiB_Or(b *testing.B) {
	x, y := New(tib), New(tib)
	r := rand.New(rand.NewPCG(3, 3))
	for range 100000 {
		y.Set(r.Uint64N(tib), 8)
	}
	b.SetBytes(tib / 8)
	b.ReportAllocs()
	for b.Loop() {
		if err := x.Or(y); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPage_EncodeDecode(b *testing.B) {
	bm := New(BitsPerPage * 4)
	bm.Set(100, 5000)
	dst := New(bm.Len())
	buf := make([]byte, 0, PageSize)
	b.SetBytes(PageSize)
	b.ReportAllocs()
	for b.Loop() {
		buf = bm.AppendPage(buf[:0], 0)
		if err := dst.LoadPage(buf, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkActivityLog_Hit is the cost of a write whose extent is logged.
func BenchmarkActivityLog_Hit(b *testing.B) {
	a := NewActivityLog(DefaultALExtents, 0)
	for e := range Extent(DefaultALExtents) {
		a.Acquire(e, e)
	}
	a.Committed(a.Prepare())
	r := rand.New(rand.NewPCG(4, 4))
	b.ReportAllocs()
	for b.Loop() {
		e := Extent(r.IntN(DefaultALExtents))
		if a.Acquire(e, e) != Ready {
			b.Fatal("miss")
		}
		a.Release(e, e)
	}
}
