package config

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Dump writes resources in normalised drbd.conf syntax with every value in
// effect, inherited from common and the defaults included. The output
// parses back to the same resources.
func Dump(w io.Writer, rs ...*Resource) error {
	var b strings.Builder
	for i, r := range rs {
		if i > 0 {
			b.WriteString("\n")
		}
		dumpResource(&b, r)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

type dumper struct {
	b      *strings.Builder
	indent string
}

func (d *dumper) line(key, value, comment string) {
	s := d.indent + key
	if value != "" {
		s += strings.Repeat(" ", max(1, 22-len(key))) + value
	}
	s += ";"
	if comment != "" {
		s += strings.Repeat(" ", max(1, 40-len(s))) + "# " + comment
	}
	d.b.WriteString(s + "\n")
}

func (d *dumper) open(name string) {
	d.b.WriteString(d.indent + name + " {\n")
	d.indent += "\t"
}

func (d *dumper) close() {
	d.indent = d.indent[:len(d.indent)-1]
	d.b.WriteString(d.indent + "}\n")
}

// quote writes s as a drbd.conf string, escaping only what the lexer
// knows (\" \\ \n \t \r): it reads back to the same bytes.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := range len(s) {
		switch c := s[i]; c {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case '\n':
			b.WriteString(`\n`)
		case '\t':
			b.WriteString(`\t`)
		case '\r':
			b.WriteString(`\r`)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

func yesNo(v bool) string {
	if v {
		return "yes"
	}
	return "no"
}

// when returns s if cond holds, else "".
func when(cond bool, s string) string {
	if cond {
		return s
	}
	return ""
}

func tenths(v time.Duration) (string, string) {
	return formatTime(v, time.Second/10), v.String()
}

func secs(v time.Duration) string { return formatTime(v, time.Second) }

func dumpResource(b *strings.Builder, r *Resource) {
	d := &dumper{b: b}
	fmt.Fprintf(b, "# resource %s, from %s\n", r.Name, r.Pos)
	d.open("resource " + r.Name)

	n := r.Net
	d.open("net")
	d.line("protocol", n.Protocol.String(), "")
	if n.CramHMACAlg != "" {
		d.line("cram-hmac-alg", n.CramHMACAlg, "")
	}
	if n.SharedSecret != "" {
		d.line("shared-secret", quote(n.SharedSecret), "")
	}
	d.line("sndbuf-size", formatSize(n.SndbufSize, unitByte), when(n.SndbufSize == 0, "automatic"))
	if n.CsumsAlg != "" {
		d.line("csums-alg", n.CsumsAlg, "")
	}
	if n.VerifyAlg != "" {
		d.line("verify-alg", n.VerifyAlg, "")
	}
	d.line("after-sb-0pri", n.AfterSB0Pri, "")
	d.line("after-sb-1pri", n.AfterSB1Pri, "")
	d.line("after-sb-2pri", n.AfterSB2Pri, "")
	d.line("rr-conflict", n.RRConflict, "")
	v, c := tenths(n.Timeout)
	d.line("timeout", v, c)
	d.line("ping-int", secs(n.PingInt), n.PingInt.String())
	v, c = tenths(n.PingTimeout)
	d.line("ping-timeout", v, c)
	d.line("connect-int", secs(n.ConnectInt), n.ConnectInt.String())
	d.line("on-congestion", n.OnCongestion, "")
	d.line("congestion-fill", formatSize(n.CongestionFill, unitSector), when(n.CongestionFill == 0, "off"))
	if n.CongestionExtents != 0 {
		d.line("congestion-extents", strconv.Itoa(n.CongestionExtents), "")
	}
	d.line("max-epoch-size", strconv.Itoa(n.MaxEpochSize), "")
	d.line("compression", n.Compression, "")
	if n.TLSCert != "" {
		d.line("tls-cert", n.TLSCert, "")
		d.line("tls-key", n.TLSKey, "")
		d.line("tls-ca", n.TLSCA, "")
	}
	d.close()

	k := r.Disk
	d.open("disk")
	d.line("resync-rate", formatSize(k.ResyncRate, unitKiB), "bytes/s")
	v, c = tenths(k.CPlanAhead)
	d.line("c-plan-ahead", v, c)
	d.line("c-fill-target", formatSize(k.CFillTarget, unitSector), "")
	v, c = tenths(k.CDelayTarget)
	d.line("c-delay-target", v, c)
	d.line("c-max-rate", formatSize(k.CMaxRate, unitKiB), "bytes/s")
	d.line("c-min-rate", formatSize(k.CMinRate, unitKiB), "bytes/s")
	d.line("al-extents", strconv.Itoa(k.ALExtents), "")
	d.line("disk-flushes", yesNo(k.DiskFlushes), "")
	d.line("md-flushes", yesNo(k.MDFlushes), "")
	d.line("on-io-error", k.OnIOError, "")
	v, c = tenths(k.DiskTimeout)
	if k.DiskTimeout == 0 {
		c = "none"
	}
	d.line("disk-timeout", v, c)
	d.line("fencing", k.Fencing, "")
	d.close()

	s := r.Startup
	d.open("startup")
	d.line("wfc-timeout", secs(s.WFCTimeout), when(s.WFCTimeout == 0, "wait forever"))
	d.line("degr-wfc-timeout", secs(s.DegrWFCTimeout), "")
	d.line("outdated-wfc-timeout", secs(s.OutdatedWFCTimeout), "")
	d.line("wait-after-sb", yesNo(s.WaitAfterSB), "")
	if s.BecomePrimaryOn != "" {
		d.line("become-primary-on", s.BecomePrimaryOn, "")
	}
	d.close()

	d.open("handlers")
	d.line("handler-timeout", secs(r.HandlerTimeout), "")
	names := make([]string, 0, len(r.Handlers))
	for h := range r.Handlers {
		names = append(names, h)
	}
	slices.Sort(names)
	for _, h := range names {
		d.line(h, quote(r.Handlers[h]), "")
	}
	d.close()

	for _, h := range r.Hosts {
		d.open("on " + strings.Join(h.Names, " "))
		if h.Device != "" {
			d.line("device", h.Device, "")
		}
		d.line("disk", h.Disk, "")
		d.line("meta-disk", h.MetaDisk.String(), "")
		d.line("address", h.Address.Family+" "+h.Address.String(), "")
		d.close()
	}
	d.close()
}
