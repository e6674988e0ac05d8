// Package blockdev gives random access to a local disk: a regular file or a
// block device, read and written with pread/pwrite through the page cache,
// made durable with fdatasync, discarded and zeroed with fallocate.
// WriteAtDirect writes around the page cache (O_DIRECT) where the file
// system allows it, for data nobody on this node will read soon;
// WriteAsync does the same without waiting, several writes in flight at
// once (Linux native AIO).
//
// A Device never reads or writes outside [0, Size): a request that would is
// refused with ErrOutOfRange before any I/O, so a regular file never grows.
// A Device is safe for concurrent use; overlapping requests are not ordered.
//
// It is the lower disk of both `nbdmirror serve` and a replicated resource,
// and it satisfies nbd.Backend without importing the nbd package.
package blockdev

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors.
var (
	// ErrOutOfRange is returned for a request that reaches past the end of
	// the device; it wraps EINVAL.
	ErrOutOfRange = fmt.Errorf("blockdev: request outside the device: %w", syscall.EINVAL)
	// ErrReadOnly is returned for a write to a device opened read-only;
	// it wraps EROFS.
	ErrReadOnly = fmt.Errorf("blockdev: device is read-only: %w", syscall.EROFS)
)

// zeroChunk is the largest write used to zero a range when fallocate cannot.
const zeroChunk = 1 << 20

// DirectAlign is what WriteAtDirect needs its buffer's address, offset and
// length to be multiples of to write around the page cache: the page
// size, which any disk's logical block size divides.
const DirectAlign = 4096

// Device is an open file or block device.
type Device struct {
	f        *os.File
	path     string
	size     atomic.Int64
	block    bool
	readOnly bool
	noPunch  atomic.Bool // FALLOC_FL_PUNCH_HOLE is not supported
	noZero   atomic.Bool // FALLOC_FL_ZERO_RANGE is not supported
	// sector is the unit fallocate needs on a block device (its logical
	// block size; 1 for a file): unaligned edges are written instead.
	sector int64
	// zeroes returns a read-only buffer of zeroChunk zero bytes, shared by
	// every write of zeroes.
	zeroes func() []byte
	// direct is the disk opened again with O_DIRECT, for WriteAtDirect;
	// nil when read-only, on tmpfs (nothing to go around), or when the
	// file system refuses O_DIRECT. noDirect is set once it refused a write
	// that met DirectAlign: WriteAtDirect writes through the page cache
	// from then on.
	direct   *os.File
	noDirect atomic.Bool
	// aio is the AIO context of WriteAsync, set up on its first use (nil
	// when the kernel gives none).
	aioOnce sync.Once
	aio     *aioRing
}

// Open opens path, which must be a regular file or a block device.
func Open(path string, readOnly bool) (*Device, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err // an *fs.PathError naming the operation and the path
	}
	d := &Device{f: f, path: path, readOnly: readOnly, sector: 1,
		zeroes: sync.OnceValue(func() []byte { return make([]byte, zeroChunk) })}
	if err := d.stat(); err != nil {
		f.Close()
		return nil, err
	}
	if !readOnly && d.sector <= DirectAlign && (d.block || !onTmpfs(f)) {
		// The open file itself, not the path again (a symlink such as
		// /dev/disk/by-id/… may point elsewhere by now). Without O_DIRECT
		// every write goes through the page cache, as it would anyway: a
		// refusal here is not an error.
		if df, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), os.O_RDWR|unix.O_DIRECT, 0); err == nil {
			d.direct = df
		}
	}
	return d, nil
}

// onTmpfs reports whether the regular file f lives in memory (tmpfs), where
// O_DIRECT is accepted but the data stays in the page cache all the same.
// (A device node's file system is devtmpfs, which says tmpfs too.)
func onTmpfs(f *os.File) bool {
	var st unix.Statfs_t
	return unix.Fstatfs(int(f.Fd()), &st) == nil && st.Type == unix.TMPFS_MAGIC
}

func (d *Device) stat() error {
	fi, err := d.f.Stat()
	if err != nil {
		return fmt.Errorf("stat disk %s: %w", d.path, err)
	}
	switch {
	case fi.Mode().IsRegular():
		d.size.Store(fi.Size())
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		d.block = true
		end, err := d.f.Seek(0, io.SeekEnd)
		if err != nil {
			return fmt.Errorf("size of block device %s: %w", d.path, err)
		}
		d.size.Store(end)
		ss, err := unix.IoctlGetInt(int(d.f.Fd()), unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("logical block size of %s: %w", d.path, err)
		}
		d.sector = max(int64(ss), 1)
	default:
		return fmt.Errorf("disk %s is neither a regular file nor a block device", d.path)
	}
	return nil
}

// Path returns the path the device was opened with.
func (d *Device) Path() string { return d.path }

// Size returns the device size in bytes.
func (d *Device) Size() int64 { return d.size.Load() }

// IsBlockDevice reports whether the device is a block device.
func (d *Device) IsBlockDevice() bool { return d.block }

// Refresh re-reads the size, after the file or device was grown.
func (d *Device) Refresh() error { return d.stat() }

func (d *Device) check(off, n int64, write bool) error {
	if write && d.readOnly {
		return ErrReadOnly
	}
	if off < 0 || n < 0 || off > d.Size() || n > d.Size()-off {
		return fmt.Errorf("%w: %d bytes at %d, size %d", ErrOutOfRange, n, off, d.Size())
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p)), false); err != nil {
		return 0, err
	}
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF && n < len(p) {
		err = io.ErrUnexpectedEOF // the file shrank under us
	}
	return n, err
}

