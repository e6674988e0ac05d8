package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// loadConfig reads --config and returns it with this node's name; ignored
// DRBD keywords are reported on stderr.
func (m *Main) loadConfig(c *cli.Context) (*config.Config, string, error) {
	cfg, err := config.Load(c.String("config"))
	if err != nil {
		return nil, "", fail(ExitConfigInvalid, err)
	}
	for _, w := range cfg.Warnings {
		fmt.Fprintf(m.Stderr, "nbdmirror: warning: %s\n", w)
	}
	node := c.String("node")
	if node == "" {
		if node, err = os.Hostname(); err != nil {
			return nil, "", failf(ExitConfigInvalid, "nbdmirror: cannot read the host name (%v): set --node", err)
		}
	}
	return cfg, node, nil
}

// resources resolves the RES|all argument of a verb.
func resources(c *cli.Context, cfg *config.Config, allowMany bool) ([]*config.Resource, error) {
	verb := c.Command.Name
	if c.NArg() != 1 {
		return nil, failf(ExitUsage, "nbdmirror %s: expected one resource name or all (see 'nbdmirror %s --help')", verb, verb)
	}
	name := c.Args().First()
	if name == "all" {
		if !allowMany {
			return nil, failf(ExitUsage, "nbdmirror %s: name one resource, not all", verb)
		}
		if len(cfg.Resources) == 0 {
			return nil, failf(ExitConfigInvalid, "nbdmirror %s: %s defines no resource", verb, cfg.Files[0])
		}
		return cfg.Resources, nil
	}
	r, err := cfg.Resource(name)
	if err != nil {
		return nil, fail(ExitConfigInvalid, err)
	}
	return []*config.Resource{r}, nil
}

// metaErr maps an error of opening or using metadata to an exit code and
// a one-line message naming the resource, the device (when known) and the
// remedy.
func metaErr(res string, dev *replicator.MetaDevice, err error) error {
	code := ExitFailed
	switch {
	case errors.Is(err, metadisk.ErrExists), errors.Is(err, replicator.ErrInUse):
		code = ExitRefused
	}
	msg := err.Error()
	switch {
	case errors.Is(err, metadisk.ErrExists):
		msg += ": use --force to overwrite it (the data will need a full resync)"
	case errors.Is(err, metadisk.ErrNoMetadata):
		msg = fmt.Sprintf("no nbdmirror metadata found: create it with 'nbdmirror create-md %s'", res)
	case errors.Is(err, metadisk.ErrCorrupt):
		msg += fmt.Sprintf(": the metadata cannot be trusted; restore it, or re-create it with 'nbdmirror create-md --force %s' (full resync)", res)
	case errors.Is(err, metadisk.ErrMismatch):
		msg += fmt.Sprintf(": restore the disk's previous size, or re-create the metadata with 'nbdmirror create-md --force %s' (full resync)", res)
	}
	if dev != nil {
		return fail(code, fmt.Errorf("%s: metadata %s on %s: %s", res, dev.Spec, dev.Path, msg))
	}
	return fail(code, fmt.Errorf("%s: %s", res, msg))
}

func (m *Main) offlineCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "create-md",
			Usage:     "write fresh metadata for a resource (no daemon needed)",
			ArgsUsage: "<resource|all>",
			Description: "Writes the superblock (UUID current = 4, \"just created\"), an empty activity log and an " +
				"empty bitmap where meta-disk says. Refuses to overwrite valid metadata unless --force is given.",
			Flags:  []cli.Flag{&cli.BoolFlag{Name: "force", Usage: "overwrite valid metadata (a full resync follows)"}},
			Action: m.createMD,
		},
		{
			Name:        "dump-md",
			Usage:       "print a resource's metadata: UUIDs, flags, sizes, activity log, out-of-sync blocks",
			ArgsUsage:   "<resource>",
			Description: "Reads the metadata without changing it; the resource must not be in use by a daemon.",
			Flags:       []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON (schema version 1)"}},
			Action:      m.dumpMD,
		},
		{
			Name:      "apply-al",
			Usage:     "fold the activity log into the bitmap after an unclean stop",
			ArgsUsage: "<resource|all>",
			Description: "After a crash, marks every block of the extents in the activity log as out of sync, " +
				"writes the bitmap and leaves the metadata clean. Does nothing to clean metadata.",
			Action: m.applyAL,
		},
		{
			Name:      "dump",
			Usage:     "print the configuration as read, with every inherited and default value",
			ArgsUsage: "[resource|all]",
			Action:    m.dumpConfig,
		},
	}
}

// eachResource runs f for the resources named by the verb's argument
// (RES, or all when allowMany), with this node's name.
func (m *Main) eachResource(c *cli.Context, allowMany bool, f func(r *config.Resource, node string) error) error {
	cfg, node, err := m.loadConfig(c)
	if err != nil {
		return err
	}
	rs, err := resources(c, cfg, allowMany)
	if err != nil {
		return err
	}
	for _, r := range rs {
		if err := f(r, node); err != nil {
			return err
		}
	}
	return nil
}

