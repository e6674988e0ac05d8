package blockdev

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Asynchronous direct writes use Linux native AIO (io_setup, io_submit,
// io_getevents): a write is handed to the disk in one system call that
// returns before the disk has it, and one goroutine collects the
// completions of all of them, many per call. With O_DIRECT this costs
// less CPU per 4 KiB write than pwrite through the page cache and its
// writeback (measured with fio on this project's machine: 3.0 against
// 4.9 µs per write made durable in groups of 256), and no thread waits for
// each write as it would with O_DIRECT pwrite.

// aioSlots bounds the asynchronous writes in flight on one device; a
// writer past it waits for a completion.
const aioSlots = 128

// iocbCmdPwrite is IOCB_CMD_PWRITE.
const iocbCmdPwrite = 1

// iocb is the kernel's struct iocb (linux/aio_abi.h) on a little-endian
// machine, where aio_key precedes aio_rw_flags (newAIORing sets up no
// ring on the others).
type iocb struct {
	data      uint64 // aio_data: the slot, echoed in the event
	key       uint32 // set by the kernel
	rwFlags   int32  // RWF_DSYNC for a FUA write
	opcode    uint16
	reqprio   int16
	fd        uint32
	buf       uint64
	nbytes    uint64
	offset    int64
	reserved2 uint64
	flags     uint32
	resfd     uint32
}

// ioEvent is the kernel's struct io_event.
type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

// littleEndian reports whether this machine stores the low byte first.
func littleEndian() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}

// aioWrite is a write in flight: its buffer is kept here, referenced,
// until the kernel is done with it (the iocb holds only its address).
type aioWrite struct {
	p    []byte
	off  int64
	fua  bool
	done func(error)
}

// aioRing is a device's AIO context, its in-flight writes and the
// goroutine that completes them (started with the ring, stopped by close).
type aioRing struct {
	d   *Device
	ctx uintptr // aio_context_t
	// cbs are the control blocks, one per slot, on the heap (which never
	// moves them): the kernel reads one during io_submit.
	cbs []iocb

	mu        sync.Mutex
	cond      sync.Cond  // a slot came free, a write was submitted, or closing
	slots     []aioWrite // by slot
	free      []int      // free slots
	inflight  int        // slots taken
	submitted int        // writes the kernel took and the reaper has not yet completed (see reap)
	closed    bool
	wg        sync.WaitGroup
}

// newAIORing sets up an AIO context for d's direct handle; nil if the
// kernel has none to give (no AIO, or fs.aio-max-nr reached).
func newAIORing(d *Device) *aioRing {
	if d.direct == nil || !littleEndian() {
		return nil
	}
	a := &aioRing{d: d, cbs: make([]iocb, aioSlots), slots: make([]aioWrite, aioSlots), free: make([]int, aioSlots)}
	if _, _, errno := unix.Syscall(unix.SYS_IO_SETUP, aioSlots, uintptr(unsafe.Pointer(&a.ctx)), 0); errno != 0 {
		return nil
	}
	for i := range a.free {
		a.free[i] = aioSlots - 1 - i
	}
	a.cond.L = &a.mu
	a.wg.Add(1)
	go a.reap()
	return a
}

// WriteAsync writes p at off and calls done with the result once the
// write is complete (durable if fua): when p, off and len(p) meet
// DirectAlign and the disk takes O_DIRECT, the write goes to the disk
// around the page cache and WriteAsync returns at once, done being called
// later on another goroutine; otherwise it is WriteAt, and done is called
// before WriteAsync returns. p must not change until done is called.
// Close waits for the writes in flight. Overlapping writes in flight at
// once are not ordered. One goroutine calls the done of every write in
// turn: done must not wait long (the device's other completions wait
// behind it) and must not call WriteAsync on the same device (which may
// wait for a slot that only a completion frees).
func (d *Device) WriteAsync(p []byte, off int64, fua bool, done func(error)) {
	if err := d.check(off, int64(len(p)), true); err != nil {
		done(err)
		return
	}
	if !d.Direct() || !directAligned(p, off) {
		done(d.WriteAt(p, off, fua))
		return
	}
	a := d.ring()
	if a == nil {
		done(d.WriteAt(p, off, fua))
		return
	}
	a.submit(aioWrite{p: p, off: off, fua: fua, done: done})
}

// AsyncDirect reports whether WriteAsync of an aligned request goes to the
// disk asynchronously around the page cache; it sets up the AIO context
// if it was not yet.
func (d *Device) AsyncDirect() bool { return d.Direct() && d.ring() != nil }

// ring returns d's AIO context, set up on first use; nil without one.
func (d *Device) ring() *aioRing {
	d.aioOnce.Do(func() { d.aio = newAIORing(d) })
	return d.aio
}

