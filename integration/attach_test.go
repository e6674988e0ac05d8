//go:build integration

package integration

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/nbd"
)

// countingDisk counts the flushes and FUA writes that reach the backend.
type countingDisk struct {
	*blockdev.Device
	flushes, fua atomic.Int64
}

func (d *countingDisk) Flush() error { d.flushes.Add(1); return d.Device.Flush() }

func (d *countingDisk) WriteAt(p []byte, off int64, fua bool) error {
	if fua {
		d.fua.Add(1)
	}
	return d.Device.WriteAt(p, off, fua)
}

// TestAttach_Kernel serves /dev/nbd0 with nbd.Attach: O_DIRECT writes and
// reads through the kernel client land in the backing file, fsync reaches
// the backend as a FLUSH (NBD_SET_FLAGS was given), and Detach frees the
// device. This machine kind may have no nbd module: that, and only that,
// makes the test skip, saying so.
func TestAttach_Kernel(t *testing.T) {
	needRoot(t)
	const dev = "/dev/nbd0"
	if _, err := os.Stat(dev); err != nil {
		exec.Command("modprobe", "nbd").Run()
	}
	if _, err := os.Stat(dev); err != nil {
		t.Skipf("skipped: this kernel has no nbd module (%s missing after 'modprobe nbd'); "+
			"kernel attach is tested only where /dev/nbdN exists", dev)
	}
	img := sparseFile(t, t.TempDir(), "disk.img", 64*mib)
	bd, err := blockdev.Open(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer bd.Close()
	disk := &countingDisk{Device: bd}
	exp := &nbd.Export{Name: "k", Backend: disk, MultiConn: true}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	a, err := nbd.Attach(dev, exp, nbd.AttachOptions{Logger: log, Timeout: 30 * time.Second})
	if errors.Is(err, nbd.ErrNoKernelNBD) {
		t.Skipf("skipped: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	detached := false
	defer func() {
		if !detached {
			a.Detach(context.Background())
		}
	}()
	if a.Flags()&(nbd.FlagSendFlush|nbd.FlagSendFUA|nbd.FlagSendTrim) != nbd.FlagSendFlush|nbd.FlagSendFUA|nbd.FlagSendTrim {
		t.Fatalf("flags given to the kernel: %#x", a.Flags())
	}

	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(t, mib)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	if _, err := f.WriteAt(buf, 8*mib); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if disk.flushes.Load() == 0 {
		t.Error("fsync on the device sent no FLUSH to the backend")
	}
	back := alignedBuf(t, mib)
	if _, err := f.ReadAt(back, 8*mib); err != nil || !bytes.Equal(back, buf) {
		t.Fatalf("read back through the device: %v", err)
	}
	f.Close()
	onDisk := make([]byte, mib)
	if _, err := bd.ReadAt(onDisk, 8*mib); err != nil || !bytes.Equal(onDisk, buf) {
		t.Fatalf("the backing file does not hold the write: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	detached = true
	// The device is free again: a second attach succeeds.
	a2, err := nbd.Attach(dev, exp, nbd.AttachOptions{Logger: log})
	if err != nil {
		t.Fatalf("re-attach after detach: %v", err)
	}
	if err := a2.Detach(ctx); err != nil {
		t.Fatal(err)
	}
}

// alignedBuf returns a page-aligned buffer for O_DIRECT.
func alignedBuf(t *testing.T, n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}
