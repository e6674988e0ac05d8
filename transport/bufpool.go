package transport

import (
	"math/bits"
	"sync"
)

// Buffers of large frames (above ownAbove) come in size classes: class k
// holds 1<<k + bufSlack bytes, enough for a frame of a power-of-two payload
// (a write's data) with its message header and the frame's checksum or tag.
const (
	bufSlack    = 64<<10 + 64
	bufMinClass = 16 // the smallest frame above ownAbove fits in 1<<16 + bufSlack
	bufMaxClass = 25 // MaxPayload and any frame overhead fit in 1<<25 + bufSlack
)

// bufPool recycles the buffers large frames are read into, once the
// receiver hands them back (Session.Recycle): a node receiving a stream of
// 1 MiB writes otherwise allocates, clears and collects 1 MiB per write.
type bufPool struct {
	classes [bufMaxClass - bufMinClass + 1]sync.Pool
}

// bufClass returns the class of buffers that hold n bytes.
func bufClass(n int) int {
	if n <= 1<<bufMinClass+bufSlack {
		return bufMinClass
	}
	return bits.Len(uint(n - bufSlack - 1))
}

// get returns a buffer of length n, recycled if one of its class is free.
func (bp *bufPool) get(n int) []byte {
	k := bufClass(n)
	if k > bufMaxClass {
		return make([]byte, n)
	}
	if b, ok := bp.classes[k-bufMinClass].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<k+bufSlack)
}

// poolable returns the class of a buffer of capacity c, if it has one.
func poolable(c int) (int, bool) {
	k := bufClass(c)
	return k, k <= bufMaxClass && c == 1<<k+bufSlack
}

// put keeps b for a later frame if its capacity is exactly a class's; any
// other buffer is left to the garbage collector.
func (bp *bufPool) put(b []byte) {
	k, ok := poolable(cap(b))
	if !ok {
		return
	}
	b = b[:cap(b)]
	bp.classes[k-bufMinClass].Put(&b)
}
