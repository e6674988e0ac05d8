package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDeviceHolders: a loop device is free, then open by another process,
// then mounted; each holder is named. Needs root and losetup.
func TestDeviceHolders(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("NBDMIRROR_REQUIRE_E2E") == "1" {
			t.Fatal("needs root (NBDMIRROR_REQUIRE_E2E=1 forbids skipping)")
		}
		t.Skip("skipped: needs root for a loop device")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 32<<20)
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if h := deviceHolders(loop); len(h) != 0 {
		t.Fatalf("a free device held by %v", h)
	}
	if h := deviceHolders(img); h != nil {
		t.Fatalf("a regular file has holders %v", h)
	}

	// Another process holds it open (a plain open, not exclusive).
	holder := exec.Command("sh", "-c", "exec 3<"+loop+"; exec sleep 60")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	want := loop + " open by sleep (pid " + strconv.Itoa(holder.Process.Pid) + ")"
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(deviceHolders(loop), want) {
		if time.Now().After(deadline) {
			t.Fatalf("holders %v, want %q", deviceHolders(loop), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	holder.Process.Kill()
	holder.Wait()

	if out, err := exec.Command("mkfs.ext4", "-q", "-F", loop).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", loop, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	if h := deviceHolders(loop); !slices.Contains(h, loop+" mounted on "+mnt) {
		t.Fatalf("mounted device: holders %v", h)
	}
}
