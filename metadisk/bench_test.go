package metadisk

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// BenchmarkALTransactions measures the metadata cost of random 4 KiB
// writes, on a real file with fdatasync: activity-log transactions per
// 1,000 writes after warm-up, for a working set that fits in al-extents
// (1,000 of the default 1,237 extents) and for one that does not (4,000).
func BenchmarkALTransactions(b *testing.B) {
	for _, tc := range []struct {
		name    string
		extents int
	}{{"fits", 1000}, {"exceeds", 4000}} {
		b.Run(tc.name, func(b *testing.B) {
			dataSize := int64(tc.extents) * bitmap.ExtentSize
			l, err := ExternalLayout(dataSize, areaSize(dataSize))
			if err != nil {
				b.Fatal(err)
			}
			f, err := os.Create(filepath.Join(b.TempDir(), "md"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			f.Truncate(l.Size)
			if err := Create(f, l, "alpha", "r0", false, Options{}); err != nil {
				b.Fatal(err)
			}
			m, err := Open(f, l, Options{})
			if err != nil || m.Activate() != nil {
				b.Fatal(err)
			}
			r := rand.New(rand.NewPCG(5, 5))
			write := func() {
				off := r.Int64N(dataSize/4096) * 4096
				s, err := m.BeginWrite(off, 4096)
				if err != nil {
					b.Fatal(err)
				}
				m.MarkOutOfSync(off, 4096)
				m.EndWrite(s)
			}
			// Warm-up: every extent of the working set is touched.
			for e := range tc.extents {
				s, _ := m.BeginWrite(int64(e)*bitmap.ExtentSize, 4096)
				m.EndWrite(s)
			}
			before := m.Stats()
			for b.Loop() {
				write()
			}
			after := m.Stats()
			b.ReportMetric(float64(after.ALTransactions-before.ALTransactions)*1000/float64(b.N), "tx/1000writes")
			b.ReportMetric(float64(after.BitmapWrites-before.BitmapWrites)*1000/float64(b.N), "pages/1000writes")
		})
	}
}
