package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdmirror/nbdmirror/blockdev"
	"github.com/nbdmirror/nbdmirror/nbd"
)

// shutdownGrace bounds a graceful stop before it turns into a hard one.
const shutdownGrace = 30 * time.Second

func (m *Main) serveCommand() *cli.Command {
	return &cli.Command{
		Name:      "serve",
		Usage:     "export a file or block device over NBD, without replication (like qemu-nbd)",
		ArgsUsage: " ",
		Description: "Serves one file or block device as an NBD export until SIGINT or SIGTERM, " +
			"with FLUSH, FUA, TRIM and WRITE_ZEROES. A first signal finishes the requests in flight, " +
			"flushes and exits; a second one exits at once.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "file", Aliases: []string{"f"},
				Usage: "the regular file or block device to export (required)"},
			&cli.StringSliceFlag{Name: "listen", Aliases: []string{"l"}, Value: cli.NewStringSlice("localhost:10809"),
				Usage: "listen on `ADDR`: unix:PATH or HOST:PORT (repeatable)"},
			&cli.StringFlag{Name: "export", Aliases: []string{"x"},
				Usage: "export `NAME` (default: the file's base name; the empty name also selects it)"},
			&cli.StringFlag{Name: "description", Usage: "export description shown to clients"},
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "refuse writes, trims and zeroing"},
		}, nbdLimitFlags()...),
		Action: m.serve,
	}
}

func (m *Main) serve(c *cli.Context) error {
	if c.NArg() > 0 {
		return failf(ExitUsage, "nbdmirror serve: unexpected argument %q (the file is given with --file)", c.Args().First())
	}
	file, err := required(c, "file")
	if err != nil {
		return err
	}
	log, err := m.logger(c)
	if err != nil {
		return err
	}
	srv := &nbd.Server{Logger: log}
	if err := nbdLimits(c, srv); err != nil {
		return err
	}
	dev, err := blockdev.Open(file, c.Bool("read-only"))
	if err != nil {
		return failf(ExitFailed, "nbdmirror serve: %v", err)
	}
	defer dev.Close()
	name := c.String("export")
	if name == "" {
		name = filepath.Base(file)
	}
	exp := &nbd.Export{Name: name, Description: c.String("description"), Backend: dev,
		ReadOnly: c.Bool("read-only"), MultiConn: true}
	var cat nbd.Exports
	cat.Default = name
	if err := cat.Add(exp); err != nil {
		return failf(ExitUsage, "nbdmirror serve: %v", err)
	}
	var listeners []net.Listener
	for _, a := range c.StringSlice("listen") {
		l, err := listen(a)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return failf(ExitFailed, "nbdmirror serve: %v", err)
		}
		listeners = append(listeners, l)
	}
	srv.Catalog = &cat
	return m.runServer(c.Context, log, srv, listeners, slog.String("export", name),
		slog.String("file", dev.Path()), slog.Int64("size", dev.Size()), slog.Bool("read_only", exp.ReadOnly))
}

// runServer serves on every listener until a signal: the first one shuts
// down gracefully, a second one (or the grace period) closes at once.
func (m *Main) runServer(ctx context.Context, log *slog.Logger, srv *nbd.Server, ls []net.Listener, attrs ...any) error {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	errc := make(chan error, len(ls))
	var wg sync.WaitGroup
	addrs := make([]string, 0, len(ls))
	for _, l := range ls {
		addrs = append(addrs, l.Addr().Network()+":"+l.Addr().String())
		wg.Go(func() { errc <- srv.Serve(l) })
	}
	log.Info("serving", append(attrs, "listen", strings.Join(addrs, ","))...)

	var serveErr error
	select {
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String())
	case <-ctx.Done():
	case serveErr = <-errc:
		log.Error("listener failed; shutting down", "err", serveErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	stopWatch := make(chan struct{})
	wg.Go(func() {
		select {
		case sig := <-sigs:
			log.Warn("second signal: stopping at once", "signal", sig.String())
			cancel()
		case <-stopWatch:
		}
	})
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("graceful shutdown cut short", "err", err)
	}
	close(stopWatch)
	wg.Wait()
	if serveErr != nil && !errors.Is(serveErr, nbd.ErrServerClosed) {
		return failf(ExitFailed, "nbdmirror serve: %v", serveErr)
	}
	log.Info("stopped")
	return nil
}

// nbdLimitFlags are the NBD server's limits an admin may tune (serve and
// daemon).
func nbdLimitFlags() []cli.Flag {
	return []cli.Flag{
		&cli.IntFlag{Name: "nbd-max-conns", EnvVars: []string{"NBDMIRROR_NBD_MAX_CONNS"}, Value: nbd.DefaultMaxConns,
			Usage: "at most `N` NBD connections; at the limit a new one replaces the oldest one still negotiating after a quarter of --nbd-handshake-timeout"},
		&cli.DurationFlag{Name: "nbd-handshake-timeout", EnvVars: []string{"NBDMIRROR_NBD_HANDSHAKE_TIMEOUT"},
			Value: nbd.DefaultHandshakeTimeout, Usage: "drop an NBD client that has not finished negotiating after `D`"},
		&cli.StringFlag{Name: "nbd-max-in-flight", EnvVars: []string{"NBDMIRROR_NBD_MAX_IN_FLIGHT"}, Value: "1G",
			Usage: "stop reading NBD requests while `SIZE` of payload is in flight over all connections (beyond 256 KiB each)"},
	}
}

// nbdLimits applies nbdLimitFlags to srv.
func nbdLimits(c *cli.Context, srv *nbd.Server) error {
	n, d := c.Int("nbd-max-conns"), c.Duration("nbd-handshake-timeout")
	if n < 1 {
		return failf(ExitUsage, "nbdmirror %s: --nbd-max-conns %d: want at least 1", c.Command.Name, n)
	}
	if d <= 0 {
		return failf(ExitUsage, "nbdmirror %s: --nbd-handshake-timeout %v: want a positive duration such as 10s", c.Command.Name, d)
	}
	total, err := parseSize(c.String("nbd-max-in-flight"))
	if err != nil {
		return failf(ExitUsage, "nbdmirror %s: --nbd-max-in-flight %v", c.Command.Name, err)
	}
	srv.MaxConns, srv.HandshakeTimeout, srv.MaxTotalInFlightBytes = n, d, total
	return nil
}