// submit hands w to the kernel, waiting for a free slot first; a write the
// kernel does not take is written with WriteAt.
func (a *aioRing) submit(w aioWrite) {
	a.mu.Lock()
	for len(a.free) == 0 && !a.closed {
		a.cond.Wait()
	}
	if a.closed {
		a.mu.Unlock()
		w.done(fmt.Errorf("write %s: %w", a.d.path, os.ErrClosed))
		return
	}
	i := a.free[len(a.free)-1]
	a.free = a.free[:len(a.free)-1]
	a.slots[i] = w
	cb := &a.cbs[i]
	*cb = iocb{data: uint64(i), opcode: iocbCmdPwrite, fd: uint32(a.d.direct.Fd()),
		buf: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(w.p)))), nbytes: uint64(len(w.p)), offset: w.off}
	if w.fua {
		cb.rwFlags = unix.RWF_DSYNC
	}
	a.inflight++
	a.mu.Unlock()
	// After io_submit the slot is the reaper's: it may complete it before
	// the call returns.
	list := uintptr(unsafe.Pointer(cb))
	var errno syscall.Errno
	for {
		_, _, errno = unix.Syscall(unix.SYS_IO_SUBMIT, a.ctx, 1, uintptr(unsafe.Pointer(&list)))
		if errno != unix.EINTR {
			break
		}
	}
	if errno == 0 {
		// Only now does the reaper wait for a completion: it never waits
		// in io_getevents for a write the kernel did not take.
		a.mu.Lock()
		a.submitted++
		a.cond.Broadcast()
		a.mu.Unlock()
		return
	}
	a.release(i)
	if errno == unix.EINVAL && !w.fua {
		// The file system refuses this direct write (an alignment beyond
		// DirectAlign): through the page cache, now and on. (With fua the
		// refusal may be of RWF_DSYNC by an older kernel instead.)
		a.d.noDirect.Store(true)
	}
	w.done(a.d.WriteAt(w.p, w.off, w.fua))
}

// release frees slot i.
func (a *aioRing) release(i int) {
	a.mu.Lock()
	a.slots[i] = aioWrite{}
	a.free = append(a.free, i)
	a.inflight--
	a.cond.Broadcast()
	a.mu.Unlock()
}

// reap completes the writes in flight, as the kernel reports them, until
// the ring closes with nothing in flight.
func (a *aioRing) reap() {
	defer a.wg.Done()
	events := make([]ioEvent, aioSlots)
	for {
		// submitted may be below 0 for a moment: a completion can come
		// with another's before its submitter counted it. Then nothing is
		// outstanding to wait for.
		a.mu.Lock()
		for a.submitted <= 0 && !a.closed {
			a.cond.Wait()
		}
		if a.submitted <= 0 {
			a.mu.Unlock()
			return // closed, and close waited for every write
		}
		a.mu.Unlock()
		n, _, errno := unix.Syscall6(unix.SYS_IO_GETEVENTS, a.ctx, 1, uintptr(len(events)), uintptr(unsafe.Pointer(&events[0])), 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			// Only a bad context or event array fails here: the writes in
			// flight could never be completed.
			panic(fmt.Sprintf("blockdev: io_getevents on %s: %v", a.d.path, errno))
		}
		for _, ev := range events[:n] {
			i := int(ev.data)
			a.mu.Lock()
			w := a.slots[i]
			a.submitted--
			a.mu.Unlock()
			err := a.result(w, ev.res)
			a.release(i)
			w.done(err)
		}
	}
}

// result turns the kernel's result for w into an error, writing through
// the page cache what a refused or short write left.
func (a *aioRing) result(w aioWrite, res int64) error {
	switch {
	case res == int64(len(w.p)):
		return nil
	case res == -int64(unix.EINVAL):
		a.d.noDirect.Store(true) // as in submit: refused where it is not aligned enough
		return a.d.WriteAt(w.p, w.off, w.fua)
	case res < 0:
		return &os.PathError{Op: "write", Path: a.d.path, Err: syscall.Errno(-res)}
	default: // short: the rest as a plain write
		return a.d.WriteAt(w.p[res:], w.off+res, w.fua)
	}
}

// close waits for the writes in flight, stops the reaper and destroys the
// context.
func (a *aioRing) close() error {
	a.mu.Lock()
	for a.inflight > 0 {
		a.cond.Wait()
	}
	a.closed = true
	a.cond.Broadcast()
	a.mu.Unlock()
	a.wg.Wait()
	if _, _, errno := unix.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0); errno != 0 {
		return fmt.Errorf("io_destroy for %s: %w", a.d.path, errno)
	}
	return nil
}
