//go:build integration

package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const mib = 1 << 20

func TestServe_Nbdinfo(t *testing.T) {
	need(t, "nbdinfo")
	dir := t.TempDir()
	img := sparseFile(t, dir, "disk.img", 64*mib)
	_, rw := serve(t, img, "rw")
	_, ro := serve(t, img, "ro", "--read-only", "--description", "a read-only view")
	tests := []struct {
		uri  string
		want map[string]any
	}{
		{rw, map[string]any{"export-size": 64.0 * mib, "is_read_only": false, "can_flush": true, "can_fua": true,
			"can_trim": true, "can_zero": true, "can_multi_conn": true, "can_cache": false, "can_df": false,
			"block_size_minimum": 1.0, "block_size_preferred": 4096.0, "block_size_maximum": 32.0 * mib}},
		{ro, map[string]any{"export-size": 64.0 * mib, "is_read_only": true, "can_flush": true,
			"description": "a read-only view"}},
	}
	for _, tc := range tests {
		var info struct {
			Protocol string           `json:"protocol"`
			Exports  []map[string]any `json:"exports"`
		}
		out := run(t, time.Minute, "nbdinfo", "--json", tc.uri)
		if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
			t.Fatalf("nbdinfo --json: %v\n%s", err, out)
		}
		if info.Protocol != "newstyle-fixed" {
			t.Errorf("protocol %q", info.Protocol)
		}
		for k, v := range tc.want {
			if got := info.Exports[0][k]; got != v {
				t.Errorf("%s: %s = %v, want %v", tc.uri, k, got, v)
			}
		}
	}
	// nbdinfo --list sees the one export, by name.
	out := run(t, time.Minute, "nbdinfo", "--list", "--json", strings.Replace(rw, "/rw?", "/?", 1))
	if !strings.Contains(out, `"export-name": "rw"`) {
		t.Errorf("nbdinfo --list:\n%s", out)
	}
}

func TestServe_QemuIO(t *testing.T) {
	need(t, "qemu-io")
	img := sparseFile(t, t.TempDir(), "disk.img", 64*mib)
	_, uri := serve(t, img, "disk")
	out := run(t, 2*time.Minute, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
		"-c", "aio_write -P 0xcd 1M 64k", "-c", "aio_flush", "-c", "read -P 0xcd 1M 64k",
		"-c", "write -z 3M 1M", "-c", "read -P 0 3M 1M",
		"-c", "write -P 0x11 4M 1M", "-c", "discard 4M 1M",
		"-c", "write -f -P 0xee 0 4k", "-c", "read -P 0xee 0 4k", "-c", "flush",
		"-c", "readv -P 0xab 8k 4k 4k", "-c", "write -z -u 6M 64k", "-c", "read -P 0 6M 64k")
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if n := strings.Count(out, "read "); n < 6 {
		t.Fatalf("qemu-io ran %d reads:\n%s", n, out)
	}
}

