package replicator

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/nbdmirror/nbdmirror/metadisk"
)

// Local disk failures (DRBD's on-io-error and disk-timeout).
//
// An I/O error of the disk or of its metadata is handled by the disk
// section's on-io-error:
//
//   - pass_on: the error goes to whoever asked (an NBD client gets EIO,
//     a replicated write ends the session so that the Primary marks it)
//     and the blocks are marked out of sync; the disk stays attached.
//   - detach (the default) and call-local-io-error (which also runs the
//     local-io-error handler): the disk goes Failed at once, the session
//     ends (the Primary keeps the blocks this node did not confirm in its
//     bitmap), and once the requests in flight are done the disk is
//     detached (Diskless). The connection loop keeps running: after
//     `attach` the next handshake resyncs what the two bitmaps name.
//
// A Primary has no peer to serve its I/O from when its disk is gone
// (nbdmirror has no diskless Primary), so a Primary's data errors are
// passed on whatever the policy. Its disk goes Failed only when it cannot
// go on at all: its metadata failed (every write would need it), or the
// disk stopped answering (disk-timeout); new requests then fail at once
// instead of queueing behind the hung ones. Demoted, such a node detaches.
//
// Metadata I/O errors detach under every policy.
//
// disk-timeout: a watchdog started at attach treats the disk as failed
// when requests are in flight on it (data or activity log) and none has
// completed for the timeout. A request the disk never answers stays
// blocked in its system call: the failure only stops new work from
// waiting behind it and lets the peer go on without this node.

// ErrDiskTimeout is the failure disk-timeout reports.
var ErrDiskTimeout = errors.New("replicator: the disk did not complete a request within disk-timeout")

// errDiskFailed refuses application I/O on a Primary whose disk failed.
var errDiskFailed = fmt.Errorf("replicator: the local disk failed: %w", syscall.EIO)

// localBegin and localEnd bracket every request on the disk or its
// activity log; disk-timeout watches them.
func (r *Resource) localBegin() { r.local.Add(1) }

func (r *Resource) localEnd() {
	r.local.Add(-1)
	r.localDone.Add(1)
}

// diskFailed reacts to an I/O error of the local disk or its metadata;
// op names what failed. local-io-error runs at the first error since the
// attach, with `on-io-error call-local-io-error`.
func (r *Resource) diskFailed(op string, err error) {
	if err == nil {
		return
	}
	policy := r.cfg.Disk.OnIOError
	r.mu.Lock()
	var handler *handlerEnv
	if policy == "call-local-io-error" && !r.ioErrorReported {
		r.ioErrorReported = true
		e := r.handlerEnvLocked("local-io-error", "NBDMIRROR_IO_ERROR="+op+": "+err.Error())
		handler = &e
	}
	// Metadata that failed stays failed until the next attach
	// (metadisk.ErrFailed): every policy detaches, as DRBD's does.
	dead := errors.Is(err, ErrDiskTimeout) || errors.Is(err, metadisk.ErrFailed)
	fail := r.disk > Failed && (dead || policy != "pass_on" && r.role != RolePrimary)
	if fail {
		r.setState(r.role, Failed)
		r.log.Error(fmt.Sprintf("Local IO failed in %s. Detaching...", op), "err", err)
		if r.role != RolePrimary {
			r.startDetachFailedLocked()
		}
	}
	r.mu.Unlock()
	if fail {
		r.change()
	}
	if handler != nil {
		r.spawnHandler(*handler)
	}
}

// startDetachFailedLocked detaches a Failed disk in the background; call
// with mu held.
func (r *Resource) startDetachFailedLocked() {
	if r.detaching {
		return
	}
	r.detaching = true
	p := r.p
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		r.detachFailed(p)
	}()
}

// detachFailed ends the session p (if any: it uses the disk), waits for
// its end and detaches the Failed disk; the connection loop goes on and
// closes sessions until the disk is attached again.
func (r *Resource) detachFailed(p *peer) {
	if p != nil {
		// The peer stops sending at once; the writes this node did not
		// confirm stay marked on the Primary.
		p.fail(errors.New("the disk failed here"))
	}
	r.admin.Lock()
	defer r.admin.Unlock()
	r.mu.Lock()
	defer func() {
		r.detaching = false
		r.mu.Unlock()
	}()
	for r.p != nil && r.disk == Failed {
		r.idle.Wait()
	}
	if r.disk != Failed || r.role == RolePrimary {
		return // detached, or promoted, meanwhile
	}
	r.mu.Unlock()
	err := r.detach()
	r.mu.Lock()
	if err != nil {
		r.log.Error("detaching the failed disk", "err", err)
	}
}

// watchDisk is disk-timeout's watchdog of one attach: it fails the disk
// when requests have been in flight on it for timeout without one
// completing. It ends when stop is closed or after it failed the disk.
func (r *Resource) watchDisk(stop <-chan struct{}, timeout time.Duration) {
	tick := time.NewTicker(min(max(timeout/8, 10*time.Millisecond), time.Second))
	defer tick.Stop()
	var seen uint64
	since := time.Now() // the last completion, or the last instant with nothing in flight
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			done := r.localDone.Load()
			if r.local.Load() <= 0 || done != seen {
				seen, since = done, now
				continue
			}
			if stuck := now.Sub(since); stuck >= timeout {
				r.diskFailed("disk-timeout", fmt.Errorf("%w (%v): no request completed for %v", ErrDiskTimeout, timeout, stuck.Round(time.Millisecond)))
				return
			}
		}
	}
}

// startWatchLocked starts disk-timeout's watchdog for a new attach, if
// configured; call with mu held.
func (r *Resource) startWatchLocked() {
	t := r.cfg.Disk.DiskTimeout
	if t <= 0 {
		return
	}
	stop, done := make(chan struct{}), make(chan struct{})
	r.watchStop, r.watchDone = stop, done
	go func() {
		defer close(done)
		r.watchDisk(stop, t)
	}()
}

// stopWatch stops the watchdog of the attach that ends.
func (r *Resource) stopWatch() {
	r.mu.Lock()
	stop, done := r.watchStop, r.watchDone
	r.watchStop, r.watchDone = nil, nil
	r.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}
