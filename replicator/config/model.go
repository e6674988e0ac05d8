package config

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// Config is a parsed, validated configuration: every resource with its
// sections fully inherited from `common` and the defaults.
type Config struct {
	Files     []string    // the files read, in order
	Resources []*Resource // in the order of the files
	Warnings  []Warning   // DRBD keywords accepted but ignored, once each
}

// Warning is a keyword that nbdmirror accepts but deliberately ignores.
type Warning struct {
	Pos Pos
	Msg string
}

func (w Warning) String() string { return w.Pos.String() + ": " + w.Msg }

// Resource is one replicated disk.
type Resource struct {
	Name     string
	Pos      Pos
	Net      Net
	Disk     Disk
	Startup  Startup
	Handlers map[string]string // handler name → shell command
	// HandlerTimeout bounds each handler run (`handler-timeout` in the
	// handlers section; nbdmirror's own key).
	HandlerTimeout time.Duration
	Hosts          []*Host // one per node, in file order
}

// Protocol is the replication protocol letter.
type Protocol byte

// Replication protocols (reference/drbd.md §9).
const (
	ProtocolA Protocol = 'A' // a write completes when it is local and handed to the peer link
	ProtocolB Protocol = 'B' // … and the peer received it
	ProtocolC Protocol = 'C' // … and the peer wrote it
)

func (p Protocol) String() string { return string(rune(p)) }

// MarshalText writes the protocol letter.
func (p Protocol) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// Net holds the `net` section (and the 8.3 resource-level protocol).
type Net struct {
	Protocol          Protocol
	CramHMACAlg       string // accepted for DRBD configs; authentication is HMAC-SHA256
	SharedSecret      string
	SndbufSize        int64 // bytes; 0 = automatic
	CsumsAlg          string
	VerifyAlg         string
	AfterSB0Pri       string
	AfterSB1Pri       string
	AfterSB2Pri       string
	RRConflict        string
	Timeout           time.Duration
	PingInt           time.Duration
	PingTimeout       time.Duration
	ConnectInt        time.Duration
	OnCongestion      string
	CongestionFill    int64 // bytes; 0 = off
	CongestionExtents int   // 0 = al-extents
	MaxEpochSize      int
	Compression       string // none, s2, zstd
	TLSCert           string
	TLSKey            string
	TLSCA             string
}

// Disk holds the `disk` section (and the 8.3 `syncer` section).
type Disk struct {
	ResyncRate   int64 // bytes per second
	CPlanAhead   time.Duration
	CFillTarget  int64 // bytes
	CDelayTarget time.Duration
	CMaxRate     int64 // bytes per second
	CMinRate     int64 // bytes per second
	ALExtents    int
	DiskFlushes  bool
	MDFlushes    bool
	OnIOError    string
	DiskTimeout  time.Duration // 0 = none
	Fencing      string
}

// Startup holds the `startup` section.
type Startup struct {
	WFCTimeout         time.Duration // 0 = wait forever
	DegrWFCTimeout     time.Duration
	OutdatedWFCTimeout time.Duration
	WaitAfterSB        bool
	BecomePrimaryOn    string
}

// Host is one node of a resource: an `on` section merged with the
// resource-level device, disk, meta-disk and address.
type Host struct {
	// Names are the host names of the `on` section: usually one; several
	// name the same node under alternative names (as with IP failover).
	Names    []string
	Pos      Pos
	Device   string // kernel NBD device to attach while Primary, or ""
	Disk     string
	MetaDisk MetaDisk
	Address  Address
}

// Name returns the first name of the host.
func (h *Host) Name() string { return h.Names[0] }

// MetaDisk is where the metadata lives.
type MetaDisk struct {
	Internal bool
	Path     string
	Index    int // slot for `meta-disk PATH[N]`; -1 for `meta-disk PATH`
}

func (m MetaDisk) String() string {
	switch {
	case m.Internal:
		return "internal"
	case m.Index >= 0:
		return fmt.Sprintf("%s[%d]", m.Path, m.Index)
	}
	return m.Path
}

// Address is a peer endpoint.
type Address struct {
	Family string // ipv4 or ipv6
	Host   string
	Port   int
}

// String returns HOST:PORT, with brackets around an IPv6 host.
func (a Address) String() string { return net.JoinHostPort(a.Host, strconv.Itoa(a.Port)) }

// Defaults are DRBD 8.4's (reference/drbd.md §12), except compression.
func defaults() Resource {
	return Resource{
		Net: Net{
			Protocol: ProtocolC, Timeout: 6 * time.Second, PingInt: 10 * time.Second,
			PingTimeout: 500 * time.Millisecond, ConnectInt: 10 * time.Second, AfterSB0Pri: "disconnect",
			AfterSB1Pri: "disconnect", AfterSB2Pri: "disconnect", RRConflict: "disconnect",
			OnCongestion: "block", MaxEpochSize: 2048, Compression: "none",
		},
		Disk: Disk{
			ResyncRate: 250 << 10, CPlanAhead: 2 * time.Second, CFillTarget: 100 * 512,
			CDelayTarget: time.Second, CMaxRate: 100 << 20, CMinRate: 250 << 10, ALExtents: 1237,
			DiskFlushes: true, MDFlushes: true, OnIOError: "detach", Fencing: "dont-care",
		},
		Startup:  Startup{DegrWFCTimeout: 60 * time.Second},
		Handlers: map[string]string{}, HandlerTimeout: 120 * time.Second,
	}
}

// Resource returns the named resource.
func (c *Config) Resource(name string) (*Resource, error) {
	for _, r := range c.Resources {
		if r.Name == name {
			return r, nil
		}
	}
	names := make([]string, 0, len(c.Resources))
	for _, r := range c.Resources {
		names = append(names, r.Name)
	}
	return nil, fmt.Errorf("no resource %q in %s (resources: %s)", name, strings.Join(c.Files[:min(1, len(c.Files))], ""),
		strings.Join(names, ", "))
}

// Host returns the host section for a node name.
func (r *Resource) Host(node string) (*Host, error) {
	for _, h := range r.Hosts {
		for _, n := range h.Names {
			if n == node {
				return h, nil
			}
		}
	}
	var names []string
	for _, h := range r.Hosts {
		names = append(names, h.Names...)
	}
	return nil, fmt.Errorf("resource %s has no 'on %s' section (its nodes: %s): set --node or NBDMIRROR_NODE to one of them",
		r.Name, node, strings.Join(names, ", "))
}

// Peer returns the other node's host section.
func (r *Resource) Peer(node string) (*Host, error) {
	me, err := r.Host(node)
	if err != nil {
		return nil, err
	}
	for _, h := range r.Hosts {
		if h != me {
			return h, nil
		}
	}
	return nil, fmt.Errorf("resource %s has no peer for %s", r.Name, node)
}
