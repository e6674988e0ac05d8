// Command benchserve is `nbdmirror serve` with latency injected into the
// backend, for `make bench`: it shows how the NBD front end scales with
// iodepth when every backend call waits, as a replicated backend does.
//
//	benchserve --file disk.img --listen 127.0.0.1:10850 --delay 1ms
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/nbd"
)

// slowDisk delays every read and write by a fixed time. It sleeps with
// nanosleep(2) on the calling thread, as nbdkit's delay filter does, because
// a Go timer (time.Sleep) rounds up to the netpoller's millisecond ticks and
// would inject 1-2 ms instead of 1 ms.
type slowDisk struct {
	*blockdev.Device
	delay unix.Timespec
}

func (d slowDisk) sleep() {
	ts := d.delay
	for unix.Nanosleep(&ts, &ts) == unix.EINTR {
	}
}

func (d slowDisk) ReadAt(p []byte, off int64) (int, error) {
	d.sleep()
	return d.Device.ReadAt(p, off)
}

func (d slowDisk) WriteAt(p []byte, off int64, fua bool) error {
	d.sleep()
	return d.Device.WriteAt(p, off, fua)
}

func main() {
	file := flag.String("file", "", "file to export")
	addr := flag.String("listen", "127.0.0.1:10850", "TCP address")
	delay := flag.Duration("delay", time.Millisecond, "latency added to every read and write")
	flag.Parse()
	if err := run(*file, *addr, *delay); err != nil {
		fmt.Fprintln(os.Stderr, "benchserve:", err)
		os.Exit(1)
	}
}

func run(file, addr string, delay time.Duration) error {
	dev, err := blockdev.Open(file, false)
	if err != nil {
		return err
	}
	defer dev.Close()
	var cat nbd.Exports
	cat.Default = "test"
	if err := cat.Add(&nbd.Export{Name: "test", Backend: slowDisk{dev, unix.NsecToTimespec(delay.Nanoseconds())}, MultiConn: true}); err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &nbd.Server{Catalog: &cat, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	<-errc
	return nil
}
