package nbd

import (
	"math/bits"
	"sync"
)

// Buffer pool for request payloads and read data, in power-of-two classes
// from 4 KiB to 64 MiB, so a steady workload allocates nothing per request.
const (
	minClassShift = 12
	maxClassShift = 26
)

// bufPool holds free buffers by class; the zero value is ready to use and it
// is safe for concurrent use.
type bufPool struct {
	classes [maxClassShift - minClassShift + 1]sync.Pool
}

// classOf returns the pool class for a buffer of n bytes (n ≤ 64 MiB).
func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// get returns a buffer of length n from the pool.
func (p *bufPool) get(n int) *[]byte {
	c := classOf(n)
	if v := p.classes[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// put returns a buffer obtained from get.
func (p *bufPool) put(b *[]byte) {
	if b == nil {
		return
	}
	p.classes[classOf(cap(*b))].Put(b)
}
