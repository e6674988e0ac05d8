package config

import (
	"fmt"
	"time"
)

// setter applies one statement to a resource.
type setter func(b *builder, r *Resource, n *node) error

// sectionKeys lists, per section, the keywords nbdmirror understands. The
// 8.3 `syncer` section accepts its own names and the 8.4 ones.
var sectionKeys map[string]map[string]setter

func init() {
	net := map[string]setter{
		"protocol":               func(b *builder, r *Resource, n *node) error { return setProtocol(b, r, n) },
		"cram-hmac-alg":          cramHMAC,
		"shared-secret":          str(func(r *Resource) *string { return &r.Net.SharedSecret }, 1, 1024),
		"sndbuf-size":            size(func(r *Resource) *int64 { return &r.Net.SndbufSize }, unitByte, 0, 128<<20),
		"csums-alg":              enum(func(r *Resource) *string { return &r.Net.CsumsAlg }, digests...),
		"csum-alg":               enum(func(r *Resource) *string { return &r.Net.CsumsAlg }, digests...),
		"verify-alg":             enum(func(r *Resource) *string { return &r.Net.VerifyAlg }, digests...),
		"after-sb-0pri":          enum(func(r *Resource) *string { return &r.Net.AfterSB0Pri }, "disconnect", "discard-zero-changes", "discard-least-changes", "discard-younger-primary", "discard-older-primary"),
		"after-sb-1pri":          enum(func(r *Resource) *string { return &r.Net.AfterSB1Pri }, "disconnect", "consensus", "discard-secondary"),
		"after-sb-2pri":          enum(func(r *Resource) *string { return &r.Net.AfterSB2Pri }, "disconnect"),
		"rr-conflict":            enum(func(r *Resource) *string { return &r.Net.RRConflict }, "disconnect"),
		"timeout":                dur(func(r *Resource) *time.Duration { return &r.Net.Timeout }, time.Second/10, 1, 600),
		"ping-int":               dur(func(r *Resource) *time.Duration { return &r.Net.PingInt }, time.Second, 1, 120),
		"ping-timeout":           dur(func(r *Resource) *time.Duration { return &r.Net.PingTimeout }, time.Second/10, 1, 300),
		"connect-int":            dur(func(r *Resource) *time.Duration { return &r.Net.ConnectInt }, time.Second, 1, 120),
		"on-congestion":          enum(func(r *Resource) *string { return &r.Net.OnCongestion }, "block", "pull-ahead", "disconnect"),
		"congestion-fill":        size(func(r *Resource) *int64 { return &r.Net.CongestionFill }, unitSector, 0, 10<<30),
		"congestion-extents":     count(func(r *Resource) *int { return &r.Net.CongestionExtents }, 1, 65534),
		"max-epoch-size":         count(func(r *Resource) *int { return &r.Net.MaxEpochSize }, 1, 20000),
		"compression":            enum(func(r *Resource) *string { return &r.Net.Compression }, "none", "s2", "zstd"),
		"tls-cert":               pathKey(func(r *Resource) *string { return &r.Net.TLSCert }),
		"tls-key":                pathKey(func(r *Resource) *string { return &r.Net.TLSKey }),
		"tls-ca":                 pathKey(func(r *Resource) *string { return &r.Net.TLSCA }),
		"allow-two-primaries":    refused("allow-two-primaries is not supported: nbdmirror never lets two Primaries write (invariant I4)"),
		"data-integrity-alg":     ignored("every frame on nbdmirror's link carries a checksum or a MAC already"),
		"rcvbuf-size":            ignored("the receive buffer is left to the kernel"),
		"ko-count":               ignored("a peer that stops answering is detected by ping-timeout and timeout"),
		"max-buffers":            ignored("nbdmirror bounds its queues by sndbuf-size"),
		"unplug-watermark":       ignored("it has no userspace meaning"),
		"tcp-cork":               ignored("framing already batches writes"),
		"use-rle":                ignored("bitmaps are exchanged compressed when compression is set"),
		"always-asbp":            ignored("after-sb policies apply as configured"),
		"socket-check-timeout":   ignored("nbdmirror's handshake has its own timeout"),
		"csums-after-crash-only": ignored("csums-alg applies to every resync"),
		"fencing":                enum(func(r *Resource) *string { return &r.Disk.Fencing }, "dont-care", "resource-only", "resource-and-stonith"),
	}
	disk := map[string]setter{
		"resync-rate":            size(func(r *Resource) *int64 { return &r.Disk.ResyncRate }, unitKiB, 1<<10, 4<<30),
		"c-plan-ahead":           dur(func(r *Resource) *time.Duration { return &r.Disk.CPlanAhead }, time.Second/10, 0, 300),
		"c-fill-target":          size(func(r *Resource) *int64 { return &r.Disk.CFillTarget }, unitSector, 0, 1000000*512),
		"c-delay-target":         dur(func(r *Resource) *time.Duration { return &r.Disk.CDelayTarget }, time.Second/10, 1, 100),
		"c-max-rate":             size(func(r *Resource) *int64 { return &r.Disk.CMaxRate }, unitKiB, 250<<10, 4<<30),
		"c-min-rate":             size(func(r *Resource) *int64 { return &r.Disk.CMinRate }, unitKiB, 0, 4<<30),
		"al-extents":             count(func(r *Resource) *int { return &r.Disk.ALExtents }, 7, 65534),
		"disk-flushes":           boolean(func(r *Resource) *bool { return &r.Disk.DiskFlushes }, true),
		"md-flushes":             boolean(func(r *Resource) *bool { return &r.Disk.MDFlushes }, true),
		"no-disk-flushes":        boolean(func(r *Resource) *bool { return &r.Disk.DiskFlushes }, false),
		"no-md-flushes":          boolean(func(r *Resource) *bool { return &r.Disk.MDFlushes }, false),
		"on-io-error":            enum(func(r *Resource) *string { return &r.Disk.OnIOError }, "detach", "pass_on", "call-local-io-error"),
		"disk-timeout":           dur(func(r *Resource) *time.Duration { return &r.Disk.DiskTimeout }, time.Second/10, 0, 6000),
		"fencing":                net["fencing"],
		"disk-barrier":           ignored("nbdmirror orders writes with flushes"),
		"no-disk-barrier":        ignored("nbdmirror orders writes with flushes"),
		"disk-drain":             ignored("nbdmirror orders epochs with flushes only (overlapping writes are always applied in order)"),
		"no-disk-drain":          ignored("nbdmirror orders epochs with flushes only (overlapping writes are always applied in order)"),
		"al-updates":             ignored("the activity log is always written, so a crashed Primary never needs a full resync"),
		"read-balancing":         ignored("reads are always served from the local disk"),
		"resync-after":           ignored("resources resync independently"),
		"rs-discard-granularity": ignored("resync writes data, not discards"),
		"size":                   ignored("the whole disk is replicated; resize with the resize verb"),
		"max-bio-bvecs":          ignored("it has no userspace meaning"),
	}
	syncer := map[string]setter{
		"rate":                  disk["resync-rate"],
		"after":                 ignored("resources resync independently"),
		"cpu-mask":              ignored("the Go runtime schedules nbdmirror's work"),
		"use-rle":               net["use-rle"],
		"on-no-data-accessible": ignored("I/O fails when no data is accessible"),
	}
	for k, v := range disk {
		syncer[k] = v
	}
	for _, k := range []string{"csums-alg", "csum-alg", "verify-alg"} {
		syncer[k] = net[k]
	}
	startup := map[string]setter{
		"wfc-timeout":          dur(func(r *Resource) *time.Duration { return &r.Startup.WFCTimeout }, time.Second, 0, 1<<31),
		"degr-wfc-timeout":     dur(func(r *Resource) *time.Duration { return &r.Startup.DegrWFCTimeout }, time.Second, 0, 1<<31),
		"outdated-wfc-timeout": dur(func(r *Resource) *time.Duration { return &r.Startup.OutdatedWFCTimeout }, time.Second, 0, 1<<31),
		"wait-after-sb":        boolean(func(r *Resource) *bool { return &r.Startup.WaitAfterSB }, true),
		"become-primary-on":    str(func(r *Resource) *string { return &r.Startup.BecomePrimaryOn }, 1, 64),
		"stacked-timeouts":     ignored("stacked resources are not supported"),
	}
	options := map[string]setter{
		"cpu-mask":              syncer["cpu-mask"],
		"on-no-data-accessible": syncer["on-no-data-accessible"],
	}
	handlers := map[string]setter{}
	for _, h := range HandlerNames {
		handlers[h] = handler(h)
	}
	handlers["handler-timeout"] = dur(func(r *Resource) *time.Duration { return &r.HandlerTimeout }, time.Second, 1, 86400)
	sectionKeys = map[string]map[string]setter{
		"net": net, "disk": disk, "syncer": syncer, "startup": startup, "options": options, "handlers": handlers,
	}
}

