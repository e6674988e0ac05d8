package transport

import (
	"strings"
	"testing"
	"unsafe"
)

func TestBufClass(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want int
	}{
		{0, 10},
		{1 << 10, 10},
		{bufSize(10), 10},
		{bufSize(10) + 1, 11},
		{4096 + 40 + 8, 12},      // a 4 KiB write with its message header and checksum
		{bufSize(12) + 1, 13},    //
		{ownAbove + 1, 16},       // the smallest frame a reader without a pool allocates
		{bufSize(16) + 1, 17},    //
		{1 << 20, 20},            // a 1 MiB write's data alone
		{1<<20 + 40 + 16, 20},    // with its message header and an AEAD tag
		{bufSize(20), 20},        //
		{bufSize(20) + 1, 21},    //
		{MaxPayload + 16, 25},    // the largest frame
		{bufSize(25) + 1, 26},    // beyond the classes: allocated, never kept
		{2 << 20, 21},            // a power of two never needs the next class
		{3<<19 + 1, 21},          // between two: the larger
		{1<<20 + 1<<16 + 65, 21}, //
		{1<<20 + 1<<16 + 64, 20}, //
	} {
		k := bufClass(tc.n)
		if k != tc.want {
			t.Errorf("bufClass(%d) = %d, want %d", tc.n, k, tc.want)
		}
		if k <= bufMaxClass && bufSize(k) < tc.n {
			t.Errorf("class %d of %d bytes holds only %d", k, tc.n, bufSize(k))
		}
		if k > bufMinClass && k <= bufMaxClass && bufSize(k-1) >= tc.n {
			t.Errorf("class %d of %d bytes: class %d holds it already", k, tc.n, k-1)
		}
	}
}

func TestPoolable(t *testing.T) {
	for _, tc := range []struct {
		c    int
		want bool
	}{
		{bufSize(10), true},
		{bufSize(12), true},
		{bufSize(16), true},
		{bufSize(20), true},
		{bufSize(25), true},
		{1 << 20, false},         // a buffer the pool did not make
		{bufSize(20) + 1, false}, //
		{4096, false},            //
		{512, false},             // below the smallest class
		{bufSize(26), false},     // beyond the classes
	} {
		if _, got := poolable(tc.c); got != tc.want {
			t.Errorf("poolable(%d) = %v, want %v", tc.c, got, tc.want)
		}
	}
}

func TestBufPool_Reuse(t *testing.T) {
	var bp bufPool
	n := 1<<20 + 56
	b := bp.get(n)
	if len(b) != n || cap(b) != bufSize(20) {
		t.Fatalf("get(%d): len %d cap %d", n, len(b), cap(b))
	}
	// sync.Pool may drop a Put (it does at random under -race): the pool
	// must hand a returned buffer back at least once in many tries.
	reused := false
	for range 100 {
		bp.put(b[:10]) // a payload sliced from it: the whole buffer returns
		c := bp.get(n - 8)
		if &c[0] == &b[0] {
			reused = true
			if len(c) != n-8 {
				t.Fatalf("reused buffer has len %d, want %d", len(c), n-8)
			}
			break
		}
		b = c
	}
	if !reused {
		t.Fatal("a returned buffer was never handed out again")
	}
	// Another class does not get it.
	bp.put(b)
	if c := bp.get(1 << 18); cap(c) != bufSize(18) {
		t.Fatalf("get(256 KiB) cap %d, want %d", cap(c), bufSize(18))
	}
}

// Buffers of bufAlignClass and up place byte align on a PageAlign boundary,
// keep exactly their class's capacity (put recognises them), and stay
// aligned when recycled; smaller ones are plain allocations.
func TestBufPool_Aligned(t *testing.T) {
	for _, align := range []int{0, 31, PageAlign - 1} {
		bp := bufPool{align: align}
		for _, n := range []int{2241, 4096 + 31, 64 << 10, 1<<20 + 56, MaxPayload + 16} {
			for round := range 3 {
				b := bp.get(n)
				k := bufClass(n)
				if len(b) != n || cap(b) != bufSize(k) {
					t.Fatalf("align %d, get(%d): len %d cap %d, want cap %d", align, n, len(b), cap(b), bufSize(k))
				}
				if addr := uintptr(unsafe.Pointer(&b[:cap(b)][align])); addr%PageAlign != 0 {
					t.Fatalf("align %d, get(%d), round %d: byte %d at %#x", align, n, round, align, addr)
				}
				bp.put(b)
			}
		}
		// A buffer of a class's capacity that the pool did not place
		// (a decompressed payload, say) is not kept: every buffer the
		// pool hands out stays aligned.
		k := bufClass(1 << 20)
		stray := make([]byte, bufSize(k)+PageAlign)
		at := (alignedStart(stray, align) + 1) % PageAlign
		for range 100 {
			bp.put(stray[at : at+bufSize(k) : at+bufSize(k)])
			if b := bp.get(1 << 20); uintptr(unsafe.Pointer(&b[align]))%PageAlign != 0 {
				t.Fatalf("align %d: the pool handed out a stray buffer", align)
			}
		}
	}
}

func TestNew_AlignAtRange(t *testing.T) {
	for _, at := range []int{-1, PageAlign} {
		cfg, _ := configs("")
		cfg.AlignAt = at
		if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "alignment offset") {
			t.Errorf("AlignAt %d: %v, want a range error", at, err)
		}
	}
}
