package transport

import "testing"

func TestBufClass(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want int
	}{
		{ownAbove + 1, 16},
		{1<<16 + bufSlack, 16},
		{1<<16 + bufSlack + 1, 17},
		{1 << 20, 20},              // a 1 MiB write's data alone
		{1<<20 + 40 + 16, 20},      // with its message header and an AEAD tag
		{1<<20 + bufSlack, 20},     //
		{1<<20 + bufSlack + 1, 21}, //
		{MaxPayload + 16, 25},      // the largest frame
		{1<<25 + bufSlack + 1, 26}, // beyond the classes: allocated, never kept
	} {
		if got := bufClass(tc.n); got != tc.want {
			t.Errorf("bufClass(%d) = %d, want %d", tc.n, got, tc.want)
		}
		if k := bufClass(tc.n); k <= bufMaxClass && 1<<k+bufSlack < tc.n {
			t.Errorf("class %d of %d bytes holds only %d", k, tc.n, 1<<k+bufSlack)
		}
	}
}

func TestPoolable(t *testing.T) {
	for _, tc := range []struct {
		c    int
		want bool
	}{
		{1<<16 + bufSlack, true},
		{1<<20 + bufSlack, true},
		{1<<25 + bufSlack, true},
		{1 << 20, false},              // a buffer the pool did not make
		{1<<20 + bufSlack + 1, false}, //
		{4096, false},                 // small frames use the reader's own buffer
		{1<<26 + bufSlack, false},     // beyond the classes
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
	if len(b) != n || cap(b) != 1<<20+bufSlack {
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
	if c := bp.get(1 << 18); cap(c) != 1<<18+bufSlack {
		t.Fatalf("get(256 KiB) cap %d, want %d", cap(c), 1<<18+bufSlack)
	}
}
