package pagecache

import (
	"os"
	"path/filepath"
	"testing"
)

// A page written through the cache is resident; pages never touched are
// not; the count covers every page the range touches.
func TestResident(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(16 * PageSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 2*PageSize), 4*PageSize); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		off, n int64
		want   int
	}{
		{"untouched", 0, 4 * PageSize, 0},
		{"written", 4 * PageSize, 2 * PageSize, 2},
		{"one byte of a written page", 5*PageSize + 100, 1, 1},
		{"straddling", 3*PageSize + 1, 3 * PageSize, 2},
		{"after", 6 * PageSize, 10 * PageSize, 0},
	} {
		got, err := Resident(f, tc.off, tc.n)
		if err != nil || got != tc.want {
			t.Errorf("%s: Resident(%d, %d) = %d, %v; want %d", tc.name, tc.off, tc.n, got, err, tc.want)
		}
	}
	if _, err := Resident(f, 0, 0); err == nil {
		t.Error("an empty range: no error")
	}
}
