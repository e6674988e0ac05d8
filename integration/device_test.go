//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDaemon_KernelDevice: with `device /dev/nbd0;` in the resource,
// `primary` attaches the kernel device, `secondary` is refused while it is
// mounted and detaches it afterwards. This machine kind may have no nbd
// module: that, and only that, makes the test skip, saying so.
func TestDaemon_KernelDevice(t *testing.T) {
	needRoot(t)
	need(t, "mkfs.ext4", "mount", "umount")
	const dev = "/dev/nbd0"
	if _, err := os.Stat(dev); err != nil {
		exec.Command("modprobe", "nbd").Run()
	}
	if _, err := os.Stat(dev); err != nil {
		t.Skipf("skipped: this kernel has no nbd module (%s missing after 'modprobe nbd'); "+
			"the daemon's kernel device is tested only where /dev/nbdN exists", dev)
	}
	dir := t.TempDir()
	disk := sparseFile(t, dir, "d0", 128*mib)
	conf := filepath.Join(dir, "nbdmirror.conf")
	src := fmt.Sprintf(`resource r0 { device %s; disk %s; meta-disk internal;
  on alpha { address 127.0.0.1:%d; } on beta { address 127.0.0.2:%[3]d; } }`, dev, disk, freePort(t))
	if err := os.WriteFile(conf, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	runDir := filepath.Join(dir, "run")
	g := []string{"--config", conf, "--node", "alpha", "--run-dir", runDir}
	cli := func(args ...string) (string, error) {
		return tryRun(time.Minute, binary, append(g, args...)...)
	}
	if out, err := cli("create-md", "r0"); err != nil {
		t.Fatalf("create-md: %v\n%s", err, out)
	}
	d := start(t, binary, append(g, "daemon", "--up", "r0")...)
	waitUnix(t, d, filepath.Join(runDir, "control.sock"))
	if out, err := cli("primary", "--force", "r0"); err != nil {
		t.Fatalf("primary --force: %v\n%s", err, out)
	}
	t.Cleanup(func() { cli("secondary", "r0") })
	size := strings.TrimSpace(run(t, time.Minute, "blockdev", "--getsize64", dev))
	if size == "0" {
		t.Fatalf("%s has size 0 after primary", dev)
	}
	run(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", dev)
	mnt := filepath.Join(dir, "mnt")
	os.MkdirAll(mnt, 0o755)
	run(t, time.Minute, "mount", dev, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	})
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("through the kernel device"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, time.Minute, "sync")
	out, err := cli("secondary", "r0")
	if err == nil || !strings.Contains(out, "(-12) Device is held open by someone") || !strings.Contains(out, dev+" (mounted or in use)") {
		t.Fatalf("secondary while mounted: %v\n%s", err, out)
	}
	run(t, time.Minute, "umount", mnt)
	mounted = false
	if out, err := cli("secondary", "r0"); err != nil {
		t.Fatalf("secondary after umount: %v\n%s", err, out)
	}
	if size := strings.TrimSpace(run(t, time.Minute, "blockdev", "--getsize64", dev)); size != "0" {
		t.Errorf("%s still has size %s after secondary", dev, size)
	}
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("daemon exit: %v", err)
	}
}
