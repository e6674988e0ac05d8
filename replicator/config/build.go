package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// Load reads the configuration at path, its includes, and validates it.
func Load(path string) (*Config, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	return Parse(os.DirFS("/"), strings.TrimPrefix(abs, "/"), "/")
}

// Parse reads the configuration file name from fsys. prefix is prepended
// to file names in messages (Load uses "/" so that they read as absolute).
func Parse(fsys fs.FS, name, prefix string) (*Config, error) {
	p := &parser{fsys: prefixFS{fsys, prefix}}
	nodes, err := p.parseFile(prefix+name, 0, Pos{})
	if err != nil {
		return nil, err
	}
	b := &builder{warned: map[string]bool{}, cfg: &Config{Files: p.files}}
	if err := b.build(nodes); err != nil {
		return nil, err
	}
	return b.cfg, nil
}

// prefixFS lets the parser use display names (with the prefix) as paths.
type prefixFS struct {
	fs     fs.FS
	prefix string
}

func (p prefixFS) Open(name string) (fs.File, error) {
	rel, ok := strings.CutPrefix(name, p.prefix)
	if !ok || !fs.ValidPath(rel) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return p.fs.Open(rel)
}

func (p prefixFS) Glob(pattern string) ([]string, error) {
	rel, ok := strings.CutPrefix(pattern, p.prefix)
	if !ok {
		return nil, nil
	}
	m, err := fs.Glob(p.fs, rel)
	for i := range m {
		m[i] = p.prefix + m[i]
	}
	return m, err
}

// builder turns parsed nodes into typed resources.
type builder struct {
	cfg    *Config
	warned map[string]bool
	common []*node
}

// resBuild is a resource being built, with its resource-level host values.
type resBuild struct {
	r                     *Resource
	device, disk, address *node // resource-level values, applied to hosts lacking them
	metaDisk              *node
	hosts                 []*hostBuild
}

type hostBuild struct {
	h                               *Host
	device, disk, metaDisk, address *node
}

func (b *builder) warn(p Pos, key, msg string) {
	if b.warned[key] {
		return
	}
	b.warned[key] = true
	b.cfg.Warnings = append(b.cfg.Warnings, Warning{p, msg})
}

