// Command nbdmirror is a DRBD-style block replicator in user space: a daemon
// per node serves the local disk over NBD and replicates every write to a
// peer. This file holds the command-line skeleton shared by every verb:
// global flags, logging, and the mapping of errors to exit codes.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// Version is set at build time with -ldflags "-X main.Version=…".
var Version = ""

// Exit codes, as drbdadm's where they exist (README "Exit codes").
const (
	ExitOK             = 0
	ExitUsage          = 1
	ExitFailed         = 3
	ExitConfigInvalid  = 10
	ExitNoDaemon       = 11
	ExitNoUpToDateData = 17
	ExitRefused        = 20
	ExitTimeout        = 124
)

// exitError carries an exit code with the one-line message printed for it.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// fail wraps err with an exit code.
func fail(code int, err error) error { return &exitError{code: code, err: err} }

// failf formats a message and wraps it with an exit code.
func failf(code int, format string, args ...any) error {
	return fail(code, fmt.Errorf(format, args...))
}

// Main is the program with its environment, so tests run it in-process.
type Main struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	// Ready, if set, is called once `daemon` serves (after READY=1 would
	// be sent), so an in-process caller can wait for it.
	Ready func()
}

func main() {
	m := &Main{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}
	setProcs(m.Getenv)
	os.Exit(m.Run(context.Background(), os.Args))
}

// setProcs leaves one CPU to the NBD client and the application whose I/O
// nbdmirror serves, which run on the same machine: unless GOMAXPROCS is set,
// the runtime uses one processor fewer than it would by default (at least
// one). On a 2-CPU machine where the client is busy, one processor serves
// more requests than two: there is no cross-CPU handoff to pay for
// (BENCHMARKS.md).
func setProcs(getenv func(string) string) {
	if getenv("GOMAXPROCS") != "" {
		return
	}
	if n := runtime.GOMAXPROCS(0); n > 1 {
		runtime.GOMAXPROCS(n - 1)
	}
}

func version() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// Run runs one command line and returns the exit code.
func (m *Main) Run(ctx context.Context, args []string) int {
	app := m.app()
	err := app.RunContext(ctx, args)
	if err == nil {
		return ExitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		fmt.Fprintf(m.Stderr, "%s\n", firstLine(ee.err.Error()))
		return ee.code
	}
	// Anything else comes from parsing the command line.
	fmt.Fprintf(m.Stderr, "nbdmirror: %s (see 'nbdmirror help')\n", firstLine(err.Error()))
	return ExitUsage
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func (m *Main) app() *cli.App {
	return &cli.App{
		Name:    "nbdmirror",
		Usage:   "replicate a block device to a peer, the way DRBD does, in user space",
		Version: version(),
		Writer:  m.Stdout, ErrWriter: m.Stderr,
		HideHelpCommand: false,
		Suggest:         true,
		ExitErrHandler:  func(*cli.Context, error) {}, // Run maps errors to codes
		OnUsageError:    usageError,
		Flags:           m.globalFlags(),
		Commands: commands(append(append([]*cli.Command{
			m.serveCommand(), m.daemonCommand(),
		}, m.adminCommands()...), append(append(m.offlineCommands(), m.ocfCommand()), m.installCommands()...)...)...),
	}
}

// commands makes every command report usage errors in one line instead of
// printing its whole help.
func commands(cmds ...*cli.Command) []*cli.Command {
	for _, c := range cmds {
		c.OnUsageError = usageError
	}
	return cmds
}

func usageError(c *cli.Context, err error, _ bool) error {
	name := "nbdmirror"
	if c.Command != nil && c.Command.Name != "" && c.Command.Name != name {
		name += " " + c.Command.Name
	}
	return failf(ExitUsage, "%s: %v (see '%s --help')", name, err, name)
}

// required returns the value of a string flag that must be given.
func required(c *cli.Context, flag string) (string, error) {
	v := c.String(flag)
	if v == "" {
		return "", failf(ExitUsage, "nbdmirror %s: --%s is required (see 'nbdmirror %s --help')",
			c.Command.Name, flag, c.Command.Name)
	}
	return v, nil
}

// globalFlags are accepted before any verb; each has an environment variable.
func (m *Main) globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "config", Aliases: []string{"c"}, EnvVars: []string{"NBDMIRROR_CONFIG"},
			Value: "/etc/nbdmirror/nbdmirror.conf", Usage: "configuration `FILE` (drbd.conf syntax)"},
		&cli.StringFlag{Name: "node", EnvVars: []string{"NBDMIRROR_NODE"},
			Usage: "this node's `NAME` (selects the 'on NAME' sections; default: the host name)"},
		&cli.StringFlag{Name: "run-dir", EnvVars: []string{"NBDMIRROR_RUN_DIR"}, Value: "/run/nbdmirror",
			Usage: "`DIR` for the control socket, status file and default NBD socket"},
		&cli.StringFlag{Name: "log-level", EnvVars: []string{"NBDMIRROR_LOG_LEVEL"}, Value: "info",
			Usage: "log `LEVEL`: debug, info, warn or error"},
		&cli.StringFlag{Name: "log-format", EnvVars: []string{"NBDMIRROR_LOG_FORMAT"}, Value: "text",
			Usage: "log `FORMAT`: text or json"},
	}
}

// logger builds the process logger from the global flags; logs go to stderr.
func (m *Main) logger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, failf(ExitUsage, "nbdmirror: --log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(m.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(m.Stderr, opts)), nil
	}
	return nil, failf(ExitUsage, "nbdmirror: --log-format %q: want text or json", c.String("log-format"))
}
