package metadisk

import (
	"errors"
	"fmt"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// ErrResize is wrapped by Resize's refusals: the new size cannot be
// described by this metadata, or the metadata is busy.
var ErrResize = errors.New("metadisk: cannot resize")

// CheckResize reports whether Resize(target, dataSize, …) can change this
// metadata, without changing anything: the refusals that do not depend on
// writes in flight, for a caller that checks before it asks its peer.
func (m *Meta) CheckResize(target Layout, dataSize int64) error {
	m.mu.Lock()
	old := m.layout
	m.mu.Unlock()
	_, err := resizeLayout(old, target, dataSize)
	return err
}

// resizeLayout is the layout old becomes at dataSize bytes within target,
// or why it cannot.
func resizeLayout(old, target Layout, dataSize int64) (Layout, error) {
	switch {
	case dataSize <= 0 || dataSize%BlockSize != 0:
		return Layout{}, fmt.Errorf("%w: %d bytes is not a positive multiple of %d", ErrResize, dataSize, BlockSize)
	case target.Kind != old.Kind || target.Index != old.Index:
		return Layout{}, fmt.Errorf("%w: the metadata is %s, the layout given is %s", ErrResize, old.Kind, target.Kind)
	case dataSize > target.DataSize:
		return Layout{}, fmt.Errorf("%w: %d bytes of data; this metadata area can describe at most %d", ErrResize, dataSize, target.DataSize)
	}
	nl := Layout{Kind: old.Kind, Index: old.Index, Offset: old.Offset, Size: areaSize(dataSize), DataSize: dataSize}
	if old.Kind == Internal {
		nl.Offset, nl.Size = target.Offset, target.Size
	}
	oldEnd := old.Offset + old.Size
	if nl.Offset != old.Offset && nl.Offset < oldEnd && old.Offset < nl.Offset+nl.Size {
		// The area would be moved over itself (the disk grew by less
		// than the area's size); a crash midway would lose both.
		need := minInternalDisk(oldEnd)
		disk := target.Offset + target.Size
		return Layout{}, fmt.Errorf("%w: the disk grew from %d to %d bytes, too little to move the internal metadata area (%d bytes) past its old place: grow the disk to at least %d bytes (by %d more bytes) and resize again, or give it back its old size of %d bytes; do not restart the resource (down/up) before, since an up on the grown disk finds no metadata at its end",
			ErrResize, oldEnd, disk, nl.Size, need, need-disk, oldEnd)
	}
	return nl, nil
}

// minInternalDisk is the smallest disk whose internal metadata area lies
// wholly at or after offset end.
func minInternalDisk(end int64) int64 {
	d := end + areaSize(BlockSize)
	for {
		l, err := InternalLayout(d)
		if err == nil && l.Offset >= end {
			return d
		}
		d = end + max(l.Size, areaSize(BlockSize))
		if err == nil && d <= l.Offset+l.Size {
			d = l.Offset + l.Size + BlockSize
		}
	}
}

// Resize changes the data size the metadata covers to dataSize bytes (a
// multiple of 4 KiB), online, for `nbdmirror resize`. target is the layout
// the devices give now (OpenMetaDevice's: where the area may lie and the
// most data it can describe); dataSize must not exceed target.DataSize.
//
// Growing, the new blocks are marked out of sync when markNew is set (the
// peer does not have them yet), else clear (`--assume-clean`). Shrinking,
// the blocks past the end are dropped, and the activity log is folded into
// the bitmap first (its extents past the end would no longer be valid).
//
// External and indexed metadata grow in place: the bitmap needs more pages
// after the ones it has, and the area must stay within the metadata device
// (target says how much that holds). Internal metadata sits at the end of
// the disk, so a grown disk moves it: the whole area is written at the new
// end and its superblock last; then the old superblocks are wiped, and the
// blocks of the old area that are now data are marked out of sync (they
// hold this node's metadata, not the peer's data). Until the new
// superblock is durable, the old metadata is the valid one.
//
// Every step is flushed before the next, and the superblock carrying the
// new size is written last: a crash before it leaves the old size, whose
// bitmap pages, if already rewritten for the new size, read as torn (all
// set: a larger resync, never a lost bit). No write may hold extents
// (freeze the application first); ErrResize otherwise.
func (m *Meta) Resize(target Layout, dataSize int64, markNew bool) error {
	if err := m.lockIO(); err != nil {
		return err
	}
	defer m.io.Unlock()
	old := m.layout
	nl, err := resizeLayout(old, target, dataSize)
	if err == nil && (m.committing || m.al.InUse() > 0) {
		err = fmt.Errorf("%w: writes are in flight", ErrResize)
	}
	if err != nil {
		m.mu.Unlock()
		return err
	}
	moved := nl.Offset != old.Offset

	oldBlocks := m.bm.Len()
	if dataSize < old.DataSize && !moved {
		// Extents past the new end cannot stay in the log, nor in the
		// ring's older transactions: Open would reject them.
		if err := m.clearRing(); err != nil {
			m.mu.Unlock()
			return err
		}
	} else if dataSize < old.DataSize {
		m.foldAL()
	}
	m.bm.Resize(bitmap.Blocks(dataSize), markNew)
	var oldArea uint64
	if moved && old.Offset < dataSize {
		// The old area is data now: its blocks hold this node's
		// metadata, not what the peer has there.
		first, n := bitmap.BlockRange(old.Offset, min(old.Size, dataSize-old.Offset))
		oldArea = m.bm.Set(first, n)
	}
	m.bm.MarkAllDirty()
	all := make([]int, m.bm.Pages())
	for i := range all {
		all[i] = i
	}
	pages := m.snapshotPages(all)
	active := m.al.Active()
	seq := m.al.NextSeq()
	slot := 0
	if !moved {
		slot = m.txSlot(len(active))
	}
	sb := m.sb
	m.mu.Unlock()

	w := &writer{dev: m.dev, base: nl.Offset, noSync: m.noSync}
	if moved {
		// Whatever lay where the new area goes is not metadata.
		w.write(offSuperA, make([]byte, superSlots*BlockSize))
		w.write(offALRing, make([]byte, ALRingBlocks*BlockSize))
	}
	m.writePages(w, pages)
	w.sync()
	w.write(offALRing+int64(slot)*BlockSize, appendTx(nil, seq, slot, active))
	w.sync()
	sb.DataSize, sb.AreaSize, sb.ALFloor = dataSize, nl.Size, seq
	sb.Seq++
	sbSlot := 1 - m.slot
	if moved {
		sbSlot = 0
	}
	b, err := sb.AppendBinary(nil)
	if err != nil && w.err == nil {
		w.err = err
	}
	w.write(int64(sbSlot)*BlockSize, b)
	w.sync()
	var wipeErr error
	if moved && w.err == nil {
		// The old superblocks go, so that a disk cut back to its old
		// size never opens a stale bitmap.
		ow := &writer{dev: m.dev, base: old.Offset, noSync: m.noSync}
		ow.write(offSuperA, make([]byte, superSlots*BlockSize))
		ow.sync()
		wipeErr = ow.err
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	m.stats.BitmapWrites += uint64(len(pages))
	m.stats.ALTransactions++
	m.stats.SuperWrites++
	if w.err != nil {
		m.fail(w.err)
		return m.err
	}
	m.layout, m.sb, m.slot = nl, sb, sbSlot
	if moved {
		m.nextSlot = TxBlocks(len(active)) % ALRingBlocks
	}
	m.log.Info("metadata resized", "data_bytes", dataSize, "was", old.DataSize, "blocks", m.bm.Len(), "was_blocks", oldBlocks,
		"area_offset", nl.Offset, "moved", moved, "old_area_blocks_marked", oldArea)
	if wipeErr != nil {
		m.log.Warn("wiping the old superblocks after moving the metadata failed; they lie in the data area now", "err", wipeErr)
	}
	return nil
}

// foldAL marks every block of the activity log's extents and empties the
// log. m.mu held, no write holding extents.
func (m *Meta) foldAL() {
	for _, e := range m.al.Active() {
		m.bm.Set(e.Blocks())
	}
	m.al.Reset()
}

// clearRing empties the activity log and its ring at the current size, each
// step durable before the next, so that a crash anywhere leaves a ring
// whose transactions are all valid for the superblock of the moment: the
// log folded into the bitmap (pages written), an empty transaction, a
// superblock naming it as the floor, then every other ring block zeroed.
// Called with m.io and m.mu held; m.mu is released during the I/O and held
// again on return.
func (m *Meta) clearRing() error {
	m.foldAL()
	pages := m.snapshotPages(m.bm.DirtyPages())
	seq := m.al.NextSeq()
	slot := m.txSlot(0)
	sb := m.sb
	m.mu.Unlock()
	w := m.newWriter()
	m.writePages(w, pages)
	w.sync()
	w.write(offALRing+int64(slot)*BlockSize, appendTx(nil, seq, slot, nil))
	w.sync()
	sb.ALFloor = seq
	m.putSuper(w, &sb)
	if w.err == nil {
		m.mu.Lock()
		m.sb, m.slot = sb, 1-m.slot
		m.mu.Unlock()
	}
	zero := make([]byte, ALRingBlocks*BlockSize)
	if slot > 0 {
		w.write(offALRing, zero[:slot*BlockSize])
	}
	if slot+1 < ALRingBlocks {
		w.write(offALRing+int64(slot+1)*BlockSize, zero[(slot+1)*BlockSize:])
	}
	w.sync()
	m.mu.Lock()
	m.stats.BitmapWrites += uint64(len(pages))
	m.stats.ALTransactions++
	if w.err != nil {
		m.fail(w.err)
		return m.err
	}
	return nil
}
