package metadisk

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// Device holds the metadata area: a file or block device (*os.File
// satisfies it). Offsets are absolute on the device.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
}

// Errors of opening and using metadata.
var (
	// ErrNoMetadata: neither superblock slot was ever written.
	ErrNoMetadata = errors.New("metadisk: no metadata found")
	// ErrCorrupt: metadata was written but cannot be trusted.
	ErrCorrupt = errors.New("metadisk: metadata is corrupt")
	// ErrExists: create refused to overwrite valid metadata.
	ErrExists = errors.New("metadisk: valid metadata already present")
	// ErrMismatch: the metadata does not describe this disk (size,
	// placement or resource differ).
	ErrMismatch = errors.New("metadisk: metadata does not match the configuration")
	// ErrFailed: an earlier metadata write failed; the metadata can no
	// longer be trusted in memory and must be re-attached.
	ErrFailed = errors.New("metadisk: metadata I/O failed")
	// ErrClosed: the metadata was closed.
	ErrClosed = errors.New("metadisk: metadata closed")
	// ErrNotActive: BeginWrite before Activate (after a crash the activity
	// log must be applied before anything replaces it).
	ErrNotActive = errors.New("metadisk: metadata not activated for writing")
	// ErrWriteRange: a write outside the data area, or one that spans
	// more extents than the activity log holds (split it).
	ErrWriteRange = errors.New("metadisk: write outside what the activity log can cover")
)

// Options tune Open and Create.
type Options struct {
	Logger *slog.Logger
	// ALExtents is the activity-log capacity (al-extents); 0 = 1237.
	ALExtents int
	// NoFlush skips flushing after metadata writes (md-flushes no):
	// faster, but a power loss may lose activity-log transactions.
	NoFlush bool
}

