package transport

import (
	"context"
	"sync"
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

// TestLimiter_WaitChunks: Wait lets through more than one burst, in
// chunks, at no more than the rate.
func TestLimiter_WaitChunks(t *testing.T) {
	lim := NewLimiter(10 << 20) // burst 1 MiB
	ctx := context.Background()
	if err := lim.Wait(ctx, lim.l.Burst()); err != nil { // empty the bucket
		t.Fatal(err)
	}
	start := time.Now()
	if err := lim.Wait(ctx, 3<<20); err != nil {
		t.Fatalf("waiting for three bursts: %v", err)
	}
	// A lower bound only: a slow machine makes it longer, never shorter.
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("3 MiB at 10 MiB/s passed in %v", d)
	}
}

// TestLimiter_WaitWhileRateChanges: SetRate shrinking the burst while Wait
// runs never makes Wait fail.
func TestLimiter_WaitWhileRateChanges(t *testing.T) {
	lim := NewLimiter(2 << 30)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				lim.SetRate(256 << 20) // burst 25.6 MiB
			} else {
				lim.SetRate(2 << 30) // burst 205 MiB
			}
			time.Sleep(100 * time.Microsecond)
		}
	})
	defer func() { close(stop); wg.Wait() }()
	for i := range 20 {
		if err := lim.Wait(context.Background(), 40<<20); err != nil {
			t.Fatalf("wait %d: %v", i, err)
		}
	}
}