// randomImage writes a file of random data with zero and hole regions.
func randomImage(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, mib)
	for off := int64(0); off < size; off += mib {
		switch (off / mib) % 5 {
		case 1: // a hole
			continue
		case 3: // explicit zeroes
			clear(buf)
		default:
			rand.Read(buf)
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func TestServe_QemuImgConvertCompare(t *testing.T) {
	need(t, "qemu-img")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	randomImage(t, src, 64*mib)
	img := sparseFile(t, dir, "disk.img", 64*mib)
	_, uri := serve(t, img, "disk")
	run(t, 2*time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", "-m", "16", src, uri)
	out := run(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
}

func TestServe_NbdcopyRoundTrip(t *testing.T) {
	need(t, "nbdcopy")
	dir := t.TempDir()
	src, back := filepath.Join(dir, "src.img"), filepath.Join(dir, "back.img")
	randomImage(t, src, 64*mib)
	img := sparseFile(t, dir, "disk.img", 64*mib)
	_, uri := serve(t, img, "disk")
	run(t, 2*time.Minute, "nbdcopy", "--flush", "-C", "4", "-R", "64", src, uri)
	run(t, 2*time.Minute, "nbdcopy", "-C", "4", uri, back)
	if a, b := fileHash(t, src), fileHash(t, back); a != b {
		t.Fatalf("round trip changed the data: %s != %s", a, b)
	}
	if a, b := fileHash(t, src), fileHash(t, img); a != b {
		t.Fatalf("the served file differs from the source")
	}
}

func fileHash(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

func TestServe_FioVerify(t *testing.T) {
	need(t, "fio")
	img := sparseFile(t, t.TempDir(), "disk.img", 64*mib)
	_, uri := serve(t, img, "disk")
	for _, job := range [][]string{
		{"--rw=randwrite", "--bs=4k", "--iodepth=32"},
		{"--rw=write", "--bs=1M", "--iodepth=8"},
		{"--rw=randwrite", "--bsrange=512-128k", "--iodepth=16", "--fsync=8"},
	} {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + uri, "--size=32M",
			"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randseed=4242", "--verify_state_save=0"}, job...)
		out := run(t, 3*time.Minute, "fio", args...)
		if !strings.Contains(out, "err= 0") {
			t.Fatalf("fio %v:\n%s", job, out)
		}
	}
}

// TestServe_LibnbdEdgeCases runs integration/testdata/edges.py: bad requests
// through libnbd with strict mode off each get the spec's errno, and the
// connection stays usable after each.
func TestServe_LibnbdEdgeCases(t *testing.T) {
	need(t, "/usr/bin/python3")
	if err := exec.Command("/usr/bin/python3", "-c", "import sys; sys.path.insert(0, '/usr/lib/python3/dist-packages'); import nbd").Run(); err != nil {
		unavailable(t, "needs python3-libnbd")
	}
	img := sparseFile(t, t.TempDir(), "disk.img", 64*mib)
	_, rw := serve(t, img, "rw")
	_, ro := serve(t, img, "ro", "--read-only")
	out := run(t, 2*time.Minute, "/usr/bin/python3", "testdata/edges.py", rw, ro)
	var got map[string]int
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("edges.py: %v\n%s", err, out)
	}
	const (
		eperm  = int(syscall.EPERM)
		einval = int(syscall.EINVAL)
		enospc = int(syscall.ENOSPC)
	)
	want := map[string]int{
		"read straddling the end": einval, "read past the end": einval, "read at 2^63-512": einval,
		"write straddling the end": enospc, "trim past the end": einval, "zero past the end": enospc,
		"unknown command flag": einval, "NO_HOLE on read": einval, "FAST_ZERO not advertised": einval,
		"CACHE not advertised": einval, "33 MiB read": einval, "33 MiB write": einval,
		"zero-length read": 0, "FUA write": 0, "flush": 0, "FUA trim": 0,
		"write zeroes reads back zero": 0, "write zeroes NO_HOLE reads back zero": 0,
		"64 queued reads": 0, "multi-conn advertised": 0, "flush covers other connections": 0,
		"read-only advertised": 0, "read-only write": eperm, "read-only trim": eperm, "read-only zero": eperm,
		"read-only flush": 0,
	}
	for name, errno := range want {
		if g, ok := got[name]; !ok || g != errno {
			t.Errorf("%s: errno %d (present %v), want %d", name, g, ok, errno)
		}
		if u, ok := got[name+"/usable"]; !strings.Contains(name, "advertised") && (!ok || u != 0) {
			t.Errorf("%s: connection not usable afterwards (errno %d)", name, u)
		}
	}
}

// TestServe_Ext4 puts a real file system on the export through nbdfuse and
// a loop device, copies files in, drops the caches, compares and fscks.
func TestServe_Ext4(t *testing.T) {
	needRoot(t)
	need(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	dir := t.TempDir()
	img := sparseFile(t, dir, "disk.img", 256*mib)
	_, uri := serve(t, img, "disk")
	loop, fs := mountExt4(t, dir, uri, true)

	src := filepath.Join(dir, "payload.bin")
	randomImage(t, src, 40*mib)
	run(t, time.Minute, "cp", src, filepath.Join(fs, "payload.bin"))
	for i := range 200 {
		sub := filepath.Join(fs, "tree", fmt.Sprint(i%10))
		os.MkdirAll(sub, 0o755)
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%d", i)), bytes.Repeat([]byte{byte(i)}, i*37), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run(t, time.Minute, "sync")
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	if a, b := fileHash(t, src), fileHash(t, filepath.Join(fs, "payload.bin")); a != b {
		t.Fatal("file read back through ext4 differs")
	}
	for i := range 200 {
		got, err := os.ReadFile(filepath.Join(fs, "tree", fmt.Sprint(i%10), fmt.Sprintf("f%d", i)))
		if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{byte(i)}, i*37)) {
			t.Fatalf("file %d: %v", i, err)
		}
	}
	run(t, time.Minute, "umount", fs)
	if out, err := tryRun(2*time.Minute, "e2fsck", "-fn", loop); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
}

// mountExt4 exposes uri as a file with nbdfuse, attaches a loop device to it,
// optionally makes an ext4 file system and mounts it. Everything is undone
// when the test ends, in reverse order, even if it fails.
func mountExt4(t *testing.T, dir, uri string, mkfs bool) (loop, mnt string) {
	t.Helper()
	fuseDir, mnt := filepath.Join(dir, "fuse"), filepath.Join(dir, "mnt")
	os.MkdirAll(fuseDir, 0o755)
	os.MkdirAll(mnt, 0o755)
	fuse := start(t, "nbdfuse", filepath.Join(fuseDir, "disk"), uri)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if fi, err := os.Stat(filepath.Join(fuseDir, "disk")); err == nil && fi.Size() > 0 {
			break
		}
		if fuse.exited() || time.Now().After(deadline) {
			t.Fatalf("nbdfuse did not come up: %v\n%s", fuse.err, fuse.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", fuseDir).Run()
		select {
		case <-fuse.done:
		case <-time.After(10 * time.Second):
		}
	})
	loop = strings.TrimSpace(run(t, time.Minute, "losetup", "-f", "--show", filepath.Join(fuseDir, "disk")))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if mkfs {
		run(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", loop)
	}
	run(t, time.Minute, "mount", loop, mnt)
	t.Cleanup(func() {
		if err := exec.Command("umount", mnt).Run(); err == nil {
			return
		}
		exec.Command("umount", "-l", mnt).Run()
	})
	return loop, mnt
}

func TestServe_CommandLine(t *testing.T) {
	dir := t.TempDir()
	img := sparseFile(t, dir, "disk.img", mib)
	tests := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"no file", []string{"serve"}, 1, "nbdmirror serve: --file is required"},
		{"unknown flag", []string{"serve", "--bogus"}, 1, "flag provided but not defined: -bogus"},
		{"missing file", []string{"serve", "--file", filepath.Join(dir, "nope")}, 3, "no such file"},
		{"directory", []string{"serve", "--file", dir}, 3, "is a directory"},
		{"character device", []string{"serve", "--file", "/dev/null"}, 3, "neither a regular file nor a block device"},
		{"bad listen", []string{"serve", "--file", img, "--listen", "nonsense"}, 3, "want unix:PATH or HOST:PORT"},
		{"stray argument", []string{"serve", "--file", img, "extra"}, 1, "unexpected argument"},
		{"bad log level", []string{"--log-level", "loud", "serve", "--file", img, "--listen", "unix:" + dir + "/s"}, 1, "--log-level"},
		{"unknown verb", []string{"frobnicate"}, 1, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(binary, tc.args...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != tc.code {
				t.Fatalf("exit %v, want %d\n%s", err, tc.code, out)
			}
			if !strings.Contains(string(out), tc.msg) {
				t.Errorf("output %q lacks %q", out, tc.msg)
			}
			if lines := strings.Count(strings.TrimSpace(string(out)), "\n"); lines != 0 {
				t.Errorf("error is %d lines, want one:\n%s", lines+1, out)
			}
		})
	}
}

// TestServe_SignalsAndSocketReuse: SIGTERM stops the server gracefully (exit
// 0, the socket removed); a second server refuses a live socket and takes
// over one left behind by a killed server.
func TestServe_SignalsAndSocketReuse(t *testing.T) {
	dir := t.TempDir()
	img := sparseFile(t, dir, "disk.img", mib)
	sock := filepath.Join(dir, "s.sock")
	a := start(t, binary, "serve", "--file", img, "--listen", "unix:"+sock)
	waitUnix(t, a, sock)
	b := start(t, binary, "serve", "--file", img, "--listen", "unix:"+sock)
	if err := b.wait(30 * time.Second); err == nil || !strings.Contains(b.out.String(), "another server is listening") {
		t.Fatalf("second server on a live socket: %v\n%s", err, b.out)
	}
	if err := a.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, a.out)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after a graceful stop: %v", err)
	}
	c := start(t, binary, "serve", "--file", img, "--listen", "unix:"+sock)
	waitUnix(t, c, sock)
	c.stop(syscall.SIGKILL)
	d := start(t, binary, "serve", "--file", img, "--listen", "unix:"+sock)
	waitUnix(t, d, sock)
	if err := d.stop(syscall.SIGINT); err != nil {
		t.Fatalf("SIGINT: %v", err)
	}
}

