package transport

import (
	"context"
	"testing"
	"time"
)

// The limiter's pacing, checked on virtual time through the underlying
// token bucket: at 1 MiB/s, 10 MiB take 10 s less the initial burst.
func TestLimiter_Pacing(t *testing.T) {
	lim := NewLimiter(1 << 20)
	if lim.Rate() != 1<<20 || lim.l.Burst() != (1<<20)/10 {
		t.Fatalf("rate %d burst %d", lim.Rate(), lim.l.Burst())
	}
	start := time.Unix(1000, 0)
	now := start
	for sent := 0; sent < 10<<20; {
		n := min(lim.l.Burst(), 64<<10)
		r := lim.l.ReserveN(now, n)
		now = now.Add(r.DelayFrom(now))
		sent += n
	}
	want := 10*time.Second - time.Second/10
	if d := now.Sub(start); d < want-50*time.Millisecond || d > want+50*time.Millisecond {
		t.Fatalf("10 MiB at 1 MiB/s took %v of virtual time, want %v", d, want)
	}
	lim.SetRate(0)
	if lim.Rate() != 0 || lim.Wait(context.Background(), 1<<30) != nil {
		t.Fatal("an unlimited limiter waits")
	}
	lim.SetRate(4 << 20)
	if lim.l.Burst() != (4<<20)/10 {
		t.Fatalf("burst after a rate change: %d", lim.l.Burst())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := lim.Wait(ctx, 100<<20); err == nil {
		t.Fatal("Wait ignored a cancelled context")
	}
}
