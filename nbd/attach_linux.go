//go:build linux

package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// Kernel NBD ioctls, _IO(0xab, n) from <linux/nbd.h>. They carry no size in
// their number, so they are the same on every architecture.
const (
	ioctlSetSock       = 0xab00
	ioctlSetBlkSize    = 0xab01
	ioctlDoIt          = 0xab03
	ioctlClearSock     = 0xab04
	ioctlClearQue      = 0xab05
	ioctlSetSizeBlocks = 0xab07
	ioctlDisconnect    = 0xab08
	ioctlSetTimeout    = 0xab09
	ioctlSetFlags      = 0xab0a
)

// ErrNoKernelNBD is returned by Attach when the device node does not exist,
// which on Linux means the nbd module is not loaded (modprobe nbd).
var ErrNoKernelNBD = errors.New("nbd: kernel NBD device not present (is the nbd module loaded?)")

// AttachOptions tune Attach; the zero value is usable.
type AttachOptions struct {
	Logger *slog.Logger
	// BlockSize is given to NBD_SET_BLKSIZE: 512, 1024, 2048 or 4096
	// (default 4096). The export size must be a multiple of it.
	BlockSize uint32
	// Timeout is given to NBD_SET_TIMEOUT: a request unanswered for this
	// long fails in the kernel. Zero leaves the kernel's default.
	Timeout time.Duration
}

// Attachment is a kernel /dev/nbdN device served by this process over a
// socketpair, in the transmission phase only (the ioctls replace the
// handshake).
type Attachment struct {
	path  string
	dev   *os.File
	sock  *os.File // the kernel's end, kept open until detach
	srv   *Server
	doIt  chan error // NBD_DO_IT's result, once it returns
	log   *slog.Logger
	flags uint16
}

// detachWait bounds how long a forced Detach waits for NBD_DO_IT to return.
const detachWait = 10 * time.Second

// Attach connects the kernel device at devicePath to exp. The device must be
// free (no other client attached). The flags set with NBD_SET_FLAGS include
// SEND_FLUSH, SEND_FUA and SEND_TRIM, so the kernel passes flushes, FUA
// writes and discards on to the export.
func Attach(devicePath string, exp *Export, opts AttachOptions) (*Attachment, error) {
	if err := exp.validate(); err != nil {
		return nil, err
	}
	bs := opts.BlockSize
	if bs == 0 {
		bs = 4096
	}
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("nbd: block size %d: want 512, 1024, 2048 or 4096", bs)
	}
	size := exp.Backend.Size()
	if size%int64(bs) != 0 {
		return nil, fmt.Errorf("nbd: export size %d is not a multiple of the block size %d", size, bs)
	}
	dev, err := os.OpenFile(devicePath, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNoKernelNBD, devicePath)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", devicePath, err)
	}
	a := &Attachment{path: devicePath, dev: dev, doIt: make(chan error, 1), flags: exp.Flags()}
	a.srv = &Server{Logger: opts.Logger}
	a.srv.init()
	a.log = a.srv.log.With("device", devicePath)
	if err := a.setup(exp, bs, opts.Timeout); err != nil {
		a.ioctl(ioctlClearSock, 0)
		a.closeFiles()
		a.srv.Close()
		return nil, err
	}
	go a.run()
	a.log.Info("kernel nbd device attached", "export", exp.Name, "size", size, "flags", a.flags)
	return a, nil
}

func (a *Attachment) setup(exp *Export, bs uint32, timeout time.Duration) error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socketpair: %w", err)
	}
	a.sock = os.NewFile(uintptr(fds[1]), "nbd-kernel")
	srvFile := os.NewFile(uintptr(fds[0]), "nbd-server")
	nc, err := net.FileConn(srvFile)
	srvFile.Close()
	if err != nil {
		return fmt.Errorf("socketpair conn: %w", err)
	}
	steps := []struct {
		name string
		req  uint
		arg  uintptr
	}{
		{"NBD_SET_BLKSIZE", ioctlSetBlkSize, uintptr(bs)},
		{"NBD_SET_SIZE_BLOCKS", ioctlSetSizeBlocks, uintptr(exp.Backend.Size() / int64(bs))},
		{"NBD_SET_FLAGS", ioctlSetFlags, uintptr(a.flags)},
		{"NBD_SET_TIMEOUT", ioctlSetTimeout, uintptr(timeout / time.Second)},
		{"NBD_SET_SOCK", ioctlSetSock, a.sock.Fd()},
	}
	for _, st := range steps {
		if st.req == ioctlSetTimeout && timeout <= 0 {
			continue
		}
		if err := a.ioctl(st.req, st.arg); err != nil {
			nc.Close()
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("%s: %s is already in use by another client: %w", st.name, a.path, err)
			}
			return fmt.Errorf("%s on %s: %w", st.name, a.path, err)
		}
	}
	if a.srv.startConn(nc, exp) == nil {
		return ErrServerClosed
	}
	return nil
}

// run blocks in NBD_DO_IT until the device is disconnected.
func (a *Attachment) run() {
	runtime.LockOSThread() // the ioctl holds the thread for the device's lifetime
	defer runtime.UnlockOSThread()
	err := a.ioctl(ioctlDoIt, 0)
	a.ioctl(ioctlClearQue, 0)
	a.ioctl(ioctlClearSock, 0)
	a.doIt <- err
}

func (a *Attachment) ioctl(req uint, arg uintptr) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, a.dev.Fd(), uintptr(req), arg)
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return e
	}
}

// Path returns the device path.
func (a *Attachment) Path() string { return a.path }

// Flags returns the transmission flags given to the kernel.
func (a *Attachment) Flags() uint16 { return a.flags }

// Detach disconnects the device gracefully: the kernel sends NBD_CMD_DISC,
// the server finishes the requests in flight and flushes the export, and the
// device becomes free. If ctx ends first the connection is closed hard.
// Detaching a device that is mounted or held open fails its later I/O, so
// callers check that first.
func (a *Attachment) Detach(ctx context.Context) error {
	var errs []error
	if err := a.ioctl(ioctlDisconnect, 0); err != nil {
		errs = append(errs, fmt.Errorf("NBD_DISCONNECT on %s: %w", a.path, err))
	}
	returned := false
	select {
	case err := <-a.doIt:
		returned = true
		if err != nil && !errors.Is(err, unix.EBUSY) {
			a.log.Debug("NBD_DO_IT returned", "err", err)
		}
	case <-ctx.Done():
		// The kernel holds its own reference to the socket, so closing
		// our descriptor would not end NBD_DO_IT; shutting the socket
		// down does.
		unix.Shutdown(int(a.sock.Fd()), unix.SHUT_RDWR)
		errs = append(errs, ctx.Err())
	}
	if err := a.srv.Shutdown(ctx); err != nil {
		errs = append(errs, err)
	}
	if !returned {
		// run still uses the device descriptor: wait for it before
		// closing, and leave the files open if the kernel never lets go.
		select {
		case <-a.doIt:
		case <-time.After(detachWait):
			errs = append(errs, fmt.Errorf("NBD_DO_IT on %s did not return within %v; the device stays open", a.path, detachWait))
			return errors.Join(errs...)
		}
	}
	a.closeFiles()
	a.log.Info("kernel nbd device detached")
	return errors.Join(errs...)
}

func (a *Attachment) closeFiles() {
	if a.sock != nil {
		a.sock.Close()
	}
	a.dev.Close()
}
