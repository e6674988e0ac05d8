package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// offlineSetup writes a configuration with three resources (internal,
// external and indexed metadata) over files in a temporary directory.
func offlineSetup(t *testing.T) (dir, conf string) {
	dir = t.TempDir()
	for name, size := range map[string]int64{"d0": 64 << 20, "d1": 32 << 20, "m1": 2 << 20, "d2": 16 << 20, "m2": 3 * metadisk.IndexSlotSize} {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size)
		f.Close()
	}
	conf = filepath.Join(dir, "nbdmirror.conf")
	// Free ports, so that daemons of tests running at the same time can
	// listen for their (absent) peers.
	var ports [3]int
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		defer l.Close()
	}
	src := fmt.Sprintf(`
common { disk { al-extents 7; } }
resource r0 { disk %[1]s/d0; meta-disk internal;
  on alpha { address 127.0.0.1:%[2]d; } on beta { address 127.0.0.2:%[2]d; } }
resource r1 { disk %[1]s/d1; meta-disk %[1]s/m1;
  on alpha { address 127.0.0.1:%[3]d; } on beta { address 127.0.0.2:%[3]d; } }
resource r2 { disk %[1]s/d2; meta-disk %[1]s/m2[2];
  on alpha { address 127.0.0.1:%[4]d; } on beta { address 127.0.0.2:%[4]d; } }
`, dir, ports[0], ports[1], ports[2])
	if err := os.WriteFile(conf, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, conf
}

