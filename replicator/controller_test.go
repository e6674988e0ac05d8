package replicator

import (
	"testing"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// simulate runs the controller against a link that delivers at most
// capacity bytes a step, in order, and returns the requests and the bytes
// in flight at each step.
func simulate(c *rsController, capacity int64, steps int) (reqs, flights []int64) {
	var inFlight, arrived int64
	for range steps {
		req := c.step(arrived, inFlight)
		reqs = append(reqs, req)
		inFlight += req
		arrived = min(inFlight, capacity)
		inFlight -= arrived
		flights = append(flights, inFlight)
	}
	return reqs, flights
}

func TestRSController(t *testing.T) {
	d := config.Disk{ResyncRate: 250 << 10, CPlanAhead: 2 * time.Second, CFillTarget: 256 << 10,
		CDelayTarget: time.Second, CMaxRate: 100 << 20}
	t.Run("starts at resync-rate", func(t *testing.T) {
		c := newRSController(d)
		if got, want := c.step(0, 0), int64(25600); got != want {
			t.Fatalf("first step requests %d bytes, want resync-rate × 100 ms = %d", got, want)
		}
	})
	t.Run("a fast link ramps up to c-max-rate and stays there", func(t *testing.T) {
		reqs, _ := simulate(newRSController(d), 1<<40, 600)
		maxStep := int64(10 << 20) // 100 MiB/s × 100 ms
		for i, r := range reqs {
			if r > maxStep {
				t.Fatalf("step %d requests %d bytes, above c-max-rate's %d", i, r, maxStep)
			}
		}
		if last := reqs[len(reqs)-1]; last != maxStep {
			t.Fatalf("after 60 s on an unlimited link the controller requests %d bytes a step, want %d", last, maxStep)
		}
	})
	t.Run("a slow link holds about c-fill-target in flight", func(t *testing.T) {
		const capacity = 1 << 20 // 10 MiB/s
		reqs, flights := simulate(newRSController(d), capacity, 600)
		var sumReq, sumFlight int64
		for i := 300; i < 600; i++ {
			sumReq += reqs[i]
			sumFlight += flights[i]
		}
		avgReq, avgFlight := sumReq/300, sumFlight/300
		if avgReq < capacity*9/10 || avgReq > capacity*11/10 {
			t.Errorf("steady state requests %d bytes a step on a link of %d", avgReq, capacity)
		}
		if avgFlight < d.CFillTarget/2 || avgFlight > d.CFillTarget*2 {
			t.Errorf("steady state holds %d bytes in flight, c-fill-target is %d", avgFlight, d.CFillTarget)
		}
	})
	t.Run("c-delay-target without c-fill-target", func(t *testing.T) {
		dd := d
		dd.CFillTarget = 0
		const capacity = 1 << 20
		_, flights := simulate(newRSController(dd), capacity, 600)
		var sum int64
		for i := 300; i < 600; i++ {
			sum += flights[i]
		}
		// A second's worth of the arriving rate: 10 steps of 1 MiB.
		if avg := sum / 300; avg < 5<<20 || avg > 20<<20 {
			t.Errorf("steady state holds %d bytes in flight, want about c-delay-target × rate = 10 MiB", avg)
		}
	})
}