// openDevice opens (and locks) a resource's metadata device on this node.
func openDevice(r *config.Resource, node string, write bool) (*replicator.MetaDevice, error) {
	host, err := r.Host(node)
	if err != nil {
		return nil, fail(ExitConfigInvalid, err)
	}
	dev, err := replicator.OpenMetaDevice(host, write)
	if err != nil {
		return nil, metaErr(r.Name, nil, err)
	}
	return dev, nil
}

// openMeta opens a resource's metadata on this node.
func openMeta(r *config.Resource, node string, write bool) (*replicator.MetaDevice, *metadisk.Meta, error) {
	dev, err := openDevice(r, node, write)
	if err != nil {
		return nil, nil, err
	}
	meta, err := metadisk.Open(dev.File, dev.Layout, metadisk.Options{ALExtents: r.Disk.ALExtents, NoFlush: !r.Disk.MDFlushes})
	if err != nil {
		dev.Close()
		return nil, nil, metaErr(r.Name, dev, err)
	}
	return dev, meta, nil
}

func (m *Main) createMD(c *cli.Context) error {
	return m.eachResource(c, true, func(r *config.Resource, node string) error {
		dev, err := openDevice(r, node, true)
		if err != nil {
			return err
		}
		defer dev.Close()
		if dev.Capped != nil {
			return metaErr(r.Name, dev, dev.Capped)
		}
		err = metadisk.Create(dev.File, dev.Layout, node, r.Name, c.Bool("force"), metadisk.Options{NoFlush: !r.Disk.MDFlushes})
		if err != nil {
			return metaErr(r.Name, dev, err)
		}
		fmt.Fprintf(m.Stdout, "%s: metadata created on %s (%s, %s, covering %s of data)\n", r.Name, dev.Path,
			placement(dev.Layout), humanBytes(dev.Layout.Size), humanBytes(dev.Layout.DataSize))
		return nil
	})
}

func (m *Main) applyAL(c *cli.Context) error {
	return m.eachResource(c, true, func(r *config.Resource, node string) error {
		dev, meta, err := openMeta(r, node, true)
		if err != nil {
			return err
		}
		defer dev.Close()
		defer meta.Abandon()
		rec := meta.Recovery()
		n, err := meta.ApplyAL()
		if err != nil {
			return metaErr(r.Name, dev, err)
		}
		if rec.Clean {
			fmt.Fprintf(m.Stdout, "%s: metadata is clean; nothing to apply\n", r.Name)
			return nil
		}
		fmt.Fprintf(m.Stdout, "%s: activity log applied: %d extents, %d blocks newly marked out of sync (%d in all)\n",
			r.Name, len(rec.ALActive), n, meta.OutOfSync())
		return nil
	})
}

// mdDump is dump-md's JSON (schema version 1) and the source of its text.
type mdDump struct {
	Version  int    `json:"version"`
	Resource string `json:"resource"`
	Node     string `json:"node"`
	Metadata struct {
		Path   string `json:"path"`
		Spec   string `json:"spec"`
		Kind   string `json:"kind"`
		Index  int    `json:"index"`
		Offset int64  `json:"offset"`
		Size   int64  `json:"size"`
	} `json:"metadata"`
	DataSize int64    `json:"data_size"`
	Blocks   uint64   `json:"blocks"`
	Format   int      `json:"format_version"`
	Slot     string   `json:"superblock_slot"`
	Sequence uint64   `json:"sequence"`
	Created  string   `json:"created"`
	MetaNode string   `json:"created_on_node"`
	UUIDs    mdUUIDs  `json:"uuids"`
	Flags    []string `json:"flags"`
	Clean    bool     `json:"clean"`
	AL       struct {
		Transaction uint64          `json:"transaction"`
		Extents     []bitmap.Extent `json:"extents"`
		Applied     bool            `json:"applied"`
	} `json:"activity_log"`
	Bitmap struct {
		BitsSet         uint64 `json:"bits_set"`
		OutOfSyncBytes  uint64 `json:"out_of_sync_bytes"`
		Pages           int    `json:"pages"`
		UnreadablePages []int  `json:"unreadable_pages"`
	} `json:"bitmap"`
}

type mdUUIDs struct {
	Current string    `json:"current"`
	Bitmap  string    `json:"bitmap"`
	History [2]string `json:"history"`
}

func uuidHex(u uint64) string { return fmt.Sprintf("%016X", u) }