func (o Options) logger() *slog.Logger {
	if o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

// Recovery describes what Open found.
type Recovery struct {
	Slot          int             // superblock slot in use (0 = A, 1 = B)
	OtherSlotErr  error           // why the other slot was not used, if it was invalid
	Clean         bool            // shut down cleanly
	ALSeq         uint64          // newest complete activity-log transaction
	ALActive      []bitmap.Extent // its extents: to fold into the bitmap unless clean
	TornALBlocks  int             // ring blocks with a bad checksum (a torn last write)
	TornPages     []int           // bitmap pages that could not be read: all their bits were set
	Applied       bool            // ApplyAL has run since Open
	AppliedBlocks uint64          // bits ApplyAL newly set
}

// Stats are counters for status.
type Stats struct {
	ALTransactions uint64 // activity-log transactions written
	BitmapWrites   uint64 // bitmap pages written
	SuperWrites    uint64 // superblock writes
}

// Meta is open metadata: superblock, bitmap and activity log. It is safe
// for concurrent use.
type Meta struct {
	dev    Device
	layout Layout
	log    *slog.Logger
	noSync bool

	// dataSync, if set, flushes the data device before a transaction
	// evicts extents (SetDataSync).
	dataSync func() error

	io sync.Mutex // serialises metadata writes, so no stale page overtakes a newer one

	mu         sync.Mutex
	cond       sync.Cond
	sb         Superblock
	slot       int // slot of sb
	bm         *bitmap.Bitmap
	al         *bitmap.ActivityLog
	nextSlot   int
	maxSeq     uint64
	committing bool
	waiting    int // writers waiting in BeginWrite
	err        error
	closed     bool
	active     bool // Activate succeeded: writes may begin
	rec        Recovery
	stats      Stats
}

// Create writes fresh metadata: UUIDs "just created", no flags but clean,
// an empty bitmap and an empty activity log. It refuses (ErrExists) to
// overwrite valid metadata unless force is set; with force the old
// superblocks are invalidated first, so a crash in the middle never leaves
// old metadata that looks valid over a half-written bitmap.
func Create(dev Device, layout Layout, node, resource string, force bool, o Options) error {
	if len(node) > maxNameLen || len(resource) > maxNameLen {
		return errNameTooLong
	}
	for slot := range superSlots {
		buf := make([]byte, BlockSize)
		if _, err := dev.ReadAt(buf, layout.Offset+int64(slot)*BlockSize); err != nil {
			return fmt.Errorf("read superblock: %w", err)
		}
		if force || string(buf[:len(superMagic)]) != superMagic {
			continue
		}
		var old Superblock
		if err := old.UnmarshalBinary(buf); err != nil {
			return fmt.Errorf("%w (superblock slot %c: %v)", ErrExists, "AB"[slot], err)
		}
		return fmt.Errorf("%w (resource %q, %s of data, created %s)", ErrExists, old.Resource,
			humanBytes(old.DataSize), time.Unix(old.Created, 0).UTC().Format(time.RFC3339))
	}
	w := &writer{dev: dev, base: layout.Offset, noSync: o.NoFlush}
	// 1. Invalidate whatever superblocks are there.
	w.write(offSuperA, make([]byte, superSlots*BlockSize))
	w.sync()
	// 2. An empty bitmap, a zeroed ring and one empty transaction.
	bm := bitmap.New(layout.Blocks())
	chunk := make([]byte, 0, 256*BlockSize)
	for p := 0; p < bm.Pages(); {
		chunk = chunk[:0]
		first := p
		for ; p < bm.Pages() && len(chunk) < cap(chunk); p++ {
			chunk = bm.AppendPage(chunk, p)
		}
		w.write(offBitmap+int64(first)*BlockSize, chunk)
	}
	w.write(offALRing, make([]byte, ALRingBlocks*BlockSize))
	w.write(offALRing, appendTx(nil, 1, 0, nil))
	w.sync()
	// 3. Both superblock slots, last.
	var id [8]byte
	rand.Read(id[:])
	sb := Superblock{Kind: layout.Kind, Index: layout.Index, DataSize: layout.DataSize, AreaSize: layout.Size,
		Flags: FlagClean, UUIDs: UUIDs{Current: UUIDJustCreated}, ALFloor: 1, Created: time.Now().Unix(),
		DevUUID: binary.BigEndian.Uint64(id[:]), Node: node, Resource: resource}
	for slot := range superSlots {
		sb.Seq = uint64(slot + 1)
		b, err := sb.AppendBinary(nil)
		if err != nil {
			return err
		}
		w.write(int64(slot)*BlockSize, b)
	}
	w.sync()
	return w.err
}

// writer accumulates the first error of a sequence of writes.
type writer struct {
	dev    Device
	base   int64
	noSync bool
	err    error
}

func (w *writer) write(rel int64, b []byte) {
	if w.err != nil {
		return
	}
	if _, err := w.dev.WriteAt(b, w.base+rel); err != nil {
		w.err = fmt.Errorf("write metadata at %d: %w", w.base+rel, err)
	}
}

func (w *writer) sync() {
	if w.err != nil || w.noSync {
		return
	}
	if err := w.dev.Sync(); err != nil {
		w.err = fmt.Errorf("flush metadata: %w", err)
	}
}

// Open reads the metadata described by layout. It picks the newer valid
// superblock slot, checks that the metadata describes this layout, reads
// the activity-log ring and loads the bitmap; a torn bitmap page is
// conservatively read as all set. The activity log is not yet applied:
// call ApplyAL (or Activate) before writing.
func Open(dev Device, layout Layout, o Options) (*Meta, error) {
	m := &Meta{dev: dev, layout: layout, log: o.logger(), noSync: o.NoFlush}
	m.cond.L = &m.mu
	if err := m.readSuper(); err != nil {
		return nil, err
	}
	if err := m.checkLayout(); err != nil {
		return nil, err
	}
	if err := m.readRing(); err != nil {
		return nil, err
	}
	if err := m.readBitmap(); err != nil {
		return nil, err
	}
	capacity := o.ALExtents
	if capacity == 0 {
		capacity = bitmap.DefaultALExtents
	}
	if capacity < bitmap.MinALExtents || capacity > bitmap.MaxALExtents {
		return nil, fmt.Errorf("metadisk: al-extents %d is outside %d-%d", capacity, bitmap.MinALExtents, bitmap.MaxALExtents)
	}
	m.al = bitmap.NewActivityLog(capacity, m.maxSeq)
	return m, nil
}

func (m *Meta) readSuper() error {
	buf := make([]byte, superSlots*BlockSize)
	if _, err := m.dev.ReadAt(buf, m.layout.Offset); err != nil {
		return fmt.Errorf("read superblocks at %d: %w", m.layout.Offset, err)
	}
	var sbs [superSlots]Superblock
	var errs [superSlots]error
	for i := range superSlots {
		errs[i] = sbs[i].UnmarshalBinary(buf[i*BlockSize : (i+1)*BlockSize])
	}
	switch {
	case errs[0] == nil && (errs[1] != nil || sbs[0].Seq >= sbs[1].Seq):
		m.sb, m.slot, m.rec.OtherSlotErr = sbs[0], 0, errs[1]
	case errs[1] == nil:
		m.sb, m.slot, m.rec.OtherSlotErr = sbs[1], 1, errs[0]
	case errors.Is(errs[0], ErrNoSuperblock) && errors.Is(errs[1], ErrNoSuperblock):
		return ErrNoMetadata
	default:
		return fmt.Errorf("%w: both superblock slots are unreadable (A: %v; B: %v)", ErrCorrupt, errs[0], errs[1])
	}
	if err := m.rec.OtherSlotErr; err != nil && !errors.Is(err, ErrNoSuperblock) {
		m.log.Warn("superblock slot unreadable; using the other one", "bad_slot", "AB"[1-m.slot:2-m.slot],
			"err", err, "seq", m.sb.Seq)
	}
	m.rec.Slot = m.slot
	m.rec.Clean = m.sb.Flags&FlagClean != 0
	return nil
}

// checkLayout checks the superblock against the layout the devices give
// now, whose DataSize is the most data the area there can describe: the
// metadata may cover less (the size agreed with the peer, DRBD's la_size,
// or a disk grown since and not yet resized), never more. The layout the
// metadata is used with is then the superblock's: its data size, and for
// external and indexed metadata the area that size needs.
func (m *Meta) checkLayout() error {
	sb, l := m.sb, m.layout
	switch {
	case sb.Kind != l.Kind || sb.Index != l.Index:
		return fmt.Errorf("%w: the metadata is %s (index %d), the configuration says %s (index %d)",
			ErrMismatch, sb.Kind, sb.Index, l.Kind, l.Index)
	case sb.DataSize > l.DataSize:
		return fmt.Errorf("%w: the metadata covers %d bytes of data, the disk now provides only %d: the disk shrank; give it back its size",
			ErrMismatch, sb.DataSize, l.DataSize)
	case l.Kind == Internal && sb.AreaSize != l.Size:
		return fmt.Errorf("%w: metadata area of %d bytes, expected %d", ErrMismatch, sb.AreaSize, l.Size)
	case l.Kind != Internal && sb.AreaSize != areaSize(sb.DataSize):
		return fmt.Errorf("%w: metadata area of %d bytes for %d bytes of data, expected %d", ErrMismatch, sb.AreaSize, sb.DataSize, areaSize(sb.DataSize))
	}
	m.layout.DataSize, m.layout.Size = sb.DataSize, sb.AreaSize
	return nil
}

func (m *Meta) extents() uint64 {
	return (m.layout.Blocks() + bitmap.ExtentBlocks - 1) / bitmap.ExtentBlocks
}

func (m *Meta) readRing() error {
	ring := make([]byte, ALRingBlocks*BlockSize)
	if _, err := m.dev.ReadAt(ring, m.layout.Offset+offALRing); err != nil {
		return fmt.Errorf("read activity log: %w", err)
	}
	st, err := scanRing(ring, m.extents())
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if st.newest < m.sb.ALFloor {
		return fmt.Errorf("%w: the activity log holds no transaction at or after %d (newest %d): it cannot say which blocks may differ",
			ErrCorrupt, m.sb.ALFloor, st.newest)
	}
	m.nextSlot, m.maxSeq = st.nextSlot, st.maxSeq
	m.rec.ALSeq, m.rec.ALActive, m.rec.TornALBlocks = st.newest, st.active, st.torn
	if m.rec.Clean && len(st.active) > 0 {
		m.log.Warn("metadata marked clean but the activity log is not empty; applying it", "extents", len(st.active))
		m.rec.Clean = false
	}
	return nil
}

func (m *Meta) readBitmap() error {
	m.bm = bitmap.New(m.layout.Blocks())
	chunkPages := min(256, m.bm.Pages())
	buf := make([]byte, chunkPages*BlockSize)
	for first := 0; first < m.bm.Pages(); first += chunkPages {
		n := min(chunkPages, m.bm.Pages()-first)
		if _, err := m.dev.ReadAt(buf[:n*BlockSize], m.layout.Offset+offBitmap+int64(first)*BlockSize); err != nil {
			return fmt.Errorf("read bitmap: %w", err)
		}
		for i := range n {
			p := first + i
			err := m.bm.LoadPage(buf[i*BlockSize:(i+1)*BlockSize], p)
			switch {
			case err == nil:
			case errors.Is(err, bitmap.ErrPageChecksum), errors.Is(err, bitmap.ErrPageMagic), errors.Is(err, bitmap.ErrPageBits):
				// A torn page, or one a resize wrote before a crash took
				// its superblock: every block it covers may differ.
				m.bm.SetPage(p)
				m.rec.TornPages = append(m.rec.TornPages, p)
			default:
				return fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
		}
	}
	if n := len(m.rec.TornPages); n > 0 {
		if n == m.bm.Pages() && n > 1 {
			return fmt.Errorf("%w: no bitmap page is readable", ErrCorrupt)
		}
		m.log.Warn("bitmap pages unreadable (torn write?); their blocks are marked out of sync",
			"pages", n, "blocks", uint64(n)*bitmap.BitsPerPage)
	}
	return nil
}

// Recovery returns what Open found and what ApplyAL did.
func (m *Meta) Recovery() Recovery {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.rec
	r.ALActive = append([]bitmap.Extent(nil), r.ALActive...)
	r.TornPages = append([]int(nil), r.TornPages...)
	return r
}

// Layout returns the layout in use: where the area is, its size, and the
// data size the metadata covers (which Resize changes).
func (m *Meta) Layout() Layout {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.layout
}

// Superblock returns a copy of the current superblock.
func (m *Meta) Superblock() Superblock {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sb
}

// Stats returns the write counters.
func (m *Meta) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

func humanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f := float64(n)
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.4g %s", f, units[i])
}
