package blockdev

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/nbdmirror/nbdmirror/internal/pagecache"
	"golang.org/x/sys/unix"
)

func newFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDevice_ReadWrite(t *testing.T) {
	path := newFile(t, 1<<20)
	d, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 1<<20 || d.IsBlockDevice() {
		t.Fatalf("size %d block %v", d.Size(), d.IsBlockDevice())
	}
	data := bytes.Repeat([]byte{0xab}, 8192)
	for _, fua := range []bool{false, true} {
		if err := d.WriteAt(data, 4096, fua); err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 8192)
	if n, err := d.ReadAt(got, 4096); err != nil || n != 8192 || !bytes.Equal(got, data) {
		t.Fatalf("read back: %d %v", n, err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestDevice_NeverLeavesTheDevice(t *testing.T) {
	path := newFile(t, 1<<20)
	d, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	end := d.Size()
	tests := []struct {
		name string
		op   func() error
	}{
		{"write past the end", func() error { return d.WriteAt(make([]byte, 2), end-1, false) }},
		{"write at the end", func() error { return d.WriteAt(make([]byte, 1), end, false) }},
		{"negative offset", func() error { return d.WriteAt(make([]byte, 1), -1, false) }},
		{"read past the end", func() error { _, err := d.ReadAt(make([]byte, 2), end-1); return err }},
		{"trim past the end", func() error { return d.Trim(end-4096, 8192, false) }},
		{"zeroes past the end", func() error { return d.WriteZeroes(end, 1, true, false) }},
		{"huge length", func() error { return d.WriteZeroes(4096, 1<<62, false, false) }},
	}
	for _, tc := range tests {
		err := tc.op()
		if !errors.Is(err, ErrOutOfRange) || !errors.Is(err, syscall.EINVAL) {
			t.Errorf("%s: %v, want ErrOutOfRange", tc.name, err)
		}
	}
	if fi, _ := os.Stat(path); fi.Size() != end {
		t.Fatalf("file grew to %d", fi.Size())
	}
}

func TestDevice_TrimAndZeroes(t *testing.T) {
	path := newFile(t, 4<<20)
	d, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.WriteAt(bytes.Repeat([]byte{1}, 4<<20), 0, true); err != nil {
		t.Fatal(err)
	}
	full := allocated(t, path)
	if err := d.Trim(0, 1<<19, true); err != nil {
		t.Fatal(err)
	}
	if a := allocated(t, path); a > full-1<<19 {
		t.Errorf("trim freed nothing: %d of %d bytes still allocated", a, full)
	}
	tests := []struct {
		name    string
		off, n  int64
		noHole  bool
		wantLen int64 // bytes that must read as zero from off
	}{
		{"punch aligned", 1 << 20, 64 << 10, false, 64 << 10},
		{"punch unaligned", 2<<20 + 100, 5000, false, 5000},
		{"no hole", 3 << 20, 128 << 10, true, 128 << 10},
		{"no hole unaligned", 3<<20 + 200<<10 + 7, 10, true, 10},
	}
	for _, tc := range tests {
		before := allocated(t, path)
		if err := d.WriteZeroes(tc.off, tc.n, tc.noHole, false); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		buf := make([]byte, tc.n+2)
		if _, err := d.ReadAt(buf, tc.off-1); err != nil {
			t.Fatal(err)
		}
		if buf[0] != 1 || buf[len(buf)-1] != 1 || !bytes.Equal(buf[1:len(buf)-1], make([]byte, tc.n)) {
			t.Errorf("%s: range not zeroed exactly", tc.name)
		}
		if tc.noHole && allocated(t, path) < before {
			t.Errorf("%s: NO_HOLE deallocated blocks", tc.name)
		}
	}
}

func TestDevice_ReadOnly(t *testing.T) {
	path := newFile(t, 1<<20)
	d, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for name, err := range map[string]error{
		"write":  d.WriteAt([]byte{1}, 0, false),
		"trim":   d.Trim(0, 4096, false),
		"zeroes": d.WriteZeroes(0, 4096, false, false),
	} {
		if !errors.Is(err, ErrReadOnly) || !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s on a read-only device: %v", name, err)
		}
	}
	if _, err := d.ReadAt(make([]byte, 10), 0); err != nil {
		t.Error(err)
	}
}

func TestOpen_Refuses(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir, false); err == nil {
		t.Error("opened a directory")
	}
	if _, err := Open(filepath.Join(dir, "missing"), false); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := Open("/dev/null", false); err == nil {
		t.Error("opened a character device")
	}
}

// loopDevice attaches path to a loop device with the given logical block
// size and detaches it when the test ends. It needs root; without root the
// test is skipped, or fails when NBDMIRROR_REQUIRE_E2E=1 (CI runs as root).
func loopDevice(t *testing.T, path string, sector int) string {
	t.Helper()
	needRoot(t, "a loop device")
	out, err := exec.Command("losetup", "--sector-size", strconv.Itoa(sector), "-f", "--show", path).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// Unaligned TRIM and WRITE_ZEROES on a device with 4 KiB logical blocks:
// fallocate takes only the whole blocks, the edges are written, nothing
// outside the range changes, and one unaligned request does not turn
// fallocate off for the requests after it.
func TestDevice_UnalignedOnLogicalBlocks(t *testing.T) {
	const size = 8 << 20
	open := map[string]func(t *testing.T) *Device{
		"file with 4 KiB sectors": func(t *testing.T) *Device {
			d, err := Open(newFile(t, size), false)
			if err != nil {
				t.Fatal(err)
			}
			d.sector = 4096
			return d
		},
		"loop device with 4 KiB sectors": func(t *testing.T) *Device {
			d, err := Open(loopDevice(t, newFile(t, size), 4096), false)
			if err != nil {
				t.Fatal(err)
			}
			if d.sector != 4096 {
				t.Fatalf("logical block size %d, want 4096", d.sector)
			}
			return d
		},
	}
	tests := []struct {
		name   string
		off, n int64
		trim   bool
		noHole bool
	}{
		{"zeroes inside one block", 100, 10, false, false},
		{"zeroes across blocks", 4096 + 100, 3 * 4096, false, false},
		{"zeroes no-hole across blocks", 64<<10 + 7, 5*4096 + 3, false, true},
		{"zeroes aligned", 1 << 20, 64 << 10, false, false},
		{"trim unaligned", 2<<20 + 1, 3 * 4096, true, false},
	}
	for name, openDev := range open {
		t.Run(name, func(t *testing.T) {
			d := openDev(t)
			defer d.Close()
			want := bytes.Repeat([]byte{0xa5}, size)
			if err := d.WriteAt(want, 0, true); err != nil {
				t.Fatal(err)
			}
			for _, tc := range tests {
				var err error
				if tc.trim {
					err = d.Trim(tc.off, tc.n, true)
				} else {
					err = d.WriteZeroes(tc.off, tc.n, tc.noHole, true)
					clear(want[tc.off : tc.off+tc.n])
				}
				if err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				got := make([]byte, size)
				if _, err := d.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if tc.trim {
					// Only whole blocks inside the range may change.
					a, b := (tc.off+4095)/4096*4096, (tc.off+tc.n)/4096*4096
					copy(want[a:b], got[a:b])
				}
				if i := firstDiff(got, want); i >= 0 {
					t.Fatalf("%s: byte %d is %#x, want %#x", tc.name, i, got[i], want[i])
				}
				if d.noPunch.Load() || d.noZero.Load() {
					t.Fatalf("%s: fallocate turned off (punch off %v, zero range off %v)", tc.name, d.noPunch.Load(), d.noZero.Load())
				}
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// alignedBuf returns n bytes whose first lies on a DirectAlign boundary.
func alignedBuf(n int) []byte {
	b := make([]byte, n+DirectAlign)
	at := int(DirectAlign-uintptr(unsafe.Pointer(&b[0]))%DirectAlign) % DirectAlign
	return b[at : at+n : at+n]
}

// resident returns how many pages of [off, off+n) of f are in the page cache.
func resident(t *testing.T, f *os.File, off, n int64) int {
	t.Helper()
	c, err := pagecache.Resident(f, off, n)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkLanded checks that p was written at off, around the page cache
// (none of the range cached) if direct, else through it.
func checkLanded(t *testing.T, d *Device, name string, p []byte, off int64, direct bool) {
	t.Helper()
	n := int64(len(p))
	cached := resident(t, d.f, off, n)
	if direct && cached != 0 {
		t.Errorf("%s: %d pages of the range in the page cache after a direct write", name, cached)
	}
	if !direct && cached == 0 {
		t.Errorf("%s: nothing of the range in the page cache: an unaligned request went direct", name)
	}
	got := make([]byte, n)
	if _, err := d.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Errorf("%s: read back differs", name)
	}
}

// directDisks are the disks the direct-write tests run on: a file and a
// loop device over one.
func directDisks(size int64) map[string]func(t *testing.T) string {
	return map[string]func(t *testing.T) string{
		"file":        func(t *testing.T) string { return newFile(t, size) },
		"loop device": func(t *testing.T) string { return loopDevice(t, newFile(t, size), 512) },
	}
}

// WriteAtDirect goes around the page cache exactly when the buffer, the
// offset and the length meet DirectAlign, and what it wrote reads back
// either way, also over a range whose older data was dirty in the page
// cache when it wrote.
func TestDevice_WriteAtDirect(t *testing.T) {
	disks := directDisks(8 << 20)
	buf := alignedBuf(1<<20 + DirectAlign)
	tests := []struct {
		name   string
		p      []byte
		off    int64
		dirty  bool // the range was written through the page cache just before
		direct bool
	}{
		{"1 MiB aligned", buf[:1<<20], 0, false, true},
		{"64 KiB aligned over dirty cached data", buf[:64<<10], 2 << 20, true, true},
		{"fua", buf[:8<<10], 3 << 20, false, true},
		{"buffer off by 512", buf[512 : 512+64<<10], 4 << 20, false, false},
		{"offset off by 512", buf[:64<<10], 5<<20 + 512, false, false},
		{"length off by 512", buf[:64<<10-512], 6 << 20, false, false},
	}
	for name, disk := range disks {
		t.Run(name, func(t *testing.T) {
			path := disk(t)
			d, err := Open(path, false)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if !d.Direct() {
				t.Fatalf("%s refuses O_DIRECT (or is on tmpfs): the machine's temp directory must be on a disk that takes it", path)
			}
			var a, b unix.Stat_t
			if unix.Fstat(int(d.f.Fd()), &a) != nil || unix.Fstat(int(d.direct.Fd()), &b) != nil || a.Dev != b.Dev || a.Ino != b.Ino || a.Rdev != b.Rdev {
				t.Fatalf("the O_DIRECT handle is not the disk's: dev %d/%d ino %d/%d rdev %d/%d", a.Dev, b.Dev, a.Ino, b.Ino, a.Rdev, b.Rdev)
			}
			for i, tc := range tests {
				for j := range tc.p {
					tc.p[j] = byte(i*7 + j*13 + j>>12)
				}
				n := int64(len(tc.p))
				if tc.dirty {
					if err := d.WriteAt(bytes.Repeat([]byte{0xee}, int(n)), tc.off, false); err != nil {
						t.Fatal(err)
					}
				}
				if err := d.WriteAtDirect(tc.p, tc.off, tc.name == "fua"); err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				checkLanded(t, d, tc.name, tc.p, tc.off, tc.direct)
			}
			if !d.Direct() {
				t.Error("a refusal turned direct writes off")
			}
		})
	}
}

// A read-only device has no direct handle and refuses WriteAtDirect and
// WriteAsync as it refuses WriteAt.
func TestDevice_WriteAtDirectReadOnly(t *testing.T) {
	d, err := Open(newFile(t, 1<<20), true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Direct() {
		t.Error("a read-only device opened a direct handle")
	}
	if err := d.WriteAtDirect(alignedBuf(4096), 0, false); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAtDirect on a read-only device: %v, want ErrReadOnly", err)
	}
	if res := writeAsync(t, d, alignedBuf(4096), 0, false); !errors.Is(res.err, ErrReadOnly) || !res.inline {
		t.Errorf("WriteAsync on a read-only device: %v (reported before returning: %v), want ErrReadOnly at once", res.err, res.inline)
	}
	if d.AsyncDirect() {
		t.Error("a read-only device offers asynchronous direct writes")
	}
}

// On tmpfs O_DIRECT is accepted but changes nothing: the device does not
// claim to write around a page cache it cannot leave, and WriteAtDirect
// still writes.
func TestDevice_NoDirectOnTmpfs(t *testing.T) {
	needRoot(t, "a tmpfs mount")
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=16m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Direct() {
		t.Error("a disk on tmpfs claims to write around the page cache")
	}
	p := alignedBuf(64 << 10)
	for i := range p {
		p[i] = byte(i)
	}
	if err := d.WriteAtDirect(p, 64<<10, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := d.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
}

// needRoot skips the test when not root, unless NBDMIRROR_REQUIRE_E2E=1
// makes that a failure.
func needRoot(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("NBDMIRROR_REQUIRE_E2E") == "1" {
		t.Fatalf("this test needs root (%s) and NBDMIRROR_REQUIRE_E2E=1 is set", what)
	}
	t.Skipf("needs root for %s", what)
}