// TestServe_BlockDevice exports a block device (a loop device over a file):
// its size comes from the device, and writes, discards and write-zeroes
// reach it.
func TestServe_BlockDevice(t *testing.T) {
	needRoot(t)
	need(t, "losetup", "qemu-io", "nbdinfo")
	dir := t.TempDir()
	backing := sparseFile(t, dir, "backing.img", 48*mib)
	loop := strings.TrimSpace(run(t, time.Minute, "losetup", "-f", "--show", backing))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	_, uri := serve(t, loop, "blk")
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(run(t, time.Minute, "nbdinfo", "--json", uri)), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %v", err)
	}
	if size := info.Exports[0]["export-size"]; size != 48.0*mib {
		t.Fatalf("export size %v, want the device's 48 MiB", size)
	}
	out := run(t, 2*time.Minute, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0x5a 0 2M", "-c", "write -f -P 0x6b 2M 64k", "-c", "flush",
		"-c", "write -z 1M 64k", "-c", "write -z -u 1536k 64k", "-c", "discard 4M 1M",
		"-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 64k", "-c", "read -P 0 1536k 64k", "-c", "read -P 0x6b 2M 64k")
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io on a block device:\n%s", out)
	}
	// The writes are on the device (read back through the backing file).
	run(t, time.Minute, "sync")
	f, err := os.Open(backing)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for off, want := range map[int64]byte{0: 0x5a, 1 << 20: 0, 2 << 20: 0x6b} {
		if _, err := f.ReadAt(buf, off); err != nil || buf[0] != want || buf[4095] != want {
			t.Errorf("backing file at %d holds %#x, want %#x (%v)", off, buf[0], want, err)
		}
	}
}
