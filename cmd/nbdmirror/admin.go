package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// adminCommands are the verbs that talk to the daemon.
func (m *Main) adminCommands() []*cli.Command {
	verb := func(name, usage, desc string, flags ...cli.Flag) *cli.Command {
		return &cli.Command{Name: name, Usage: usage, ArgsUsage: "<resource|all>", Description: desc,
			Flags: flags, Action: m.runVerb}
	}
	return []*cli.Command{
		verb("up", "attach the disk (and, with replication, connect to the peer)",
			"Opens the disk and its metadata; after an unclean stop the activity log is applied first (logged)."),
		verb("down", "demote, then detach: the resource stops",
			"Refused while the device is held open (NBD clients connected, or the kernel device mounted)."),
		verb("attach", "open the disk and its metadata", ""),
		verb("detach", "close the disk cleanly (bitmap written, metadata marked clean)",
			"Refused on a Primary: without a peer it would have no data."),
		verb("primary", "promote: the NBD export (and the kernel device, if configured) appears",
			"Needs UpToDate data; --force declares this node's data UpToDate (an Inconsistent or Outdated disk "+
				"becomes the valid copy) and starts a new data generation.",
			&cli.BoolFlag{Name: "force", Usage: "promote even without UpToDate data"}),
		verb("secondary", "demote: the export goes away",
			"Refused while the device is held open; the refusal says by whom."),
		verb("new-current-uuid", "start a new data generation",
			"The bitmap UUID goes to the history, the current UUID becomes the bitmap UUID and a new one is drawn.",
			&cli.BoolFlag{Name: "clear-bitmap", Usage: "also mark every block in sync (the disks are known to be equal)"}),
		verb("invalidate", "discard this node's data: it becomes SyncTarget of a full resync from the peer",
			"Connected: the disk becomes Inconsistent and every block is resynced from the peer (with "+
				"--reset-bitmap=no only the blocks already marked, e.g. by verify). StandAlone: every block is marked "+
				"and the disk is Inconsistent until the next connect resyncs it.", resetBitmapFlag()),
		verb("invalidate-remote", "replace the peer's data with this node's: a full resync to the peer",
			"Needs this node UpToDate and the peer Secondary; --reset-bitmap=no resyncs only the blocks already marked.",
			resetBitmapFlag()),
		verb("connect", "start connecting to the peer (WFConnection)",
			"With --discard-my-data this node's changes lose the next split-brain resolution: it becomes SyncTarget. "+
				"Refused on a Primary.",
			&cli.BoolFlag{Name: "discard-my-data", Usage: "resolve a split brain against this node"}),
		verb("disconnect", "end the connection and stop connecting (StandAlone)", ""),
		verb("verify", "online verify: compare every block with the peer (needs verify-alg)",
			"This node is VerifyS; differing blocks are marked out of sync on both nodes and logged. "+
				"A Primary's disconnect/connect, or invalidate --reset-bitmap=no, then resyncs exactly those. "+
				"Without --start a verify resumes where the last one stopped (at its --stop, or where a lost "+
				"connection interrupted it; from the start after one that reached the end). On a running "+
				"VerifyS, --stop only moves the stop sector.",
			&cli.Uint64Flag{Name: "start", Usage: "begin at `SECTOR` (512 bytes; rounded down to 4 KiB)",
				DefaultText: "where the last verify stopped"},
			&cli.Uint64Flag{Name: "stop", Usage: "end before the first 4 KiB block at or after `SECTOR`",
				DefaultText: "the end of the device"}),
		verb("pause-sync", "hold the resync (flag u)", ""),
		verb("resume-sync", "let a paused resync go on", ""),
		verb("resume-io", "let application I/O go that fencing suspended",
			"With fencing resource-and-stonith a Primary that loses its peer suspends application I/O until "+
				"the fence-peer handler has fenced the peer. If the handler failed, I/O stays suspended until the "+
				"peer is back or this verb is given: make sure first that the peer cannot be promoted."),
		m.resizeCommands()[0],
		m.resizeCommands()[1],
		{Name: "role", Usage: "print the roles (local/peer)", ArgsUsage: "<resource|all>", Action: m.stateVerb},
		{Name: "cstate", Usage: "print the connection state", ArgsUsage: "<resource|all>", Action: m.stateVerb},
		{Name: "dstate", Usage: "print the disk states (local/peer)", ArgsUsage: "<resource|all>", Action: m.stateVerb},
		{Name: "status", Usage: "print the state in DRBD 9's layout (or JSON)", ArgsUsage: "[resource|all]",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "json", Usage: "print JSON (schema in the README)"},
				&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "print every field"},
				&cli.BoolFlag{Name: "statistics", Aliases: []string{"s"}, Usage: "print the counters"},
			}, Action: m.status},
		{Name: "events", Usage: "print state changes as they happen, one JSON object per line",
			ArgsUsage: "[resource|all]",
			Flags:     []cli.Flag{&cli.BoolFlag{Name: "now", Usage: "print the current state first"}},
			Action:    m.events},
		{Name: "wait-connect", Usage: "wait until connected to the peer", ArgsUsage: "<resource|all>",
			Flags:  []cli.Flag{&cli.DurationFlag{Name: "timeout", Usage: "give up after `D` (exit 124); 0 waits forever"}},
			Action: m.wait},
		{Name: "wait-sync", Usage: "wait until no resync runs", ArgsUsage: "<resource|all>",
			Flags:  []cli.Flag{&cli.DurationFlag{Name: "timeout", Usage: "give up after `D` (exit 124); 0 waits forever"}},
			Action: m.wait},
	}
}

