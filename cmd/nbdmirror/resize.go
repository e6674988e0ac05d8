package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/nbdmirror/nbdmirror/replicator"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// resizeCommands are resize and adjust, whose success prints a report.
func (m *Main) resizeCommands() []*cli.Command {
	return []*cli.Command{
		{Name: "resize", Usage: "grow the device after both backing disks grew (on the Primary)",
			ArgsUsage: "<resource|all>", Action: m.runVerb,
			Description: "Asks the peer how much its disk holds, agrees the smaller of both disks (or --size), grows " +
				"the metadata on both nodes (internal metadata moves to the new end), and resyncs the new area from " +
				"the Primary. Disconnected, only with --assume-peer-has-space: the peer takes the size at its next " +
				"connect, or refuses it if its disk is too small (a node holding data is never cut at a connect). NBD clients see the new size when they reconnect. " +
				"Shrinking needs --size and --allow-shrink and is refused below an ext2/3/4 filesystem.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "size", Usage: "the new size `SIZE`, with a unit: K, M, G, T (powers of 1024) or s (sectors)",
					DefaultText: "the most both disks hold"},
				&cli.BoolFlag{Name: "assume-peer-has-space", Usage: "grow without a connected peer"},
				&cli.BoolFlag{Name: "assume-clean", Usage: "do not resync the grown area (both disks hold the same there); a connected resize only"},
				&cli.BoolFlag{Name: "allow-shrink", Usage: "allow --size below the current size"},
			}},
		{Name: "adjust", Usage: "apply the changes of the configuration file that can change while running",
			ArgsUsage: "<resource|all>", Action: m.runVerb,
			Description: "Re-reads the configuration file and prints, for each changed key, when it takes effect: at " +
				"once (resync-rate, on-congestion and its limits unless they need a key waiting for down/up, handlers), " +
				"from the next resync (the resync controller's c-* keys), at the next connect " +
				"(shared-secret, timeouts, compression, TLS files: 'disconnect' then 'connect'), or at the next " +
				"'up' after a 'down' (everything else; at once if the resource is down); 'device' needs a daemon restart."},
	}
}

// parseSize reads --size: a whole number with a unit (K, M, G, T: powers
// of 1024, either case; s: 512-byte sectors).
func parseSize(s string) (int64, error) {
	units := map[byte]int64{'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30, 't': 1 << 40, 's': 512}
	if s == "" {
		return 0, errors.New("empty")
	}
	unit, ok := units[strings.ToLower(s[len(s)-1:])[0]]
	if !ok {
		return 0, fmt.Errorf("%q has no unit: give one of K, M, G, T or s (sectors), e.g. 10G", s)
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/unit {
		return 0, fmt.Errorf("%q: expected a positive whole number before the unit, e.g. 10G", s)
	}
	if n*unit%4096 != 0 {
		return 0, fmt.Errorf("%q is not a multiple of 4 KiB", s)
	}
	return n * unit, nil
}

// messageVerbs are the admin verbs whose success says something.
var messageVerbs = map[string]func(d *daemon, r *resource, o verbRequest) (string, error){
	"resize": func(d *daemon, r *resource, o verbRequest) (string, error) {
		return r.Resize(replicator.ResizeOptions{Size: o.Size, AssumePeerHasSpace: o.AssumePeerHasSpace,
			AssumeClean: o.AssumeClean, AllowShrink: o.AllowShrink})
	},
	"adjust": func(d *daemon, r *resource, _ verbRequest) (string, error) {
		cfg, err := config.Load(d.cfg.Files[0])
		if err != nil {
			return "", fmt.Errorf("%s: adjust: %w", r.Name(), err)
		}
		var nc *config.Resource
		for _, rc := range cfg.Resources {
			if rc.Name == r.Name() {
				nc = rc
			}
		}
		if nc == nil {
			return "", fmt.Errorf("%s: adjust: no longer in %s: removing a resource needs a daemon restart", r.Name(), d.cfg.Files[0])
		}
		rep, err := r.Adjust(nc)
		if err != nil {
			return "", err
		}
		return strings.Join(rep.Lines(r.Name()), "\n"), nil
	},
}
