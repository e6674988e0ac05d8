package config

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/fstest"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := "testdata/" + name
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

func load(t *testing.T, name string) *Config {
	t.Helper()
	c, err := Parse(os.DirFS("."), name, "")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestVPNWalkthrough parses the configuration of the DRBD-over-VPN
// walkthrough into the expected typed values.
func TestVPNWalkthrough(t *testing.T) {
	c := load(t, "testdata/vpn.conf")
	r, err := c.Resource("test_a")
	if err != nil {
		t.Fatal(err)
	}
	want := struct {
		Protocol                Protocol
		DiskFlushes, MDFlushes  bool
		Cram, Secret            string
		Sndbuf, Rate            int64
		Csums                   string
		Disk, Meta, Addr, Addr2 string
	}{ProtocolA, false, false, "sha256", "Xn3KxN/b0ck!", 10 << 20, 1 << 20, "md5",
		"/dev/local/test_a", "/dev/local/drbd_meta[0]", "10.89.33.1:7789", "10.89.33.2:7789"}
	server, _ := r.Host("server")
	backup, _ := r.Peer("server")
	got := want
	got.Protocol, got.DiskFlushes, got.MDFlushes = r.Net.Protocol, r.Disk.DiskFlushes, r.Disk.MDFlushes
	got.Cram, got.Secret, got.Sndbuf, got.Rate = r.Net.CramHMACAlg, r.Net.SharedSecret, r.Net.SndbufSize, r.Disk.ResyncRate
	got.Csums, got.Disk, got.Meta = r.Net.CsumsAlg, server.Disk, server.MetaDisk.String()
	got.Addr, got.Addr2 = server.Address.String(), backup.Address.String()
	if got != want {
		t.Errorf("parsed\n%+v\nwant\n%+v", got, want)
	}
	if server.MetaDisk.Index != 0 || server.MetaDisk.Path != "/dev/local/drbd_meta" || server.Device != "" {
		t.Errorf("meta-disk %+v device %q", server.MetaDisk, server.Device)
	}
	// The whole typed result, and the warnings, are pinned by golden files.
	js, _ := json.MarshalIndent(c, "", "  ")
	golden(t, "vpn.golden.json", append(js, '\n'))
	var dump bytes.Buffer
	Dump(&dump, c.Resources...)
	golden(t, "vpn.golden.dump", dump.Bytes())
	var warnings []string
	for _, w := range c.Warnings {
		warnings = append(warnings, w.String())
	}
	if got := strings.Join(warnings, "\n"); !strings.Contains(got, `testdata/vpn.conf:2:10: DRBD keyword "usage-count" is ignored`) ||
		!strings.Contains(got, "testdata/vpn.conf:22:3: device /dev/drbd0 is ignored") || len(warnings) != 2 {
		t.Errorf("warnings:\n%s", got)
	}
}

// TestDumpRoundTrip: what Dump writes parses back to the same resources.
func TestDumpRoundTrip(t *testing.T) {
	for _, name := range []string{"testdata/vpn.conf", "testdata/full.conf"} {
		c := load(t, name)
		var buf bytes.Buffer
		if err := Dump(&buf, c.Resources...); err != nil {
			t.Fatal(err)
		}
		c2, err := Parse(fstest.MapFS{"dump.conf": {Data: buf.Bytes()}}, "dump.conf", "")
		if err != nil {
			t.Fatalf("%s: the dump does not parse: %v\n%s", name, err, buf.String())
		}
		if len(c2.Resources) != len(c.Resources) {
			t.Fatalf("%s: %d resources back", name, len(c2.Resources))
		}
		for i := range c.Resources {
			a, b := *c.Resources[i], *c2.Resources[i]
			a.Pos, b.Pos = Pos{}, Pos{}
			for _, h := range append(a.Hosts, b.Hosts...) {
				h.Pos = Pos{}
			}
			if !reflect.DeepEqual(a, b) {
				ja, _ := json.MarshalIndent(a, "", " ")
				jb, _ := json.MarshalIndent(b, "", " ")
				t.Errorf("%s: resource %s differs after a round trip:\n%s\nvs\n%s", name, a.Name, ja, jb)
			}
		}
	}
}

func TestInheritanceAndForms(t *testing.T) {
	c := load(t, "testdata/full.conf")
	if len(c.Files) != 3 || len(c.Resources) != 2 {
		t.Fatalf("files %v, %d resources", c.Files, len(c.Resources))
	}
	r0, r1 := c.Resources[0], c.Resources[1]
	tests := []struct {
		name      string
		got, want any
	}{
		{"resource overrides common protocol", r0.Net.Protocol, ProtocolA},
		{"common protocol inherited", r1.Net.Protocol, ProtocolC},
		{"escapes in strings", r0.Net.SharedSecret, `a "quoted" secret\`},
		{"timeout in tenths", r1.Net.Timeout, 5 * time.Second},
		{"ping-timeout", r1.Net.PingTimeout, 700 * time.Millisecond},
		{"rate in KiB/s units", r1.Disk.ResyncRate, int64(40 << 20)},
		{"sectors unit", r1.Net.CongestionFill, int64(1 << 30)},
		{"sndbuf-size 512k", r0.Net.SndbufSize, int64(512 << 10)},
		{"md-flushes no", r0.Disk.MDFlushes, false},
		{"disk-flushes yes", r0.Disk.DiskFlushes, true},
		{"bare boolean", r1.Startup.WaitAfterSB, true},
		{"handler", r1.Handlers["split-brain"], "/usr/lib/nbdmirror/notify split-brain root"},
		{"internal meta-disk", r0.Hosts[0].MetaDisk, MetaDisk{Internal: true, Index: -1}},
		{"volume 0 and PATH [N]", *r0.Hosts[1], Host{Names: []string{"beta"}, Pos: r0.Hosts[1].Pos, Device: "/dev/nbd3",
			Disk: "/dev/vg/r0", MetaDisk: MetaDisk{Path: "/dev/vg/md", Index: 2},
			Address: Address{Family: "ipv6", Host: "fd00::2", Port: 7789}}},
		{"resource-level disk", r1.Hosts[1].Disk, "/dev/sdb"},
		{"flexible external meta-disk", r1.Hosts[0].MetaDisk, MetaDisk{Path: "/dev/sdc", Index: -1}},
		{"two names, one node", r1.Hosts[0].Names, []string{"alpha", "beta-old"}},
		{"default al-extents overridden", r0.Disk.ALExtents, 3389},
	}
	for _, tc := range tests {
		if !reflect.DeepEqual(tc.got, tc.want) {
			t.Errorf("%s: %#v, want %#v", tc.name, tc.got, tc.want)
		}
	}
	if h, err := r1.Host("beta-old"); err != nil || h.Address.Port != 7790 {
		t.Errorf("host by its second name: %v", err)
	}
	if _, err := r1.Host("delta"); err == nil || !strings.Contains(err.Error(), "no 'on delta' section (its nodes: alpha, beta-old, gamma)") {
		t.Errorf("unknown node: %v", err)
	}
	if _, err := c.Resource("r9"); err == nil || !strings.Contains(err.Error(), "resources: r0, r1") {
		t.Errorf("unknown resource: %v", err)
	}
}

const base = `resource r0 { disk /dev/a; meta-disk internal; on a { address 10.0.0.1:7789; } on b { address 10.0.0.2:7789; } %s }
`

// TestErrors: every error names file, line and column and says what was
// expected.
func TestErrors(t *testing.T) {
	tests := []struct {
		name, src, want string
	}{
		{"unknown keyword", fmtBase(`net { frobnicate 1; }`), `c.conf:1:118: unknown keyword "frobnicate" in net section`},
		{"unknown top level", "frob { }", `c.conf:1:1: unknown top-level keyword "frob"`},
		{"missing semicolon", "resource r0 { disk /dev/a }", `c.conf:1:27: expected ";" to end "disk", found "}"`},
		{"unclosed section", "resource r0 {\n disk /dev/a;\n", `c.conf:1:1: section "resource" is not closed`},
		{"unterminated string", `resource r0 { net { shared-secret "abc`, `c.conf:1:35: unterminated string`},
		{"bad escape", `resource r0 { net { shared-secret "a\qb"; } }`, `c.conf:1:37: unknown escape \q`},
		{"bad size", fmtBase(`net { sndbuf-size 10X; }`), `c.conf:1:130: sndbuf-size "10X": expected a whole number`},
		{"size out of range", fmtBase(`net { sndbuf-size 1G; }`), `sndbuf-size 1G is out of range: it must lie between 0 and 128M`},
		{"rate out of range", fmtBase(`disk { resync-rate 8G; }`), `resync-rate 8G is out of range`},
		{"bad enum", fmtBase(`net { protocol D; }`), `protocol "D": expected one of A, B, C`},
		{"unsupported after-sb", fmtBase(`net { after-sb-0pri discard-local; }`), `after-sb-0pri "discard-local": expected one of disconnect, discard-zero-changes`},
		{"al-extents too small", fmtBase(`disk { al-extents 3; }`), `al-extents 3 is out of range: it must lie between 7 and 65534`},
		{"two values", fmtBase(`net { timeout 1 2; }`), `expected exactly one value after timeout, found 2`},
		{"three nodes", `resource r0 { disk /dev/a; meta-disk internal; on a { address 1.1.1.1:1; } on b { address 1.1.1.2:1; } on c { address 1.1.1.3:1; } }`,
			`resource r0 has 3 on sections`},
		{"missing address", `resource r0 { disk /dev/a; meta-disk internal; on a { } on b { address 1.1.1.2:1; } }`,
			`'on a' has no address`},
		{"same address", `resource r0 { disk /dev/a; meta-disk internal; on a { address 1.1.1.1:1; } on b { address 1.1.1.1:1; } }`,
			`both nodes have the address 1.1.1.1:1`},
		{"bad port", fmtBase(`on c { }`)[:0] + `resource r0 { disk /dev/a; meta-disk internal; on a { address 10.0.0.1:99999; } on b { address 10.0.0.2:1; } }`,
			`the port must be a number from 1 to 65535`},
		{"ipv6 without brackets", `resource r0 { disk /dev/a; meta-disk internal; on a { address ipv6 fd00::1:7789; } on b { address 10.0.0.2:1; } }`,
			`put an IPv6 address in brackets`},
		{"relative disk", `resource r0 { disk dev/a; meta-disk internal; on a { address 10.0.0.1:1; } on b { address 10.0.0.2:1; } }`,
			`disk "dev/a": expected an absolute path`},
		{"volume 1", fmtBase(`volume 1 { disk /dev/b; }`), `only volume 0 is supported`},
		{"two primaries", fmtBase(`net { allow-two-primaries; }`), `allow-two-primaries is not supported`},
		{"cram without secret", fmtBase(`net { cram-hmac-alg sha256; }`), `cram-hmac-alg needs a shared-secret`},
		{"timeout above ping-int", fmtBase(`net { timeout 100; }`), `timeout (10s) must be shorter than ping-int`},
		{"pull-ahead with C", fmtBase(`net { on-congestion pull-ahead; }`), `on-congestion pull-ahead needs protocol A`},
		{"partial TLS", fmtBase(`net { tls-cert /a; }`), `tls-cert, tls-key and tls-ca go together`},
		{"duplicate resource", fmtBase("") + fmtBase(""), `resource r0 is defined twice (first at c.conf:1:10)`},
		{"bad resource name", `resource "r 0" { }`, `resource name "r 0"`},
		{"include inside a section", `resource r0 { include "x"; }`, `include is allowed only at the top level`},
		{"include loop", `include "c.conf";`, `c.conf is included twice`},
		{"include missing file is fine, bad pattern is not", `include "[";`, `bad include pattern`},
		{"unknown handler", fmtBase(`handlers { frob "x"; }`), `unknown keyword "frob" in handlers section`},
		{"stray brace", `}`, `c.conf:1:1: unexpected "}"`},
		{"on in common", `common { on a { } }`, `on sections belong in a resource`},
		{"floating", fmtBase(`floating 1.2.3.4:1 { }`), `"floating" is not supported`},
		{"sdp", `resource r0 { disk /dev/a; meta-disk internal; on a { address sdp 10.0.0.1:1; } on b { address 10.0.0.2:1; } }`,
			`address family sdp is not supported`},
		{"become-primary-on unknown", fmtBase(`startup { become-primary-on zed; }`), `become-primary-on zed names no node`},
		{"c-min above c-max", fmtBase(`disk { c-min-rate 300M; }`), `c-min-rate (300M) is above c-max-rate (100M)`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(fstest.MapFS{"c.conf": {Data: []byte(tc.src)}}, "c.conf", "")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "c.conf:") {
				t.Errorf("error %q does not name the file, line and column", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is more than one line", err)
			}
		})
	}
}

func fmtBase(extra string) string { return strings.Replace(base, "%s", extra, 1) }

func TestParseSize(t *testing.T) {
	tests := []struct {
		text    string
		defUnit int64
		want    int64
		ok      bool
	}{
		{"250", unitKiB, 250 << 10, true},
		{"1M", unitKiB, 1 << 20, true},
		{"1m", unitKiB, 1 << 20, true},
		{"10G", unitByte, 10 << 30, true},
		{"500k", unitByte, 500 << 10, true},
		{"100", unitSector, 51200, true},
		{"100s", unitByte, 51200, true},
		{"2T", unitByte, 2 << 40, true},
		{"1.5M", unitKiB, 0, false},
		{"-1", unitKiB, 0, false},
		{"M", unitKiB, 0, false},
		{"9999999999999999999", unitByte, 0, false},
		{"9000000000000T", unitByte, 0, false},
	}
	for _, tc := range tests {
		got, err := parseSize(token{kind: tokWord, text: tc.text}, "x", tc.defUnit, 0, 1<<62)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q, %d) = %d, %v; want %d ok=%v", tc.text, tc.defUnit, got, err, tc.want, tc.ok)
		}
		if tc.ok {
			back, err := parseSize(token{text: formatSize(got, tc.defUnit)}, "x", tc.defUnit, 0, 1<<62)
			if err != nil || back != got {
				t.Errorf("formatSize(%d) = %q does not read back", got, formatSize(got, tc.defUnit))
			}
		}
	}
}

func TestLoadFromDisk(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/main.conf", []byte(`include "drbd.d/*.res";`), 0o644)
	os.MkdirAll(dir+"/drbd.d", 0o755)
	os.WriteFile(dir+"/drbd.d/r0.res", []byte(fmtBase("")), 0o644)
	c, err := Load(dir + "/main.conf")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Resources) != 1 || c.Files[1] != dir+"/drbd.d/r0.res" || c.Resources[0].Pos.File != dir+"/drbd.d/r0.res" {
		t.Fatalf("files %v, resource at %v", c.Files, c.Resources[0].Pos)
	}
	if _, err := Load(dir + "/missing.conf"); err == nil || !strings.Contains(err.Error(), "missing.conf") {
		t.Errorf("missing file: %v", err)
	}
	big := dir + "/big.conf"
	os.WriteFile(big, bytes.Repeat([]byte("#"), maxFileSize+1), 0o644)
	if _, err := Load(big); err == nil {
		t.Error("a file over 1 MiB was read")
	}
}
