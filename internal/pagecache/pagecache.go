// Package pagecache tells which pages of a file are in the kernel's page
// cache (mincore(2) on a shared read-only mapping), for tests that check
// whether data went around the cache (O_DIRECT) or through it.
package pagecache

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PageSize is the unit Resident counts in.
const PageSize = 4096

// Resident returns how many of the pages that [off, off+n) of f touches are
// in the page cache. f may be a regular file or a block device; n > 0.
func Resident(f *os.File, off, n int64) (int, error) {
	if off < 0 || n <= 0 {
		return 0, fmt.Errorf("pagecache: range of %d bytes at %d", n, off)
	}
	start := off / PageSize * PageSize
	m, err := unix.Mmap(int(f.Fd()), start, int(off+n-start), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("pagecache: map %d bytes of %s at %d: %w", off+n-start, f.Name(), start, err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+PageSize-1)/PageSize)
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0])))
	if errno != 0 {
		return 0, fmt.Errorf("pagecache: mincore on %s: %w", f.Name(), errno)
	}
	count := 0
	for _, v := range vec {
		count += int(v & 1)
	}
	return count, nil
}
