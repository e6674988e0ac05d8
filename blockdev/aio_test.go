package blockdev

import (
	"bytes"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// asyncResult is what a WriteAsync reported: its error, and whether done
// was called before WriteAsync returned (as it must for a synchronous
// write).
type asyncResult struct {
	err    error
	inline bool
}

// writeAsync calls d.WriteAsync and waits for its done, at most 10 s.
func writeAsync(t *testing.T, d *Device, p []byte, off int64, fua bool) asyncResult {
	t.Helper()
	ch := make(chan error, 1)
	var returned atomic.Bool
	var inline bool
	d.WriteAsync(p, off, fua, func(err error) {
		inline = !returned.Load()
		ch <- err
	})
	returned.Store(true)
	select {
	case err := <-ch:
		return asyncResult{err, inline}
	case <-time.After(10 * time.Second):
		t.Fatalf("WriteAsync at %d: done not called within 10 s", off)
		return asyncResult{}
	}
}

// WriteAsync goes to the disk asynchronously and around the page cache
// exactly when buffer, offset and length meet DirectAlign; otherwise it
// writes through the cache before it returns; out of range it fails
// without writing. What it wrote reads back either way.
func TestDevice_WriteAsync(t *testing.T) {
	const size = 8 << 20
	disks := directDisks(size)
	buf := alignedBuf(64<<10 + DirectAlign)
	tests := []struct {
		name   string
		p      []byte
		off    int64
		fua    bool
		dirty  bool // the range was written through the page cache just before
		direct bool // asynchronous and around the page cache
		err    error
	}{
		{name: "4 KiB aligned", p: buf[:4096], off: 0, direct: true},
		{name: "64 KiB aligned over dirty cached data", p: buf[:64<<10], off: 1 << 20, dirty: true, direct: true},
		{name: "fua", p: buf[:8<<10], off: 2 << 20, fua: true, direct: true},
		{name: "buffer off by 512", p: buf[512 : 512+4096], off: 3 << 20},
		{name: "offset off by 512", p: buf[:4096], off: 4<<20 + 512},
		{name: "length off by 512", p: buf[:4096-512], off: 5 << 20},
		{name: "past the end", p: buf[:8192], off: size - 4096, err: ErrOutOfRange},
	}
	for name, disk := range disks {
		t.Run(name, func(t *testing.T) {
			d, err := Open(disk(t), false)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if !d.AsyncDirect() {
				t.Fatal("no asynchronous direct writes: the machine's temp directory must be on a disk that takes O_DIRECT, and the kernel must have AIO")
			}
			for i, tc := range tests {
				for j := range tc.p {
					tc.p[j] = byte(i*5 + j*11 + j>>12)
				}
				n := int64(len(tc.p))
				if tc.dirty {
					if err := d.WriteAt(bytes.Repeat([]byte{0xee}, int(n)), tc.off, false); err != nil {
						t.Fatal(err)
					}
				}
				res := writeAsync(t, d, tc.p, tc.off, tc.fua)
				if !errors.Is(res.err, tc.err) {
					t.Fatalf("%s: %v, want %v", tc.name, res.err, tc.err)
				}
				if tc.err != nil {
					if !res.inline {
						t.Errorf("%s: a refused request was reported asynchronously", tc.name)
					}
					continue
				}
				// (A direct write may complete, on the reaper, before
				// WriteAsync returns: its timing proves nothing.)
				if !tc.direct && !res.inline {
					t.Errorf("%s: a write through the page cache was reported after WriteAsync returned", tc.name)
				}
				checkLanded(t, d, tc.name, tc.p, tc.off, tc.direct)
			}
			if !d.AsyncDirect() {
				t.Error("a refusal turned direct writes off")
			}
		})
	}
}

// openAsync opens path for writing and fails the test unless WriteAsync
// goes to it asynchronously; the caller closes it.
func openAsync(t *testing.T, path string) *Device {
	t.Helper()
	d, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if !d.AsyncDirect() {
		d.Close()
		t.Fatal("no asynchronous direct writes: the machine's temp directory must be on a disk that takes O_DIRECT, and the kernel must have AIO")
	}
	return d
}

// Many more writes than the ring has slots, from several goroutines at
// once, all complete with their data in place; Close returns only after
// every done was called.
func TestDevice_WriteAsyncMany(t *testing.T) {
	const blocks = 2048 // 8 MiB in 4 KiB blocks, 16 rings' worth
	path := newFile(t, blocks*4096)
	d := openAsync(t, path)
	var completed, failed atomic.Int64
	var wg sync.WaitGroup
	const writers = 4
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := w; b < blocks; b += writers {
				p := alignedBuf(4096)
				for j := range p {
					p[j] = byte(b*3 + j>>8)
				}
				d.WriteAsync(p, int64(b)*4096, b%64 == 0, func(err error) {
					if err != nil {
						failed.Add(1)
						t.Errorf("block %d: %v", b, err)
					}
					completed.Add(1)
				})
			}
		}()
	}
	wg.Wait()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if c := completed.Load(); c != blocks {
		t.Fatalf("Close returned with %d of %d writes completed", c, blocks)
	}
	d, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, 4096)
	for b := range blocks {
		if _, err := d.ReadAt(got, int64(b)*4096); err != nil {
			t.Fatal(err)
		}
		for j := range got {
			if got[j] != byte(b*3+j>>8) {
				t.Fatalf("block %d byte %d: %#x, want %#x", b, j, got[j], byte(b*3+j>>8))
			}
		}
	}
}

