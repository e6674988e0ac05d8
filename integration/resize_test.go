//go:build integration

package integration

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nbdSize is the export size an NBD client sees at connect (nbdinfo --size).
func (n *rnode) nbdSize() int64 {
	n.t.Helper()
	out := run(n.t, time.Minute, "nbdinfo", "--size", n.uri())
	v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		n.t.Fatalf("%s: nbdinfo --size: %q", n.name, out)
	}
	return v
}

// TestResize_Online (issue #7 item 6): both backing files grow, `resize` on
// the Primary agrees the new size with the peer (internal metadata moves to
// the new ends), the new area is resynced, a new NBD client sees the new
// size, a write lands in the new area, and the disks are equal; shrinking
// below an ext4 filesystem is refused with one line, and the size stays.
func TestResize_Online(t *testing.T) {
	need(t, "mkfs.ext4", "nbdcopy")
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	old := c.dataSize
	if got := c.alpha.nbdSize(); got != old {
		t.Fatalf("nbdinfo --size %d before the resize, status says %d", got, old)
	}
	head := make([]byte, mib)
	rand.Read(head)
	c.alpha.writeAt(0, head)

	// Nothing to grow yet: said so, exit 0.
	if out := c.alpha.must("resize", "r0"); !strings.Contains(out, "the size stays") {
		t.Fatalf("resize before the disks grew: %q", out)
	}
	for _, n := range c.nodes() {
		if err := os.Truncate(n.disk, 96*mib); err != nil {
			t.Fatal(err)
		}
	}
	out := c.alpha.must("resize", "r0")
	if !strings.Contains(out, "resized from") || strings.Count(out, "\n") != 1 {
		t.Fatalf("resize: %q", out)
	}
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	size := c.alpha.status().SizeBytes
	if size <= old+16*mib || c.beta.status().SizeBytes != size {
		t.Fatalf("sizes after the resize: alpha %d, beta %d (was %d)", size, c.beta.status().SizeBytes, old)
	}
	if got := c.alpha.nbdSize(); got != size {
		t.Fatalf("nbdinfo --size %d after the resize, want %d", got, size)
	}
	// The new area, and only it, is resynced (the old internal metadata
	// lies in it).
	if rs := c.alpha.resyncStarts("SyncSource"); len(rs) == 0 || rs[len(rs)-1] != uint64(size-old) {
		t.Fatalf("resyncs after the resize: %v bytes, want the %d of the new area last", rs, size-old)
	}
	tailData := make([]byte, mib)
	rand.Read(tailData)
	c.alpha.writeAt(size-mib, tailData)
	c.dataSize = size
	c.sameData()

	// An ext4 filesystem of 80 MiB, written through the export.
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 80*mib); err != nil {
		t.Fatal(err)
	}
	run(t, time.Minute, "mkfs.ext4", "-q", "-F", img)
	run(t, 2*time.Minute, "nbdcopy", "--flush", img, c.alpha.uri())
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"resize", "--size", "64M", "r0"}, "--allow-shrink"},
		{[]string{"resize", "--size", "64M", "--allow-shrink", "r0"}, "shrinking below the filesystem is refused"},
	} {
		code, out, errOut := c.alpha.cli(tc.args...)
		if code != 20 || out != "" || !strings.Contains(errOut, tc.want) || strings.Count(errOut, "\n") != 1 {
			t.Fatalf("%v: exit %d, %q %q; want exit 20 and one line saying %q", tc.args, code, out, errOut, tc.want)
		}
	}
	if got := c.alpha.nbdSize(); got != size {
		t.Fatalf("a refused shrink changed the size to %d", got)
	}
	c.alpha.demote()
	c.sameData()

	// adjust: a live key, a key for the next connect, one for down/up.
	conf := strings.NewReplacer("resync-rate 500M", "resync-rate 100M", "protocol C;", "protocol C; timeout 30;",
		"c-plan-ahead 0;", "c-plan-ahead 0; al-extents 257;").Replace(c.resourceConf)
	if err := os.WriteFile(c.alpha.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	out = c.alpha.must("adjust", "r0")
	for _, want := range []string{"r0: resync-rate 524288000 -> 104857600 (applied now)\n",
		"r0: timeout 6s -> 3s (at the next connect (disconnect; connect))\n", "r0: al-extents 1237 -> 257 (needs down/up)\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("adjust printed:\n%s\nwithout %q", out, want)
		}
	}
	// Again: only the key that waits for down/up is still different.
	if out := c.alpha.must("adjust", "r0"); out != "r0: al-extents 1237 -> 257 (needs down/up)\n" {
		t.Errorf("adjust again: %q", out)
	}
}

