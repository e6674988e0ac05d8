package bitmap

import (
	"errors"
	"testing"
)

// TestPageBits: a valid page written for a bitmap of another length (an
// interrupted resize) is told apart from a page that belongs elsewhere.
func TestPageBits(t *testing.T) {
	b := New(3 * BitsPerPage)
	b.Set(5, 10)
	pg := b.AppendPage(nil, 0)
	b.Resize(4*BitsPerPage, true)
	err := CheckPage(pg, 0, b.Len())
	if !errors.Is(err, ErrPageBits) || !errors.Is(err, ErrPageIndex) {
		t.Fatalf("page of the old length: %v, want ErrPageBits and ErrPageIndex", err)
	}
	if err := CheckPage(b.AppendPage(nil, 1), 0, b.Len()); !errors.Is(err, ErrPageIndex) || errors.Is(err, ErrPageBits) {
		t.Fatalf("page 1 read as page 0: %v, want ErrPageIndex alone", err)
	}
	if err := CheckPage(b.AppendPage(nil, 0), 0, b.Len()); err != nil {
		t.Fatalf("page of the new length: %v", err)
	}
	if got := b.Count(); got != 10+BitsPerPage {
		t.Fatalf("%d bits after growing with the new blocks set, want %d", got, 10+BitsPerPage)
	}
}