// What the kernel reports for a write becomes its result: the whole length
// is success, an error is that errno naming the disk, EINVAL (a direct
// write refused) writes it through the page cache and turns direct writes
// off, and a short write has its rest written through the page cache.
func TestAIORing_Result(t *testing.T) {
	tests := []struct {
		name     string
		res      func(n int) int64
		err      error
		written  bool // the data is on the disk afterwards (from this call)
		noDirect bool
	}{
		{name: "complete", res: func(n int) int64 { return int64(n) }},
		{name: "EIO", res: func(int) int64 { return -int64(unix.EIO) }, err: unix.EIO},
		{name: "ENOSPC", res: func(int) int64 { return -int64(unix.ENOSPC) }, err: unix.ENOSPC},
		{name: "refused", res: func(int) int64 { return -int64(unix.EINVAL) }, written: true, noDirect: true},
		{name: "short", res: func(n int) int64 { return int64(n / 2) }, written: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := openAsync(t, newFile(t, 1<<20))
			defer d.Close()
			p := alignedBuf(8192)
			for i := range p {
				p[i] = byte(i%251 + 1)
			}
			// The kernel did not write it: only result writes anything.
			err := d.aio.result(aioWrite{p: p, off: 64 << 10}, tc.res(len(p)))
			if !errors.Is(err, tc.err) {
				t.Fatalf("%v, want %v", err, tc.err)
			}
			if tc.err != nil {
				var pe *os.PathError
				if !errors.As(err, &pe) || pe.Path != d.Path() {
					t.Errorf("%v does not name the disk %s", err, d.Path())
				}
			}
			got := make([]byte, len(p))
			if _, err := d.ReadAt(got, 64<<10); err != nil {
				t.Fatal(err)
			}
			half := len(p) / 2
			switch {
			case tc.name == "short":
				if !bytes.Equal(got[half:], p[half:]) || bytes.Equal(got[:half], p[:half]) {
					t.Error("a short write's rest was not written (or more than its rest)")
				}
			case tc.written != bytes.Equal(got, p):
				t.Errorf("data written: %v, want %v", !tc.written, tc.written)
			}
			if d.Direct() == tc.noDirect {
				t.Errorf("direct writes on: %v, want %v", d.Direct(), !tc.noDirect)
			}
		})
	}
}

// A write the kernel does not take (here: the direct handle is read-only,
// so io_submit fails with EBADF) is written through the page cache, and
// Close still returns: the reaper never waits for a completion of a write
// that was not submitted.
func TestDevice_WriteAsyncNotSubmitted(t *testing.T) {
	path := newFile(t, 1<<20)
	d := openAsync(t, path)
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	d.direct.Close()
	d.direct = ro
	p := alignedBuf(4096)
	for i := range 100 {
		p[0] = byte(i + 1)
		if res := writeAsync(t, d, p, 4096*int64(i%8), false); res.err != nil || !res.inline {
			t.Fatalf("write %d: %v (reported before returning: %v), want it written through the page cache at once", i, res.err, res.inline)
		}
	}
	checkLanded(t, d, "after refused submissions", p, 4096*int64(99%8), false)
	closed := make(chan struct{})
	go func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return within 10 s after refused submissions")
	}
}