// HandlerNames are the handlers drbd.conf defines.
var HandlerNames = []string{"pri-on-incon-degr", "pri-lost-after-sb", "pri-lost", "fence-peer", "unfence-peer",
	"local-io-error", "initial-split-brain", "split-brain", "before-resync-target", "after-resync-target",
	"before-resync-source", "out-of-sync", "quorum-lost", "disconnected"}

var digests = []string{"sha256", "xxh64", "md5", "sha1", "crc32c"}

// section applies the statements of one section.
func (b *builder) section(rb *resBuild, kind string, body []*node) error {
	keys := sectionKeys[kind]
	for _, n := range body {
		if n.isSec {
			return errAt(n.key.pos, "unexpected section %q inside %s", n.key.text, kind)
		}
		set, ok := keys[n.key.text]
		if !ok {
			return errAt(n.key.pos, "unknown keyword %q in %s section", n.key.text, kind)
		}
		if err := set(b, rb.r, n); err != nil {
			return err
		}
	}
	return nil
}

func size(field func(*Resource) *int64, defUnit, lo, hi int64) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		v, err := parseSize(t, n.key.text, defUnit, lo, hi)
		*field(r) = v
		return err
	}
}

func dur(field func(*Resource) *time.Duration, unit time.Duration, lo, hi int64) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		v, err := parseTime(t, n.key.text, unit, lo, hi)
		*field(r) = v
		return err
	}
}

