package metadisk

import (
	"fmt"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// Span is the set of extents a write holds in the activity log, from
// BeginWrite until EndWrite.
type Span struct {
	first, last bitmap.Extent
	held        bool
}

// usable returns why the metadata cannot be used, if it cannot. m.mu held.
func (m *Meta) usable() error {
	if m.closed {
		return ErrClosed
	}
	return m.err
}

// lockIO takes the I/O lock, then m.mu, and checks that the metadata is
// still usable. On success the caller holds both and releases each; on
// failure it holds neither.
func (m *Meta) lockIO() error {
	m.io.Lock()
	m.mu.Lock()
	if err := m.usable(); err != nil {
		m.mu.Unlock()
		m.io.Unlock()
		return err
	}
	return nil
}

// fail makes an I/O error sticky and wakes every waiter. m.mu held.
func (m *Meta) fail(err error) {
	if m.err == nil {
		m.err = fmt.Errorf("%w: %w", ErrFailed, err)
		m.log.Error("metadata write failed; the metadata must be re-attached", "err", err)
	}
	m.cond.Broadcast()
}

type encodedPage struct {
	page int
	data []byte
}

// snapshotPages encodes the given pages if they are dirty and marks them
// clean: from here on a change makes them dirty again. m.mu held.
func (m *Meta) snapshotPages(pages []int) []encodedPage {
	var out []encodedPage
	for _, p := range pages {
		if !m.bm.PageDirty(p) {
			continue
		}
		out = append(out, encodedPage{p, m.bm.AppendPage(nil, p)})
		m.bm.MarkClean(p)
	}
	return out
}

// writePages writes encoded pages, coalescing neighbours. m.io held.
func (m *Meta) writePages(w *writer, pages []encodedPage) {
	for i := 0; i < len(pages); {
		j := i + 1
		buf := pages[i].data
		for j < len(pages) && pages[j].page == pages[j-1].page+1 {
			buf = append(buf, pages[j].data...)
			j++
		}
		w.write(offBitmap+int64(pages[i].page)*BlockSize, buf)
		i = j
	}
}

// txSlot returns the ring slot for a transaction of n extents and advances
// the write position: a transaction never wraps around the ring. m.mu held.
func (m *Meta) txSlot(n int) int {
	slot := m.nextSlot
	if slot+TxBlocks(n) > ALRingBlocks {
		slot = 0
	}
	m.nextSlot = (slot + TxBlocks(n)) % ALRingBlocks
	return slot
}

func (m *Meta) newWriter() *writer {
	return &writer{dev: m.dev, base: m.layout.Offset, noSync: m.noSync}
}

// ApplyAL folds the activity log found by Open into the bitmap: every block
// of every logged extent is marked out of sync, the bitmap is written, an
// empty transaction replaces the log, and the superblock records it (with
// crashed-primary set if the node was Primary). Clean metadata is left
// alone. It returns the number of bits newly set.
func (m *Meta) ApplyAL() (uint64, error) {
	if err := m.lockIO(); err != nil {
		return 0, err
	}
	defer m.io.Unlock()
	if m.rec.Applied || m.rec.Clean {
		m.mu.Unlock()
		return 0, nil
	}
	var newly uint64
	for _, e := range m.rec.ALActive {
		newly += m.bm.Set(e.Blocks())
	}
	var set Flags
	if m.sb.Flags&FlagPrimary != 0 {
		set = FlagCrashedPrimary
	}
	err := m.writeClean(set)
	defer m.mu.Unlock()
	if err != nil {
		m.fail(err)
		return 0, m.err
	}
	m.rec.Applied, m.rec.AppliedBlocks, m.rec.Clean = true, newly, true
	m.log.Info("activity log applied", "extents", len(m.rec.ALActive), "blocks_marked", newly,
		"crashed_primary", m.sb.Flags&FlagCrashedPrimary != 0)
	return newly, nil
}

// writeClean makes the on-disk state clean: every changed bitmap page, then
// an empty activity-log transaction, then a superblock that names it as
// the floor and carries the clean flag (and set), each step flushed.
// Called with m.io and m.mu held; m.mu is released during the I/O and
// held again on return.
func (m *Meta) writeClean(set Flags) error {
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
	sb.Flags |= FlagClean | set
	m.putSuper(w, &sb)

	m.mu.Lock()
	m.stats.BitmapWrites += uint64(len(pages))
	m.stats.ALTransactions++
	if w.err != nil {
		return w.err
	}
	m.sb, m.slot = sb, 1-m.slot
	return nil
}

// putSuper writes sb (with the next sequence number) to the slot not in
// use and flushes. m.io held; the caller installs sb in m on success.
func (m *Meta) putSuper(w *writer, sb *Superblock) {
	m.mu.Lock()
	sb.Seq = m.sb.Seq + 1
	other := 1 - m.slot
	m.stats.SuperWrites++
	m.mu.Unlock()
	b, err := sb.AppendBinary(nil)
	if err != nil && w.err == nil {
		w.err = err
	}
	w.write(int64(other)*BlockSize, b)
	w.sync()
}

// UpdateSuperblock changes the superblock (UUIDs, flags) with f and writes
// it durably. Kind, sizes, names and sequence cannot be changed this way.
func (m *Meta) UpdateSuperblock(f func(*Superblock)) error {
	if err := m.lockIO(); err != nil {
		return err
	}
	defer m.io.Unlock()
	old := m.sb
	m.mu.Unlock()
	sb := old
	f(&sb)
	// Only UUIDs and flags may change.
	sb.Kind, sb.Index, sb.DataSize, sb.AreaSize = old.Kind, old.Index, old.DataSize, old.AreaSize
	sb.Node, sb.Resource, sb.Created, sb.DevUUID, sb.ALFloor = old.Node, old.Resource, old.Created, old.DevUUID, old.ALFloor
	w := m.newWriter()
	m.putSuper(w, &sb)
	m.mu.Lock()
	defer m.mu.Unlock()
	if w.err != nil {
		m.fail(w.err)
		return m.err
	}
	m.sb, m.slot = sb, 1-m.slot
	return nil
}

// Activate readies the metadata for writes: the activity log is applied if
// the last stop was unclean, then the clean flag is cleared on disk, so a
// crash from here on is detected at the next Open.
func (m *Meta) Activate() error {
	if _, err := m.ApplyAL(); err != nil {
		return err
	}
	if err := m.UpdateSuperblock(func(sb *Superblock) { sb.Flags &^= FlagClean }); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	m.active = true
	return nil
}

// BeginWrite makes sure every extent touched by length bytes at off is in
// the durable activity log and holds it there until EndWrite: a write may
// go to the data disk only after BeginWrite returns. Writers that need new
// extents at the same time share one transaction (group commit). When the
// log is full of extents with writes in flight, BeginWrite waits. A write
// must lie inside the data area and span at most ALCapacity extents;
// callers split larger ones (ErrWriteRange).
func (m *Meta) BeginWrite(off, length int64) (Span, error) {
	if length <= 0 {
		return Span{}, nil
	}
	first, last := bitmap.ExtentsOf(off, length)
	if n := int(last-first) + 1; n > m.al.Capacity() {
		return Span{}, fmt.Errorf("%w: %d bytes at %d span %d extents, al-extents is %d", ErrWriteRange, length, off, n, m.al.Capacity())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if data := m.layout.DataSize; off < 0 || off > data-length {
		return Span{}, fmt.Errorf("%w: %d bytes at %d, the data area is %d bytes", ErrWriteRange, length, off, data)
	}
	for {
		if err := m.usable(); err != nil {
			return Span{}, err
		}
		if !m.active || m.sb.Flags&FlagClean != 0 {
			return Span{}, ErrNotActive
		}
		if m.al.Acquire(first, last) != bitmap.Full {
			break
		}
		m.wait()
	}
	for !m.al.Ready(first, last) {
		if err := m.usable(); err != nil {
			m.al.Release(first, last)
			return Span{}, err
		}
		if !m.committing {
			if tx := m.al.Prepare(); tx != nil {
				m.commit(tx)
				continue
			}
		}
		m.wait()
	}
	if err := m.usable(); err != nil {
		m.al.Release(first, last)
		return Span{}, err
	}
	return Span{first, last, true}, nil
}

// ALCapacity returns al-extents: the most extents one write may span.
func (m *Meta) ALCapacity() int { return m.al.Capacity() }

func (m *Meta) wait() {
	m.waiting++
	m.cond.Wait()
	m.waiting--
}

// SetDataSync sets what flushes the data device when the metadata is on
// another device (external): a transaction that evicts extents then
// flushes the data first, since the log no longer covers their blocks
// after it (I1 across a power loss). Metadata on the data's own device
// needs none: its flushes cover the data.
func (m *Meta) SetDataSync(f func() error) {
	m.mu.Lock()
	m.dataSync = f
	m.mu.Unlock()
}

// commit writes one activity-log transaction: first the bitmap pages of the
// extents it evicts, then the transaction, each flushed. Called with m.mu
// held; releases it during the I/O.
func (m *Meta) commit(tx *bitmap.Transaction) {
	m.committing = true
	m.mu.Unlock()
	m.io.Lock()
	m.mu.Lock()
	if m.usable() != nil {
		// Failed or closed while this writer waited for the I/O lock:
		// nothing more may reach the disk. Waiters see the error.
		m.io.Unlock()
		m.committing = false
		m.cond.Broadcast()
		return
	}
	pages := m.snapshotPages(tx.EvictPages())
	slot := m.txSlot(len(tx.Active))
	dataSync := m.dataSync
	m.mu.Unlock()

	w := m.newWriter()
	if len(tx.Evict) > 0 && dataSync != nil && !m.noSync {
		// The evicted extents' writes leave the log's cover: they must
		// be on the data disk before the transaction can be.
		if err := dataSync(); err != nil {
			w.err = fmt.Errorf("flushing the data disk before the activity log lets extents go: %w", err)
		}
	}
	if len(pages) > 0 {
		m.writePages(w, pages)
		w.sync()
	}
	w.write(offALRing+int64(slot)*BlockSize, appendTx(nil, tx.Seq, slot, tx.Active))
	w.sync()
	m.io.Unlock()

	m.mu.Lock()
	m.committing = false
	m.stats.BitmapWrites += uint64(len(pages))
	m.stats.ALTransactions++
	if w.err != nil {
		m.fail(w.err)
		return
	}
	m.al.Committed(tx)
	m.cond.Broadcast()
}

// EndWrite releases the extents a write held: its blocks no longer need
// the activity log's cover (they are safe on both nodes, or marked in the
// bitmap).
func (m *Meta) EndWrite(s Span) {
	if !s.held {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.al.Release(s.first, s.last)
	if m.waiting > 0 {
		m.cond.Broadcast()
	}
}

// MarkOutOfSync sets the bits of length bytes at off and returns how many
// were newly set. The bits reach the disk at the next FlushBitmap (or when
// their extent leaves the activity log); while the write holds its extents
// with BeginWrite, the activity log covers them.
func (m *Meta) MarkOutOfSync(off, length int64) uint64 {
	first, n := bitmap.BlockRange(off, length)
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.Set(first, n)
}

// MarkInSync clears the bits of length bytes at off (the blocks were
// resynchronised) and returns how many were set.
func (m *Meta) MarkInSync(off, length int64) uint64 {
	first, n := bitmap.BlockRange(off, length)
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.Clear(first, n)
}

// NextRun returns the first run of set bits at or after block from: its
// first block and its length (resync walks the bitmap with it).
func (m *Meta) NextRun(from uint64) (start, n uint64, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.NextRun(from)
}

// Blocks returns the number of blocks the bitmap covers.
func (m *Meta) Blocks() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.Len()
}

// OutOfSync returns the number of set bits.
func (m *Meta) OutOfSync() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.Count()
}

// Test reports whether a block's bit is set.
func (m *Meta) Test(block uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bm.Test(block)
}

// ActiveExtents returns the extents in the durable activity log.
func (m *Meta) ActiveExtents() []bitmap.Extent {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.al.Active()
}

// FlushBitmap writes every changed bitmap page and flushes.
func (m *Meta) FlushBitmap() error {
	if err := m.lockIO(); err != nil {
		return err
	}
	defer m.io.Unlock()
	pages := m.snapshotPages(m.bm.DirtyPages())
	m.mu.Unlock()
	if len(pages) == 0 {
		return nil
	}
	w := m.newWriter()
	m.writePages(w, pages)
	w.sync()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stats.BitmapWrites += uint64(len(pages))
	if w.err != nil {
		m.fail(w.err)
		return m.err
	}
	return nil
}

// Close shuts the metadata down cleanly: the bitmap is written, an empty
// transaction replaces the activity log and the superblock is marked clean.
// It refuses, leaving the metadata unclean, while writes hold extents.
// After Close every method returns ErrClosed.
func (m *Meta) Close() error {
	m.io.Lock()
	defer m.io.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if m.err != nil {
		m.closed = true
		m.cond.Broadcast()
		return m.err
	}
	if n := m.al.InUse(); n > 0 || m.committing {
		return fmt.Errorf("metadisk: close with writes in flight on %d extents", n)
	}
	// From here no write may begin: BeginWrite, and a commit waiting for
	// m.io, see ErrClosed while the clean state is written.
	m.closed, m.active = true, false
	m.cond.Broadcast()
	if m.sb.Flags&FlagClean != 0 {
		return nil
	}
	if err := m.writeClean(0); err != nil {
		m.err = err
		return fmt.Errorf("close metadata: %w", err)
	}
	m.al.Reset()
	return nil
}

// Abandon drops the metadata without writing anything, as a crash would:
// the next Open finds it unclean and applies the activity log.
func (m *Meta) Abandon() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.cond.Broadcast()
}