var resourceName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$`)

func (b *builder) build(nodes []*node) error {
	var commonSeen *node
	var resources []*node
	for _, n := range nodes {
		switch n.key.text {
		case "global":
			if !n.isSec || len(n.args) > 0 {
				return errAt(n.key.pos, `expected "global { … }"`)
			}
			for _, g := range n.block {
				if !globalKeys[g.key.text] {
					return errAt(g.key.pos, "unknown keyword %q in global section", g.key.text)
				}
				b.warn(g.key.pos, g.key.text, fmt.Sprintf("DRBD keyword %q is ignored (it has no meaning for nbdmirror)", g.key.text))
			}
		case "common":
			if !n.isSec || len(n.args) > 0 {
				return errAt(n.key.pos, `expected "common { … }"`)
			}
			if commonSeen != nil {
				return errAt(n.key.pos, "a second common section (the first is at %s)", commonSeen.key.pos)
			}
			commonSeen, b.common = n, n.block
		case "resource":
			if !n.isSec || len(n.args) != 1 {
				return errAt(n.key.pos, `expected "resource NAME { … }"`)
			}
			resources = append(resources, n)
		default:
			return errAt(n.key.pos, "unknown top-level keyword %q: expected global, common, resource or include", n.key.text)
		}
	}
	if commonSeen != nil {
		// Check common on its own too, so its errors show even when no
		// resource uses it.
		def := defaults()
		if err := b.apply(&resBuild{r: &def}, b.common, "common"); err != nil {
			return err
		}
	}
	seen := map[string]Pos{}
	for _, n := range resources {
		name := n.args[0]
		if !resourceName.MatchString(name.text) {
			return errAt(name.pos, "resource name %q: use at most 64 letters, digits, '_', '.', '+' or '-'", name.text)
		}
		if p, dup := seen[name.text]; dup {
			return errAt(name.pos, "resource %s is defined twice (first at %s)", name.text, p)
		}
		seen[name.text] = name.pos
		r, err := b.resource(n)
		if err != nil {
			return err
		}
		b.cfg.Resources = append(b.cfg.Resources, r)
	}
	return nil
}

var globalKeys = map[string]bool{"usage-count": true, "minor-count": true, "dialog-refresh": true,
	"disable-ip-verification": true, "udev-always-use-vnr": true, "cmd-timeout-short": true,
	"cmd-timeout-medium": true, "cmd-timeout-long": true}

func (b *builder) resource(n *node) (*Resource, error) {
	def := defaults()
	rb := &resBuild{r: &def}
	rb.r.Name, rb.r.Pos = n.args[0].text, n.args[0].pos
	if err := b.apply(rb, b.common, "common"); err != nil {
		return nil, err
	}
	if err := b.apply(rb, n.block, "resource"); err != nil {
		return nil, err
	}
	if err := b.finishHosts(rb); err != nil {
		return nil, err
	}
	if err := validate(rb.r, n.key.pos); err != nil {
		return nil, err
	}
	return rb.r, nil
}

// apply applies the statements and sections of a common or resource body.
func (b *builder) apply(rb *resBuild, body []*node, scope string) error {
	for _, n := range body {
		k := n.key.text
		if n.isSec {
			switch {
			case sectionKeys[k] != nil:
				if len(n.args) > 0 {
					return errAt(n.args[0].pos, "section %s takes no name", k)
				}
				if err := b.section(rb, k, n.block); err != nil {
					return err
				}
			case k == "on" && scope == "resource":
				if err := b.host(rb, n); err != nil {
					return err
				}
			case k == "volume" && scope == "resource":
				if err := b.volume(n, func(v *node) error { return b.resourceLevel(rb, v) }); err != nil {
					return err
				}
			case k == "on" || k == "volume":
				return errAt(n.key.pos, "%s sections belong in a resource, not in common", k)
			case k == "floating" || k == "stacked-on-top-of" || k == "connection" || k == "connection-mesh":
				return errAt(n.key.pos, "%q is not supported: nbdmirror replicates between exactly two 'on' hosts", k)
			default:
				return errAt(n.key.pos, "unknown section %q in %s: expected net, disk, syncer, startup, handlers, options or on", k, scope)
			}
			continue
		}
		switch {
		case k == "protocol":
			if err := setProtocol(b, rb.r, n); err != nil {
				return err
			}
		case scope == "resource":
			if err := b.resourceLevel(rb, n); err != nil {
				return err
			}
		default:
			return errAt(n.key.pos, "unknown keyword %q in common: expected protocol or a section", k)
		}
	}
	return nil
}

// resourceLevel handles device, disk, meta-disk and address at resource
// level (or in a resource-level volume 0).
func (b *builder) resourceLevel(rb *resBuild, n *node) error {
	switch n.key.text {
	case "device":
		rb.device = n
	case "disk":
		rb.disk = n
	case "meta-disk", "flexible-meta-disk":
		rb.metaDisk = n
	case "address":
		rb.address = n
	default:
		return errAt(n.key.pos, "unknown keyword %q in resource %s", n.key.text, rb.r.Name)
	}
	return nil
}

// volume accepts `volume 0 { … }` (DRBD 8.4): nbdmirror replicates one
// disk per resource.
func (b *builder) volume(n *node, f func(*node) error) error {
	if len(n.args) != 1 || n.args[0].text != "0" {
		return errAt(n.key.pos, "only volume 0 is supported: nbdmirror replicates one disk per resource (use one resource per disk)")
	}
	for _, v := range n.block {
		if v.isSec {
			return errAt(v.key.pos, "unexpected section %q in volume 0", v.key.text)
		}
		if err := f(v); err != nil {
			return err
		}
	}
	return nil
}

func (b *builder) host(rb *resBuild, n *node) error {
	if len(n.args) == 0 {
		return errAt(n.key.pos, `expected "on HOSTNAME { … }"`)
	}
	hb := &hostBuild{h: &Host{Pos: n.key.pos}}
	for _, a := range n.args {
		hb.h.Names = append(hb.h.Names, a.text)
	}
	set := func(v *node) error {
		switch v.key.text {
		case "device":
			hb.device = v
		case "disk":
			hb.disk = v
		case "meta-disk", "flexible-meta-disk":
			hb.metaDisk = v
		case "address":
			hb.address = v
		case "node-id":
			b.warn(v.key.pos, "node-id", `DRBD keyword "node-id" is ignored (nbdmirror has two nodes, named by their on sections)`)
		default:
			return errAt(v.key.pos, "unknown keyword %q in 'on %s': expected device, disk, meta-disk or address",
				v.key.text, hb.h.Names[0])
		}
		return nil
	}
	for _, v := range n.block {
		if v.isSec && v.key.text == "volume" {
			if err := b.volume(v, set); err != nil {
				return err
			}
			continue
		}
		if v.isSec {
			return errAt(v.key.pos, "unexpected section %q in 'on %s'", v.key.text, hb.h.Names[0])
		}
		if err := set(v); err != nil {
			return err
		}
	}
	rb.hosts = append(rb.hosts, hb)
	return nil
}

// finishHosts fills every host from its own values, else the resource
// level, and checks that there are exactly two nodes.
func (b *builder) finishHosts(rb *resBuild) error {
	r := rb.r
	seen := map[string]Pos{}
	for _, hb := range rb.hosts {
		for _, name := range hb.h.Names {
			if p, dup := seen[name]; dup {
				return errAt(hb.h.Pos, "resource %s: node %s appears in two on sections (the first at %s)", r.Name, name, p)
			}
			seen[name] = hb.h.Pos
		}
		pick := func(own, res *node) *node {
			if own != nil {
				return own
			}
			return res
		}
		h := hb.h
		if n := pick(hb.device, rb.device); n != nil {
			dev, err := b.device(n)
			if err != nil {
				return err
			}
			h.Device = dev
		}
		for _, f := range []struct {
			what string
			n    *node
			set  func(*node) error
		}{
			{"disk", pick(hb.disk, rb.disk), func(n *node) (err error) { h.Disk, err = pathArg(n); return }},
			{"meta-disk", pick(hb.metaDisk, rb.metaDisk), func(n *node) (err error) { h.MetaDisk, err = parseMetaDisk(n); return }},
			{"address", pick(hb.address, rb.address), func(n *node) (err error) { h.Address, err = parseAddress(n); return }},
		} {
			if f.n == nil {
				return errAt(h.Pos, "resource %s: 'on %s' has no %s (set it there or at resource level)", r.Name, h.Name(), f.what)
			}
			if err := f.set(f.n); err != nil {
				return err
			}
		}
		r.Hosts = append(r.Hosts, h)
	}
	if len(r.Hosts) != 2 {
		return errAt(r.Pos, "resource %s has %d on sections: nbdmirror replicates between exactly 2 nodes", r.Name, len(r.Hosts))
	}
	if len(r.Hosts) == 2 && r.Hosts[0].Address.String() == r.Hosts[1].Address.String() {
		return errAt(r.Hosts[1].Pos, "resource %s: both nodes have the address %s", r.Name, r.Hosts[0].Address)
	}
	return nil
}

func (b *builder) device(n *node) (string, error) {
	if len(n.args) == 0 {
		return "", errAt(n.key.pos, "expected a device path after device")
	}
	if p := n.args[0].text; len(n.args) == 1 && strings.HasPrefix(p, "/dev/nbd") {
		return p, nil
	}
	b.warn(n.key.pos, "device", fmt.Sprintf("device %s is ignored: it is not a kernel NBD device (nbdmirror serves the resource over NBD; write device /dev/nbdN; to attach one while Primary)",
		strings.Join(tokensText(n.args), " ")))
	return "", nil
}

func tokensText(ts []token) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.text
	}
	return out
}

func oneArg(n *node) (token, error) {
	if len(n.args) != 1 {
		return token{}, errAt(n.key.pos, "expected exactly one value after %s, found %d", n.key.text, len(n.args))
	}
	return n.args[0], nil
}

func pathArg(n *node) (string, error) {
	t, err := oneArg(n)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(t.text, "/") {
		return "", errAt(t.pos, "%s %q: expected an absolute path", n.key.text, t.text)
	}
	return t.text, nil
}

var indexed = regexp.MustCompile(`^(.*)\[(\d{1,7})\]$`)

// parseMetaDisk reads `internal`, `PATH`, `PATH[N]` or `PATH [N]`.
func parseMetaDisk(n *node) (MetaDisk, error) {
	args := n.args
	if len(args) == 0 || len(args) > 2 {
		return MetaDisk{}, errAt(n.key.pos, "expected internal, PATH or PATH[N] after %s", n.key.text)
	}
	if len(args) == 1 && args[0].text == "internal" {
		return MetaDisk{Internal: true, Index: -1}, nil
	}
	spec := args[0].text
	if len(args) == 2 {
		spec += args[1].text
	}
	md := MetaDisk{Path: spec, Index: -1}
	if m := indexed.FindStringSubmatch(spec); m != nil {
		fmt.Sscan(m[2], &md.Index)
		md.Path = m[1]
	} else if len(args) == 2 {
		return MetaDisk{}, errAt(args[1].pos, "meta-disk index %q: expected [N]", args[1].text)
	}
	if n.key.text == "flexible-meta-disk" && md.Index >= 0 {
		return MetaDisk{}, errAt(n.key.pos, "flexible-meta-disk takes no index")
	}
	if !strings.HasPrefix(md.Path, "/") {
		return MetaDisk{}, errAt(args[0].pos, "meta-disk %q: expected internal or an absolute path", spec)
	}
	return md, nil
}

// parseAddress reads `address [ipv4|ipv6] HOST:PORT`.
func parseAddress(n *node) (Address, error) {
	args := n.args
	var a Address
	switch len(args) {
	case 1:
	case 2:
		switch args[0].text {
		case "ipv4", "ipv6":
			a.Family = args[0].text
		case "ssocks", "sdp":
			return Address{}, errAt(args[0].pos, "address family %s is not supported: use ipv4 or ipv6", args[0].text)
		default:
			return Address{}, errAt(args[0].pos, "address family %q: expected ipv4 or ipv6", args[0].text)
		}
		args = args[1:]
	default:
		return Address{}, errAt(n.key.pos, "expected address [ipv4|ipv6] HOST:PORT")
	}
	t := args[0]
	host, port, ok := strings.Cut(t.text, ":")
	if strings.HasPrefix(t.text, "[") {
		end := strings.Index(t.text, "]:")
		if end < 0 {
			return Address{}, errAt(t.pos, "address %q: expected [IPv6]:PORT", t.text)
		}
		host, port, ok = t.text[1:end], t.text[end+2:], true
		if a.Family == "" {
			a.Family = "ipv6"
		}
	} else if strings.Count(t.text, ":") > 1 {
		return Address{}, errAt(t.pos, "address %q: put an IPv6 address in brackets, e.g. ipv6 [fd00::1]:7789", t.text)
	}
	if !ok || host == "" {
		return Address{}, errAt(t.pos, "address %q: expected HOST:PORT, e.g. 10.0.0.1:7789", t.text)
	}
	var p int
	if _, err := fmt.Sscan(port, &p); err != nil || p < 1 || p > 65535 || fmt.Sprint(p) != port {
		return Address{}, errAt(t.pos, "address %q: the port must be a number from 1 to 65535", t.text)
	}
	if a.Family == "" {
		a.Family = "ipv4"
	}
	if a.Family == "ipv6" && !strings.Contains(host, ":") {
		return Address{}, errAt(t.pos, "address %q: ipv6 needs an IPv6 address in brackets", t.text)
	}
	a.Host, a.Port = host, p
	return a, nil
}

func setProtocol(b *builder, r *Resource, n *node) error {
	t, err := oneArg(n)
	if err != nil {
		return err
	}
	v, err := oneOf(t, "protocol", "A", "B", "C")
	if err != nil {
		return err
	}
	r.Net.Protocol = Protocol(v[0])
	return nil
}

// validate checks the fields of a resource against each other.
// Validate checks the rules that tie r's keys together, the ones Parse
// checks once a resource is read, on r as it is (a configuration put
// together from parts, as adjust's effective one): a one-line error
// saying what is wrong, or nil.
func Validate(r *Resource) error {
	if err := validate(r, Pos{}); err != nil {
		var e *Error
		if errors.As(err, &e) {
			return errors.New(e.Msg)
		}
		return err
	}
	return nil
}

func validate(r *Resource, pos Pos) error {
	n := &r.Net
	bad := func(format string, args ...any) error {
		return errAt(pos, "resource %s: %s", r.Name, fmt.Sprintf(format, args...))
	}
	switch {
	case n.CramHMACAlg != "" && n.SharedSecret == "":
		return bad("cram-hmac-alg needs a shared-secret")
	case n.Timeout >= n.PingInt || n.Timeout >= n.ConnectInt:
		return bad("timeout (%v) must be shorter than ping-int (%v) and connect-int (%v)", n.Timeout, n.PingInt, n.ConnectInt)
	case n.PingTimeout >= n.PingInt:
		return bad("ping-timeout (%v) must be shorter than ping-int (%v)", n.PingTimeout, n.PingInt)
	case n.OnCongestion == "pull-ahead" && n.Protocol != ProtocolA:
		return bad("on-congestion pull-ahead needs protocol A (it is %s)", n.Protocol)
	case (n.TLSCert == "") != (n.TLSKey == "") || (n.TLSCert == "") != (n.TLSCA == ""):
		return bad("tls-cert, tls-key and tls-ca go together: set all three or none")
	case r.Disk.CMinRate > r.Disk.CMaxRate:
		return bad("c-min-rate (%s) is above c-max-rate (%s)", formatSize(r.Disk.CMinRate, unitKiB), formatSize(r.Disk.CMaxRate, unitKiB))
	case n.CongestionExtents > r.Disk.ALExtents:
		return bad("congestion-extents (%d) is above al-extents (%d)", n.CongestionExtents, r.Disk.ALExtents)
	case r.Startup.BecomePrimaryOn != "" && r.Startup.BecomePrimaryOn != "both" && !hasNode(r, r.Startup.BecomePrimaryOn):
		return bad("become-primary-on %s names no node of the resource", r.Startup.BecomePrimaryOn)
	}
	return nil
}

func hasNode(r *Resource, name string) bool {
	_, err := r.Host(name)
	return err == nil
}