func resetBitmapFlag() cli.Flag {
	return &cli.StringFlag{Name: "reset-bitmap", Value: "yes", Usage: "`yes`: every block; no: only the blocks already marked"}
}

// client is the control-socket client of one command.
type client struct {
	sock string
	http *http.Client
}

func (m *Main) client(c *cli.Context) *client {
	sock := filepath.Join(c.String("run-dir"), "control.sock")
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &client{sock: sock, http: &http.Client{Transport: tr}}
}

// do sends one request; the body of a 2xx answer is returned.
func (cl *client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://nbdmirror"+apiVersion+path, rd)
	if err != nil {
		return nil, fail(ExitUsage, err)
	}
	resp, err := cl.http.Do(req)
	if errors.Is(err, unix.EACCES) {
		return nil, failf(ExitFailed, "nbdmirror: permission denied on the control socket %s: only root "+
			"(or the members of the daemon's --control-group) may use it", cl.sock)
	}
	if err != nil {
		return nil, failf(ExitNoDaemon, "nbdmirror: cannot reach the daemon at %s (is 'nbdmirror daemon' running, with the same --run-dir?): %v",
			cl.sock, unwrapURL(err))
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var e errorResponse
		if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Code == 0 {
			return nil, failf(ExitFailed, "nbdmirror: the daemon answered %s", resp.Status)
		}
		return nil, fail(e.Code, errors.New(e.Error))
	}
	return resp, nil
}

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// resArg returns the RES|all argument (optional where allowed).
func resArg(c *cli.Context, optional bool) (string, error) {
	switch {
	case c.NArg() == 1:
		return c.Args().First(), nil
	case c.NArg() == 0 && optional:
		return "all", nil
	}
	return "", failf(ExitUsage, "nbdmirror %s: expected one resource name or all (see 'nbdmirror %s --help')",
		c.Command.Name, c.Command.Name)
}

