package transport

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limiter paces resync traffic to a rate in bytes per second, adjustable
// while it runs. Application replication never goes through it: only the
// resync sender waits on it, so writes always come first.
type Limiter struct {
	// mu makes a chunk's size and its reservation one step against
	// SetRate: a burst shrunk in between would fail the reservation.
	mu sync.RWMutex
	l  *rate.Limiter
}

// limiterBurst is the most a Limiter lets through at once: one 10th of a
// second at the rate, at least one 64 KiB chunk.
func limiterBurst(bytesPerSec int64) int {
	return int(max(bytesPerSec/10, 64<<10))
}

// NewLimiter returns a limiter at bytesPerSec (0 or less: unlimited).
func NewLimiter(bytesPerSec int64) *Limiter {
	lim := &Limiter{l: rate.NewLimiter(rate.Inf, 0)}
	lim.SetRate(bytesPerSec)
	return lim
}

// SetRate changes the rate; waiters adapt at once.
func (lim *Limiter) SetRate(bytesPerSec int64) {
	lim.mu.Lock()
	defer lim.mu.Unlock()
	if bytesPerSec <= 0 {
		lim.l.SetLimit(rate.Inf)
		return
	}
	lim.l.SetBurst(limiterBurst(bytesPerSec))
	lim.l.SetLimit(rate.Limit(bytesPerSec))
}

// Rate returns the rate in bytes per second (0 = unlimited).
func (lim *Limiter) Rate() int64 {
	if lim.l.Limit() == rate.Inf {
		return 0
	}
	return int64(lim.l.Limit())
}

// Wait blocks until n bytes may be sent, or ctx ends. It waits in chunks
// of at most the burst, so a rate change while it waits applies to the
// rest at once.
func (lim *Limiter) Wait(ctx context.Context, n int) error {
	for n > 0 {
		lim.mu.RLock()
		if lim.l.Limit() == rate.Inf {
			lim.mu.RUnlock()
			return nil
		}
		chunk := min(n, max(lim.l.Burst(), 1))
		r := lim.l.ReserveN(time.Now(), chunk)
		lim.mu.RUnlock()
		if !r.OK() {
			return fmt.Errorf("transport: rate limiter refused %d bytes", chunk) // cannot happen: chunk ≤ burst
		}
		if d := r.Delay(); d > 0 {
			timer := time.NewTimer(d)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				r.Cancel()
				return ctx.Err()
			}
		} else if err := ctx.Err(); err != nil {
			r.Cancel()
			return err
		}
		n -= chunk
	}
	return nil
}