func count(field func(*Resource) *int, lo, hi int64) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		v, err := parseInt(t, n.key.text, lo, hi)
		*field(r) = int(v)
		return err
	}
}

func enum(field func(*Resource) *string, allowed ...string) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		v, err := oneOf(t, n.key.text, allowed...)
		*field(r) = v
		return err
	}
}

func str(field func(*Resource) *string, lo, hi int) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		if len(t.text) < lo || len(t.text) > hi {
			return errAt(t.pos, "%s must be %d to %d bytes long", n.key.text, lo, hi)
		}
		*field(r) = t.text
		return nil
	}
}

func pathKey(field func(*Resource) *string) setter {
	return func(_ *builder, r *Resource, n *node) error {
		p, err := pathArg(n)
		*field(r) = p
		return err
	}
}

// boolean handles `key;` (meaning bare), `key yes;` and `key no;`; for
// the no-… spellings bare is false and a value is not allowed.
func boolean(field func(*Resource) *bool, bare bool) setter {
	return func(_ *builder, r *Resource, n *node) error {
		switch {
		case len(n.args) == 0:
			*field(r) = bare
			return nil
		case len(n.args) == 1 && bare:
			v, err := parseBool(n.args[0], n.key.text)
			*field(r) = v
			return err
		}
		return errAt(n.key.pos, "%s takes %s", n.key.text, map[bool]string{true: "no value or yes/no", false: "no value"}[bare])
	}
}

func cramHMAC(b *builder, r *Resource, n *node) error {
	t, err := oneArg(n)
	if err != nil {
		return err
	}
	alg, err := oneOf(t, "cram-hmac-alg", "sha256", "sha1", "sha512", "md5", "crc32c")
	if err != nil {
		return err
	}
	if alg != "sha256" {
		b.warn(t.pos, "cram-hmac-alg",
			fmt.Sprintf("cram-hmac-alg %s: nbdmirror authenticates peers with HMAC-SHA256 whatever this names", alg))
	}
	r.Net.CramHMACAlg = alg
	return nil
}

func handler(name string) setter {
	return func(_ *builder, r *Resource, n *node) error {
		t, err := oneArg(n)
		if err != nil {
			return err
		}
		if t.text == "" {
			return errAt(t.pos, "handler %s: empty command", name)
		}
		r.Handlers[name] = t.text
		return nil
	}
}

// ignored accepts a DRBD keyword nbdmirror has no use for, with one warning.
func ignored(why string) setter {
	return func(b *builder, _ *Resource, n *node) error {
		b.warn(n.key.pos, n.key.text, fmt.Sprintf("DRBD keyword %q is ignored: %s", n.key.text, why))
		return nil
	}
}

// refused rejects a DRBD keyword whose meaning nbdmirror will not provide.
func refused(why string) setter {
	return func(_ *builder, _ *Resource, n *node) error {
		return errAt(n.key.pos, "%s", why)
	}
}