// WriteAt writes p at off; with fua it returns only once the data is durable.
func (d *Device) WriteAt(p []byte, off int64, fua bool) error {
	if err := d.check(off, int64(len(p)), true); err != nil {
		return err
	}
	if _, err := d.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return d.Flush()
	}
	return nil
}

// WriteAtDirect is WriteAt around the page cache: when p's address, off
// and len(p) are multiples of DirectAlign and the file system takes
// O_DIRECT, the data goes from p to the disk (its volatile cache: Flush
// still makes it durable) and nothing of it stays in memory; otherwise, or
// after a refusal, it is WriteAt. Reads see the data either way. It is for
// data that nobody on this node reads soon, such as the peer's writes on a
// Secondary: through the page cache it would be copied once more and then
// written back, for nothing.
func (d *Device) WriteAtDirect(p []byte, off int64, fua bool) error {
	if d.direct == nil || d.noDirect.Load() || !directAligned(p, off) {
		return d.WriteAt(p, off, fua)
	}
	if err := d.check(off, int64(len(p)), true); err != nil {
		return err
	}
	if _, err := d.direct.WriteAt(p, off); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		// The file system opened the file with O_DIRECT but refuses the
		// write (an alignment it needs beyond DirectAlign, or no direct
		// writes at all): write through the page cache, now and on.
		d.noDirect.Store(true)
		return d.WriteAt(p, off, fua)
	}
	return d.maybeFlush(fua)
}

// directAligned reports whether p and off meet DirectAlign.
func directAligned(p []byte, off int64) bool {
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
	return len(p) > 0 && len(p)%DirectAlign == 0 && off%DirectAlign == 0 && addr%DirectAlign == 0
}

// Direct reports whether WriteAtDirect writes around the page cache (for
// requests that meet DirectAlign).
func (d *Device) Direct() bool { return d.direct != nil && !d.noDirect.Load() }

// Flush makes every completed write durable (fdatasync).
func (d *Device) Flush() error {
	for {
		err := unix.Fdatasync(int(d.f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("fdatasync %s: %w", d.path, err)
			}
			return nil
		}
	}
}

// Trim discards the range (punches a hole); where the file system or device
// cannot, it does nothing, as TRIM is advisory. On a block device only the
// whole logical blocks inside the range are discarded.
func (d *Device) Trim(off, length int64, fua bool) error {
	if err := d.check(off, length, true); err != nil {
		return err
	}
	a, b := d.aligned(off, length)
	if a >= b || d.noPunch.Load() {
		return d.maybeFlush(fua)
	}
	err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, a, b-a)
	if unsupported(err) {
		d.noPunch.Store(true)
		err = nil
	}
	if err != nil {
		return fmt.Errorf("trim %s: %w", d.path, err)
	}
	return d.maybeFlush(fua)
}

// WriteZeroes makes the range read as zeroes: by punching a hole unless
// noHole is set, else by FALLOC_FL_ZERO_RANGE, else by writing zeroes. On a
// block device the partial logical blocks at the edges are written.
func (d *Device) WriteZeroes(off, length int64, noHole, fua bool) error {
	if err := d.check(off, length, true); err != nil {
		return err
	}
	if length == 0 {
		return d.maybeFlush(fua)
	}
	if err := d.zero(off, length, noHole); err != nil {
		return fmt.Errorf("write zeroes %s: %w", d.path, err)
	}
	return d.maybeFlush(fua)
}

// aligned returns the whole sectors [a, b) inside [off, off+length); a >= b
// when there are none.
func (d *Device) aligned(off, length int64) (a, b int64) {
	a = (off + d.sector - 1) / d.sector * d.sector
	b = (off + length) / d.sector * d.sector
	return a, b
}

func (d *Device) zero(off, length int64, noHole bool) error {
	a, b := d.aligned(off, length)
	if a >= b {
		return d.writeZeroes(off, length)
	}
	if err := d.writeZeroes(off, a-off); err != nil {
		return err
	}
	if err := d.writeZeroes(b, off+length-b); err != nil {
		return err
	}
	if !noHole && !d.noPunch.Load() {
		err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, a, b-a)
		if !unsupported(err) {
			return err
		}
		d.noPunch.Store(true)
	}
	if !d.noZero.Load() {
		err := d.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, a, b-a)
		if !unsupported(err) {
			return err
		}
		d.noZero.Store(true)
	}
	return d.writeZeroes(a, b-a)
}

// writeZeroes writes length zero bytes at off.
func (d *Device) writeZeroes(off, length int64) error {
	zeroes := d.zeroes()
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if _, err := d.f.WriteAt(zeroes[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

func (d *Device) fallocate(mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(int(d.f.Fd()), mode, off, length)
		if err != unix.EINTR {
			return err
		}
	}
}

func (d *Device) maybeFlush(fua bool) error {
	if fua {
		return d.Flush()
	}
	return nil
}

// unsupported reports a fallocate error meaning "this mode is not available
// here", after which the next method is tried.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV)
}

// Close closes the device without flushing it, once the writes WriteAsync
// has in flight are complete.
func (d *Device) Close() error {
	var err error
	d.aioOnce.Do(func() {}) // no context is set up from here on
	if d.aio != nil {
		err = d.aio.close()
	}
	err = errors.Join(err, d.f.Close())
	if d.direct != nil {
		err = errors.Join(err, d.direct.Close())
	}
	return err
}
