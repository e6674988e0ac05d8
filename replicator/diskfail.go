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
//     and the blocks are marked out of sync; the disk stays attached. A
//     Secondary's disk becomes Inconsistent (it may lack a write).
//   - detach (the default) and call-local-io-error (which also runs the
//     local-io-error handler): the disk goes Failed at once, the session
//     ends (the Primary keeps the blocks this node did not confirm in its
//     bitmap), and once the requests in flight are done the disk is
//     detached (Diskless). The connection loop keeps running: after
//     `attach` the next handshake resyncs what the two bitmaps name.
//
// A Primary Connected to an UpToDate peer detaches and serves from the
// peer's disk (diskless.go). Without such a peer (or with pass_on) its
// data errors are passed on; its disk goes Failed only when it cannot go
// on at all: its metadata failed (every write would need it), or the disk
// stopped answering (disk-timeout); new requests then fail at once
// instead of queueing behind the hung ones. Demoted, such a node detaches.
//
// Metadata I/O errors (seen by watchedDevice) and failed flushes (which
// may have lost acknowledged writes) detach under every policy.
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
	if op == "flush" {
		r.flushFailed = true
	}
	timedOut := errors.Is(err, ErrDiskTimeout)
	// Dead: nothing more can be asked of this disk. Metadata that failed
	// stays failed until the next attach (metadisk.ErrFailed), and a
	// failed flush may have lost writes already acknowledged.
	dead := timedOut || errors.Is(err, metadisk.ErrFailed) || op == "flush"
	divert := r.disk > Failed && r.canDivertLocked(policy, timedOut) // diskless.go
	fail := r.disk > Failed && (dead || divert || policy != "pass_on" && r.role != RolePrimary)
	// pass_on on a Secondary: the disk may lack a write the Primary has,
	// so it is no longer up to date (DRBD: Inconsistent).
	write := op == "replicated write" || op == "resync write" || op == "write"
	stale := !fail && write && policy == "pass_on" && r.role != RolePrimary && r.disk > Inconsistent && r.md != nil
	switch {
	case fail:
		r.setState(r.role, Failed)
		r.log.Error(fmt.Sprintf("Local IO failed in %s. Detaching...", op), "err", err)
		switch {
		case divert:
			r.startDivertLocked()
		case r.role != RolePrimary:
			r.startDetachFailedLocked()
		default:
			r.goBackground(r.sendState) // the peer learns that this disk failed
		}
	case stale:
		r.setState(r.role, Inconsistent)
		r.log.Error(fmt.Sprintf("Local IO failed in %s: the disk is Inconsistent (on-io-error pass_on)", op), "err", err)
		md := r.md
		r.goBackground(func() {
			if err := md.UpdateSuperblock(func(sb *metadisk.Superblock) {
				sb.Flags &^= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
			}); err != nil {
				r.log.Error("recording the Inconsistent disk in the metadata failed", "err", err)
			}
			r.sendState()
		})
	}
	r.mu.Unlock()
	if fail || stale {
		r.change()
	}
	if handler != nil {
		r.spawnHandler(*handler)
	}
}

// goBackground runs f in a goroutine of bg, unless the resource stops;
// it reports whether f runs.
func (r *Resource) goBackground(f func()) bool {
	r.bgMu.Lock()
	defer r.bgMu.Unlock()
	if r.stopping {
		return false
	}
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		f()
	}()
	return true
}

// startDetachFailedLocked ends the session (it uses the disk) and
// detaches the Failed disk in the background; call with mu held.
func (r *Resource) startDetachFailedLocked() {
	if p := r.p; p != nil {
		// The peer stops sending at once; the writes this node did not
		// confirm stay marked on the Primary.
		r.goBackground(func() { p.fail(errors.New("the disk failed here")) })
	}
	if r.detaching {
		return
	}
	r.detaching = true
	r.goBackground(r.detachFailed)
}

// detachFailed waits for the session to end and detaches the Failed disk;
// the connection loop goes on and closes sessions until the disk is
// attached again. The session's end may wait for a request hung on the
// disk: the admin lock is taken only after it.
func (r *Resource) detachFailed() {
	for {
		r.mu.Lock()
		for r.p != nil && r.disk == Failed {
			r.idle.Wait()
		}
		r.mu.Unlock()
		r.admin.Lock()
		r.mu.Lock()
		if r.p == nil || r.disk != Failed {
			break
		}
		// A new session began meanwhile: end it too.
		p := r.p
		r.mu.Unlock()
		r.admin.Unlock()
		p.fail(errors.New("the disk failed here"))
	}
	defer r.admin.Unlock()
	defer func() {
		r.detaching = false
		r.mu.Unlock()
	}()
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

// watchedDevice is the metadata device as the resource uses it: each
// request on it counts as in flight on the disk (disk-timeout), and an
// error fails the disk (every policy detaches on metadata errors).
type watchedDevice struct {
	d metadisk.Device
	r *Resource
}

func (w watchedDevice) ReadAt(p []byte, off int64) (int, error) {
	w.r.localBegin()
	n, err := w.d.ReadAt(p, off)
	w.r.localEnd()
	w.failed(err)
	return n, err
}

func (w watchedDevice) WriteAt(p []byte, off int64) (int, error) {
	w.r.localBegin()
	n, err := w.d.WriteAt(p, off)
	w.r.localEnd()
	w.failed(err)
	return n, err
}

func (w watchedDevice) Sync() error {
	w.r.localBegin()
	err := w.d.Sync()
	w.r.localEnd()
	w.failed(err)
	return err
}

// failed reports a metadata I/O error in the background: the metadata
// package calls the device with its own locks held.
func (w watchedDevice) failed(err error) {
	if err == nil {
		return
	}
	r := w.r
	r.goBackground(func() { r.diskFailed("metadata", fmt.Errorf("%w: %w", metadisk.ErrFailed, err)) })
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