func TestOfflineVerbs(t *testing.T) {
	dir, conf := offlineSetup(t)
	g := []string{"--config", conf, "--node", "alpha"}
	run := func(args ...string) (int, string, string) { return runMain(t, append(g, args...)...) }

	code, out, errOut := run("create-md", "all")
	if code != 0 || strings.Count(out, "metadata created") != 3 || errOut != "" {
		t.Fatalf("create-md all: %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{"r0: metadata created on " + dir + "/d0 (internal,",
		"r1: metadata created on " + dir + "/m1 (external,", "r2: metadata created on " + dir + "/m2 (indexed slot 2,"} {
		if !strings.Contains(out, want) {
			t.Errorf("create-md output lacks %q:\n%s", want, out)
		}
	}
	code, _, errOut = run("create-md", "r1")
	if code != ExitRefused || !strings.Contains(errOut, "r1: metadata "+dir+"/m1 on "+dir+"/m1: metadisk: valid metadata already present") ||
		!strings.Contains(errOut, "use --force") || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("create-md over metadata: %d %q", code, errOut)
	}
	if code, _, _ := run("create-md", "--force", "r1"); code != 0 {
		t.Fatal("create-md --force failed")
	}

	// A writer marks blocks and dies without a clean shutdown.
	cfg, err := config.Load(conf)
	if err != nil {
		t.Fatal(err)
	}
	r0, _ := cfg.Resource("r0")
	host, _ := r0.Host("alpha")
	dev, err := replicator.OpenMetaDevice(host, true)
	if err != nil {
		t.Fatal(err)
	}
	meta, err := metadisk.Open(dev.File, dev.Layout, metadisk.Options{ALExtents: 7})
	if err != nil || meta.Activate() != nil {
		t.Fatal(err)
	}
	span, _ := meta.BeginWrite(8<<20, 4096)
	meta.MarkOutOfSync(8<<20, 4096)
	// While the writer holds the metadata, offline verbs are refused.
	code, _, errOut = run("apply-al", "r0")
	if code != ExitRefused || !strings.Contains(errOut, "is locked (is the daemon running with the resource up?)") {
		t.Fatalf("apply-al on metadata in use: %d %q", code, errOut)
	}
	meta.EndWrite(span)
	meta.Abandon()
	dev.Close() // the process "died"

	code, out, _ = run("dump-md", "r0")
	if code != 0 || !strings.Contains(out, "unclean: the activity log is not applied; run 'nbdmirror apply-al r0'") ||
		!strings.Contains(out, "transaction 2, 1 extents: 2") {
		t.Fatalf("dump-md of unclean metadata: %d\n%s", code, out)
	}
	code, out, _ = run("apply-al", "all")
	if code != 0 || !strings.Contains(out, "r0: activity log applied: 1 extents, 1024 blocks newly marked out of sync (1024 in all)") ||
		!strings.Contains(out, "r1: metadata is clean; nothing to apply") {
		t.Fatalf("apply-al: %d\n%s", code, out)
	}
	code, out, _ = run("dump-md", "--json", "r0")
	var d mdDump
	if code != 0 || json.Unmarshal([]byte(out), &d) != nil {
		t.Fatalf("dump-md --json: %d\n%s", code, out)
	}
	if d.Version != 1 || !d.Clean || d.Bitmap.BitsSet != bitmap.ExtentBlocks || d.UUIDs.Current != "0000000000000004" ||
		d.Metadata.Kind != "internal" || d.DataSize%4096 != 0 || len(d.AL.Extents) != 0 {
		t.Errorf("dump-md --json after apply-al: %+v", d)
	}

	// Corrupt both superblocks of r2: a clear refusal naming the remedy.
	f, _ := os.OpenFile(filepath.Join(dir, "m2"), os.O_RDWR, 0)
	f.WriteAt([]byte("garbage"), 2*metadisk.IndexSlotSize+100)
	f.WriteAt([]byte("garbage"), 2*metadisk.IndexSlotSize+4096+100)
	f.Close()
	code, _, errOut = run("dump-md", "r2")
	if code != ExitFailed || !strings.Contains(errOut, "r2: metadata "+dir+"/m2[2] on "+dir+"/m2:") ||
		!strings.Contains(errOut, "both superblock slots are unreadable") ||
		!strings.Contains(errOut, "'nbdmirror create-md --force r2'") {
		t.Errorf("dump-md of corrupt metadata: %d %q", code, errOut)
	}
	// A grown disk: the metadata still covers the size agreed before (a
	// resize uses the rest); a shrunk one no longer matches.
	os.Truncate(filepath.Join(dir, "d1"), 64<<20)
	code, out, errOut = run("dump-md", "--json", "r1")
	if code != 0 || json.Unmarshal([]byte(out), &d) != nil || d.DataSize != 32<<20 {
		t.Errorf("dump-md after the disk grew: %d %q %q", code, out, errOut)
	}
	os.Truncate(filepath.Join(dir, "d1"), 16<<20)
	code, _, errOut = run("dump-md", "r1")
	if code != ExitFailed || !strings.Contains(errOut, "the disk shrank") {
		t.Errorf("dump-md after the disk shrank: %d %q", code, errOut)
	}
}

func TestOfflineVerbs_Errors(t *testing.T) {
	dir, conf := offlineSetup(t)
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--config", dir + "/nope.conf", "dump"}, ExitConfigInvalid, "nope.conf"},
		{[]string{"--config", conf, "--node", "gamma", "create-md", "r0"}, ExitConfigInvalid, "resource r0 has no 'on gamma' section"},
		{[]string{"--config", conf, "--node", "alpha", "create-md", "r7"}, ExitConfigInvalid, `no resource "r7"`},
		{[]string{"--config", conf, "--node", "alpha", "create-md"}, ExitUsage, "expected one resource name or all"},
		{[]string{"--config", conf, "--node", "alpha", "dump-md", "all"}, ExitUsage, "name one resource, not all"},
		{[]string{"--config", conf, "--node", "alpha", "dump-md", "r0"}, ExitFailed, "r0: metadata internal on " + dir + "/d0: no nbdmirror metadata found: create it with 'nbdmirror create-md r0'"},
	}
	for _, tc := range tests {
		code, _, errOut := runMain(t, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) || strings.Count(errOut, "\n") != 1 {
			t.Errorf("%v: exit %d %q; want %d and %q in one line", tc.args, code, errOut, tc.code, tc.msg)
		}
	}
	// A metadata device too small for its data.
	os.Truncate(dir+"/m1", 4096)
	code, _, errOut := runMain(t, "--config", conf, "--node", "alpha", "create-md", "r1")
	if code != ExitFailed || !strings.Contains(errOut, "device too small") {
		t.Errorf("create-md on a small device: %d %q", code, errOut)
	}
}

func TestDumpVerb(t *testing.T) {
	_, conf := offlineSetup(t)
	code, out, _ := runMain(t, "--config", conf, "dump", "r1")
	if code != 0 || !strings.Contains(out, "resource r1 {") || strings.Contains(out, "resource r0") ||
		!strings.Contains(out, "al-extents            7;") {
		t.Fatalf("dump r1: %d\n%s", code, out)
	}
	// The dump is a configuration file itself.
	path := filepath.Join(t.TempDir(), "again.conf")
	os.WriteFile(path, []byte(out), 0o644)
	if code, _, errOut := runMain(t, "--config", path, "dump"); code != 0 {
		t.Fatalf("the dump does not load: %s", errOut)
	}
}
