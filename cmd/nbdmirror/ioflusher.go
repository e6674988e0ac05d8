package main

import (
	"errors"
	"log/slog"
	"syscall"

	"golang.org/x/sys/unix"
)

// setIOFlusher marks every thread of this process an I/O flusher
// (PR_SET_IO_FLUSHER, Linux 5.6): the kernel's memory reclaim in these
// threads does not wait for I/O, which could be I/O to a device this
// daemon serves (an NBD client or a loop device on its export, the page
// cache of a file system on it), and does not throttle them for the
// dirty pages of other devices. The flag is per thread and a new thread
// inherits it from the one that creates it, so it is set on every thread
// at once (syscall.AllThreadsSyscall6), which Go can do only in a build
// without cgo (make build).
func setIOFlusher() error {
	_, _, errno := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// ioFlusher sets the I/O flusher flag where allowed and logs the outcome.
func ioFlusher(log *slog.Logger) {
	switch err := setIOFlusher(); {
	case err == nil:
		log.Info("memory reclaim in the daemon's threads does not wait for I/O (PR_SET_IO_FLUSHER)")
	case errors.Is(err, syscall.ENOTSUP):
		log.Info("PR_SET_IO_FLUSHER not set: this build links C code (cgo), and Go cannot set it on every thread of such a process (make build does not link C)")
	case errors.Is(err, syscall.EPERM):
		log.Warn("PR_SET_IO_FLUSHER not allowed: the daemon needs CAP_SYS_RESOURCE for it (memory reclaim may then wait for I/O to the devices it serves)")
	default:
		log.Info("PR_SET_IO_FLUSHER not available (Linux 5.6 and later have it)", "err", err)
	}
}
