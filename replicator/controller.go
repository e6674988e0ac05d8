package replicator

import (
	"time"

	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// The dynamic resync-rate controller of DRBD 8.4 (drbd_rs_controller,
// reference/drbd.md §6.4), in bytes: every step (100 ms) the SyncTarget
// decides how much to request from what arrived during the last step and
// what is still in flight. It aims at c-fill-target bytes in flight (or,
// with c-fill-target 0, at c-delay-target's worth of the arriving rate),
// spreads each correction over the c-plan-ahead steps ahead of it, and
// never plans more than c-max-rate allows. It starts by planning
// resync-rate for the whole c-plan-ahead.

const controllerStep = 100 * time.Millisecond

type rsController struct {
	steps      int
	plan       []int64 // corrections for the steps ahead, oldest first
	planned    int64   // sum of plan
	fillTarget int64
	delay      time.Duration
	maxStep    int64 // c-max-rate × step
	startStep  int64 // resync-rate × step
}

func newRSController(d config.Disk) *rsController {
	steps := max(int(d.CPlanAhead/controllerStep), 1)
	return &rsController{steps: steps, plan: make([]int64, steps), fillTarget: d.CFillTarget, delay: d.CDelayTarget,
		maxStep:   int64(float64(d.CMaxRate) * controllerStep.Seconds()),
		startStep: int64(float64(d.ResyncRate) * controllerStep.Seconds())}
}

// step returns how many bytes to request in this step, given the bytes
// that arrived during the last step and those requested and not arrived.
func (c *rsController) step(arrived, inFlight int64) int64 {
	var want int64
	switch {
	case inFlight+arrived == 0: // the start of the resync
		want = c.startStep * int64(c.steps)
	case c.fillTarget > 0:
		want = c.fillTarget
	default:
		want = int64(float64(arrived) * float64(c.delay) / float64(controllerStep))
	}
	correction := want - inFlight - c.planned
	perStep := correction / int64(c.steps)
	for i := range c.plan {
		c.plan[i] += perStep
	}
	c.planned += perStep * int64(c.steps)
	now := c.plan[0]
	copy(c.plan, c.plan[1:])
	c.plan[len(c.plan)-1] = 0
	c.planned -= now
	return min(max(arrived+now, 0), c.maxStep)
}
