package transport

import (
	"math/bits"
	"sync"
	"unsafe"
)

// Receive buffers come in size classes: class k holds bufSize(k) = 1<<k
// plus a sixteenth plus 64 bytes, enough for a frame of a power-of-two
// payload (a write's data) with its message header and the frame's
// checksum or tag. A session's reader reads every payload of at least
// 1<<bufMinClass bytes straight into one; a smaller payload (an ack, a
// barrier) is copied out of the reader's buffer into an allocation.
//
// Buffers of bufAlignClass and up (payloads from about 2.2 KiB, so a 4
// KiB write's) are aligned: byte bufPool.align of each lies on a PageAlign boundary; put
// keeps no other buffer of those classes. With align set to where a write message's
// data starts in its payload, the receiver can hand that data to the disk
// with O_DIRECT, without copying it first.
const (
	bufMinClass   = 10 // 1 KiB: smaller payloads (acks, barriers) are not pooled
	bufMaxClass   = 25 // MaxPayload and any frame overhead fit in bufSize(25)
	bufAlignClass = 12 // 4 KiB: the buffers of this class and up are aligned
)

// PageAlign is the boundary Config.AlignAt is aligned to in the buffers of
// large received payloads: the page size, a multiple of the logical block
// size of any disk O_DIRECT writes to.
const PageAlign = 4096

// bufSize is the capacity of the buffers of class k.
func bufSize(k int) int { return 1<<k + 1<<(k-4) + 64 }

// bufPool recycles receive buffers once the receiver hands them back
// (Session.Recycle): a node receiving a stream of writes otherwise
// allocates, clears and collects a buffer per write.
type bufPool struct {
	classes [bufMaxClass - bufMinClass + 1]sync.Pool
	// align is the offset in a buffer of bufAlignClass or up that lies on
	// a PageAlign boundary (Config.AlignAt), in [0, PageAlign).
	align int
}

// bufClass returns the smallest class whose buffers hold n bytes (at least
// bufMinClass; above bufMaxClass for a length no class holds).
func bufClass(n int) int {
	if n <= bufSize(bufMinClass) {
		return bufMinClass
	}
	k := bits.Len(uint(n - 1)) // 1<<k >= n
	if bufSize(k-1) >= n {
		return k - 1
	}
	return k
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
	if k < bufAlignClass {
		return make([]byte, n, bufSize(k))
	}
	// The heap never moves an object: a buffer placed once stays aligned
	// for as long as the pool recycles it. Its capacity is exactly the
	// class's, so put recognises it. Placing costs up to a page: a 4 KiB
	// write's buffer takes about 8.5 KiB, recycled.
	size := bufSize(k)
	b := make([]byte, size+PageAlign)
	at := alignedStart(b, bp.align)
	return b[at : at+n : at+size]
}

// alignedStart returns the index i < PageAlign of b such that &b[i+align]
// lies on a PageAlign boundary.
func alignedStart(b []byte, align int) int {
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(b))) + uintptr(align)
	return int((PageAlign - addr%PageAlign) % PageAlign)
}

// poolable returns the class of a buffer of capacity c, if it has one.
func poolable(c int) (int, bool) {
	k := bufClass(c)
	return k, k <= bufMaxClass && c == bufSize(k)
}

// put keeps b for a later frame if its capacity is exactly a class's; any
// other buffer is left to the garbage collector.
func (bp *bufPool) put(b []byte) {
	k, ok := poolable(cap(b))
	if !ok || k >= bufAlignClass && alignedStart(b, bp.align) != 0 {
		return // not the pool's: a class's capacity by chance, not aligned
	}
	b = b[:cap(b)]
	bp.classes[k-bufMinClass].Put(&b)
}