// TestResize_Disconnected: the Primary resizes while the peer is
// disconnected (only with --assume-peer-has-space), writes into the new
// area, and the peer takes the new size and the new area at its next
// connect.
func TestResize_Disconnected(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	old := c.dataSize
	c.beta.must("disconnect", "r0")
	c.alpha.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	for _, n := range c.nodes() {
		if err := os.Truncate(n.disk, 96*mib); err != nil {
			t.Fatal(err)
		}
	}
	code, out, errOut := c.alpha.cli("resize", "r0")
	if code != 20 || out != "" || !strings.Contains(errOut, "--assume-peer-has-space") || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("resize without the peer: exit %d, %q %q", code, out, errOut)
	}
	if out := c.alpha.must("resize", "--assume-peer-has-space", "r0"); !strings.Contains(out, "next connect") {
		t.Fatalf("resize --assume-peer-has-space: %q", out)
	}
	size := c.alpha.status().SizeBytes
	if size <= old || c.alpha.nbdSize() != size {
		t.Fatalf("alpha after the resize: status %d, nbdinfo %d (was %d)", size, c.alpha.nbdSize(), old)
	}
	data := make([]byte, mib)
	rand.Read(data)
	c.alpha.writeAt(size-mib, data)
	c.beta.must("connect", "r0")
	c.beta.must("wait-connect", "--timeout", "60s", "r0")
	c.beta.must("wait-sync", "--timeout", "2m", "r0")
	c.beta.waitState(time.Minute, "Connected", "UpToDate", "UpToDate")
	if got := c.beta.status().SizeBytes; got != size {
		t.Fatalf("beta after the connect: %d bytes, want %d", got, size)
	}
	// The new area (with the write in it), and only it, is resynced.
	if rs := c.alpha.resyncStarts("SyncSource"); len(rs) == 0 || rs[len(rs)-1] != uint64(size-old) {
		t.Fatalf("resyncs after the connect: %v bytes, want the %d of the new area last", rs, size-old)
	}
	c.alpha.demote()
	c.dataSize = size
	c.sameData()
}

// TestResize_ConnectKeepsData: the Primary grows alone
// (--assume-peer-has-space), writes past the old end and is demoted; the
// peer, whose disk did not grow, connects: the node holding the data
// refuses ("The peer's disk size is too small!") instead of cutting its
// device to the peer's disk, and after a down/up it still has its size and
// the data written past the old end.
func TestResize_ConnectKeepsData(t *testing.T) {
	c := newCluster(t, 64*mib, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 500M; }")
	c.initialSync()
	old := c.dataSize
	c.beta.must("disconnect", "r0")
	c.alpha.waitState(time.Minute, "WFConnection", "UpToDate", "DUnknown")
	if err := os.Truncate(c.alpha.disk, 96*mib); err != nil {
		t.Fatal(err)
	}
	c.alpha.must("resize", "--assume-peer-has-space", "r0")
	size := c.alpha.status().SizeBytes
	if size <= old {
		t.Fatalf("alpha after the resize: %d bytes (was %d)", size, old)
	}
	data := make([]byte, mib)
	rand.Read(data)
	c.alpha.writeAt(size-mib, data)
	c.alpha.demote()
	c.beta.must("connect", "r0")
	c.alpha.waitState(time.Minute, "StandAlone", "", "")
	if !strings.Contains(c.alpha.d.out.String(), "The peer's disk size is too small!") {
		t.Fatal("alpha's log does not say why it refused the peer")
	}
	if got := c.alpha.status().SizeBytes; got != size {
		t.Fatalf("alpha after the refused connect: %d bytes, want %d", got, size)
	}
	c.alpha.must("down", "r0")
	c.alpha.must("up", "r0")
	if got := c.alpha.status().SizeBytes; got != size {
		t.Fatalf("alpha after down/up: %d bytes, want %d", got, size)
	}
	f, err := os.Open(c.alpha.disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, mib)
	if _, err := f.ReadAt(got, size-mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the data written past the old end is gone")
	}
}