// results prints each resource's failure on stderr and returns the first
// failure's exit code.
func (m *Main) results(resp *http.Response) error {
	defer resp.Body.Close()
	var vr verbResponse
	if err := json.NewDecoder(resp.Body).Decode(&vr); err != nil {
		return failf(ExitFailed, "nbdmirror: unreadable answer from the daemon: %v", err)
	}
	var first error
	for _, r := range vr.Results {
		if r.Code == 0 {
			if r.Message != "" {
				fmt.Fprintln(m.Stdout, r.Message)
			}
			continue
		}
		if first == nil {
			first = fail(r.Code, errors.New(r.Error))
			continue
		}
		fmt.Fprintln(m.Stderr, r.Error) // Run prints the first
	}
	return first
}

func (m *Main) runVerb(c *cli.Context) error {
	res, err := resArg(c, false)
	if err != nil {
		return err
	}
	o := verbRequest{Force: c.Bool("force"), ClearBitmap: c.Bool("clear-bitmap"), DiscardMyData: c.Bool("discard-my-data"),
		AssumePeerHasSpace: c.Bool("assume-peer-has-space"), AssumeClean: c.Bool("assume-clean"), AllowShrink: c.Bool("allow-shrink")}
	if c.IsSet("size") {
		n, err := parseSize(c.String("size"))
		if err != nil {
			return failf(ExitUsage, "nbdmirror %s: --size %v", c.Command.Name, err)
		}
		o.Size = n
	}
	if o.AllowShrink && o.Size == 0 {
		return failf(ExitUsage, "nbdmirror %s: --allow-shrink needs --size: name the size to shrink to", c.Command.Name)
	}
	if c.IsSet("start") {
		v := c.Uint64("start")
		o.VerifyStart = &v
	}
	if c.IsSet("stop") {
		v := c.Uint64("stop")
		o.VerifyStop = &v
	}
	if o.VerifyStart != nil && o.VerifyStop != nil && *o.VerifyStop <= *o.VerifyStart {
		return failf(ExitUsage, "nbdmirror %s: --stop %d is not past --start %d: nothing to verify", c.Command.Name, *o.VerifyStop, *o.VerifyStart)
	}
	switch rb := c.String("reset-bitmap"); rb {
	case "", "yes":
	case "no":
		o.KeepBitmap = true
	default:
		return failf(ExitUsage, "nbdmirror %s: --reset-bitmap=%s: want yes or no", c.Command.Name, rb)
	}
	resp, err := m.client(c).do(c.Context, http.MethodPost, "/resources/"+url.PathEscape(res)+"/"+c.Command.Name, o)
	if err != nil {
		return err
	}
	return m.results(resp)
}

func (m *Main) statusJSON(c *cli.Context, res string) ([]replicator.StatusJSON, error) {
	resp, err := m.client(c).do(c.Context, http.MethodGet, "/status?res="+url.QueryEscape(res), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []replicator.StatusJSON
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, failf(ExitFailed, "nbdmirror: unreadable answer from the daemon: %v", err)
	}
	return out, nil
}

// stateVerb prints role, cstate or dstate as drbdadm does: one line per
// resource ("Primary/Unknown", "StandAlone", "UpToDate/DUnknown").
func (m *Main) stateVerb(c *cli.Context) error {
	res, err := resArg(c, false)
	if err != nil {
		return err
	}
	st, err := m.statusJSON(c, res)
	if err != nil {
		return err
	}
	for _, s := range st {
		switch c.Command.Name {
		case "role":
			fmt.Fprintf(m.Stdout, "%s/%s\n", s.Role, s.PeerRole)
		case "cstate":
			fmt.Fprintln(m.Stdout, s.CState)
		case "dstate":
			fmt.Fprintf(m.Stdout, "%s/%s\n", s.Disk, s.PeerDisk)
		}
	}
	return nil
}