func (m *Main) dumpMD(c *cli.Context) error {
	return m.eachResource(c, false, func(r *config.Resource, node string) error {
		dev, meta, err := openMeta(r, node, false)
		if err != nil {
			return err
		}
		defer dev.Close()
		defer meta.Abandon()
		d := describeMeta(r, node, dev, meta)
		if c.Bool("json") {
			enc := json.NewEncoder(m.Stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(d)
		}
		writeMDText(m.Stdout, d, dev.Layout)
		return nil
	})
}

// describeMeta gathers what dump-md prints.
func describeMeta(r *config.Resource, node string, dev *replicator.MetaDevice, meta *metadisk.Meta) *mdDump {
	sb, rec, l := meta.Superblock(), meta.Recovery(), meta.Layout()
	var d mdDump
	d.Version, d.Resource, d.Node = 1, r.Name, node
	d.Metadata.Path, d.Metadata.Spec, d.Metadata.Kind = dev.Path, dev.Spec.String(), l.Kind.String()
	d.Metadata.Index, d.Metadata.Offset, d.Metadata.Size = l.Index, l.Offset, l.Size
	d.DataSize, d.Blocks, d.Format = l.DataSize, l.Blocks(), metadisk.Version
	d.Slot, d.Sequence = string("AB"[rec.Slot]), sb.Seq
	d.Created, d.MetaNode = time.Unix(sb.Created, 0).UTC().Format(time.RFC3339), sb.Node
	d.UUIDs = mdUUIDs{uuidHex(sb.UUIDs.Current), uuidHex(sb.UUIDs.Bitmap),
		[2]string{uuidHex(sb.UUIDs.History[0]), uuidHex(sb.UUIDs.History[1])}}
	d.Flags = []string{}
	if sb.Flags != 0 {
		d.Flags = strings.Split(sb.Flags.String(), ",")
	}
	d.Clean = rec.Clean
	d.AL.Transaction, d.AL.Extents = rec.ALSeq, rec.ALActive
	if d.AL.Extents == nil {
		d.AL.Extents = []bitmap.Extent{}
	}
	d.Bitmap.BitsSet, d.Bitmap.Pages = meta.OutOfSync(), l.Pages()
	d.Bitmap.OutOfSyncBytes = d.Bitmap.BitsSet * bitmap.BlockSize
	d.Bitmap.UnreadablePages = rec.TornPages
	if d.Bitmap.UnreadablePages == nil {
		d.Bitmap.UnreadablePages = []int{}
	}
	return &d
}

func writeMDText(w io.Writer, d *mdDump, l metadisk.Layout) {
	line := func(k, format string, args ...any) { fmt.Fprintf(w, "%-15s %s\n", k, fmt.Sprintf(format, args...)) }
	line("resource", "%s (node %s)", d.Resource, d.Node)
	line("metadata", "%s on %s (%s, offset %d, %s)", d.Metadata.Spec, d.Metadata.Path, placement(l),
		d.Metadata.Offset, humanBytes(d.Metadata.Size))
	line("format", "version %d, superblock slot %s, sequence %d", d.Format, d.Slot, d.Sequence)
	line("created", "%s on node %s", d.Created, d.MetaNode)
	line("data size", "%s (%d bytes, %d blocks of 4 KiB)", humanBytes(d.DataSize), d.DataSize, d.Blocks)
	line("uuids", "current %s bitmap %s history %s %s", d.UUIDs.Current, d.UUIDs.Bitmap, d.UUIDs.History[0], d.UUIDs.History[1])
	flags := strings.Join(d.Flags, ",")
	if flags == "" {
		flags = "none"
	}
	line("flags", "%s", flags)
	ext := make([]string, len(d.AL.Extents))
	for i, e := range d.AL.Extents {
		ext[i] = fmt.Sprint(e)
	}
	switch {
	case d.Clean:
		line("state", "clean (shut down cleanly, activity log empty)")
	default:
		line("state", "unclean: the activity log is not applied; run 'nbdmirror apply-al %s'", d.Resource)
	}
	line("activity log", "transaction %d, %d extents%s", d.AL.Transaction, len(ext), prefixIf(": ", strings.Join(ext, " ")))
	torn := make([]string, len(d.Bitmap.UnreadablePages))
	for i, p := range d.Bitmap.UnreadablePages {
		torn[i] = fmt.Sprint(p)
	}
	line("bitmap", "%d blocks out of sync (%s) in %d pages%s", d.Bitmap.BitsSet, humanBytes(int64(d.Bitmap.OutOfSyncBytes)),
		d.Bitmap.Pages, prefixIf(", unreadable pages (counted as out of sync): ", strings.Join(torn, " ")))
}

// placement describes where a layout puts the metadata.
func placement(l metadisk.Layout) string {
	if l.Kind == metadisk.Indexed {
		return fmt.Sprintf("indexed slot %d", l.Index)
	}
	return l.Kind.String()
}

func prefixIf(prefix, s string) string {
	if s == "" {
		return ""
	}
	return prefix + s
}

func humanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f, i := float64(n), 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.1f %s", f, units[i])
}

func (m *Main) dumpConfig(c *cli.Context) error {
	cfg, _, err := m.loadConfig(c)
	if err != nil {
		return err
	}
	rs := cfg.Resources
	if c.NArg() > 0 {
		if rs, err = resources(c, cfg, true); err != nil {
			return err
		}
	}
	fmt.Fprintf(m.Stdout, "# nbdmirror dump of %s: every value in effect\n", strings.Join(cfg.Files, ", "))
	return config.Dump(m.Stdout, rs...)
}