func (m *Main) status(c *cli.Context) error {
	res, err := resArg(c, true)
	if err != nil {
		return err
	}
	q := url.Values{"res": {res}, "format": {"text"}}
	if c.Bool("json") {
		q.Set("format", "json")
	}
	if c.Bool("verbose") {
		q.Set("verbose", "1")
	}
	if c.Bool("statistics") {
		q.Set("statistics", "1")
	}
	resp, err := m.client(c).do(c.Context, http.MethodGet, "/status?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if c.Bool("json") { // re-indent for people; programs parse either
		var v any
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			return failf(ExitFailed, "nbdmirror: unreadable answer from the daemon: %v", err)
		}
		b, _ := json.MarshalIndent(v, "", "  ")
		_, err = fmt.Fprintf(m.Stdout, "%s\n", b)
		return err
	}
	_, err = io.Copy(m.Stdout, resp.Body)
	return err
}

func (m *Main) events(c *cli.Context) error {
	res, err := resArg(c, true)
	if err != nil {
		return err
	}
	q := url.Values{"res": {res}}
	if c.Bool("now") {
		q.Set("now", "1")
	}
	resp, err := m.client(c).do(c.Context, http.MethodGet, "/events?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if bytes.HasPrefix(sc.Bytes(), []byte(`{"event":"overflow"`)) {
			return failf(ExitFailed, "nbdmirror events: fell behind the daemon's events; run 'nbdmirror events --now' again")
		}
		if _, err := fmt.Fprintf(m.Stdout, "%s\n", sc.Bytes()); err != nil {
			return nil // the reader went away
		}
	}
	if c.Context.Err() == nil {
		return failf(ExitNoDaemon, "nbdmirror events: the daemon closed the stream (stopped?)")
	}
	return nil
}

func (m *Main) wait(c *cli.Context) error {
	res, err := resArg(c, false)
	if err != nil {
		return err
	}
	what := strings.TrimPrefix(c.Command.Name, "wait-")
	q := url.Values{"res": {res}, "for": {what}}
	if d := c.Duration("timeout"); d > 0 {
		q.Set("timeout", d.String())
	} else if d < 0 {
		return failf(ExitUsage, "nbdmirror %s: --timeout must not be negative", c.Command.Name)
	}
	if what == "sync" {
		stop := m.showProgress(c, res)
		defer stop()
	}
	resp, err := m.client(c).do(c.Context, http.MethodGet, "/wait?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	return m.results(resp)
}

// showProgress prints the resync progress of res while wait-sync waits:
// on a terminal one line redrawn every second with a bar, otherwise a
// plain line every 5 seconds. The returned stop ends it.
func (m *Main) showProgress(c *cli.Context, res string) (stop func()) {
	tty := isTerminal(m.Stdout)
	every := 5 * time.Second
	if tty {
		every = time.Second
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		drawn := false
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				if drawn {
					fmt.Fprintln(m.Stdout)
				}
				return
			case <-t.C:
			}
			st, err := m.statusJSON(c, res)
			if err != nil {
				continue
			}
			for _, s := range st {
				if s.Resync == nil {
					continue
				}
				line := progressLine(s)
				if tty {
					fmt.Fprintf(m.Stdout, "\r%s\x1b[K", line)
					drawn = true
				} else {
					fmt.Fprintln(m.Stdout, line)
				}
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// progressLine is "r0 SyncTarget [=====>..............] 27.5% 93 MiB left
// at 41.2 MiB/s, finish 0:00:02".
func progressLine(s replicator.StatusJSON) string {
	r := s.Resync
	const width = 20
	n := int(r.Percent / 100 * width)
	bar := strings.Repeat("=", n) + ">" + strings.Repeat(".", width-n)
	finish := "∞"
	if r.SpeedBytesPerSecond > 0 {
		e := r.ETASeconds
		finish = fmt.Sprintf("%d:%02d:%02d", e/3600, e%3600/60, e%60)
	}
	return fmt.Sprintf("%s %s [%s] %.1f%% %.1f MiB left at %.1f MiB/s, finish %s", s.Name, s.CState, bar[:width+1],
		r.Percent, float64(r.RemainingBytes)/(1<<20), float64(r.SpeedBytesPerSecond)/(1<<20), finish)
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
