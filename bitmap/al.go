package bitmap

import (
	"slices"
)

// Activity-log geometry and limits.
const (
	ExtentBlocks = 1024                     // bitmap bits per extent
	ExtentSize   = ExtentBlocks * BlockSize // 4 MiB
	// ExtentsPerPage is how many whole extents one bitmap page covers.
	ExtentsPerPage = BitsPerPage / ExtentBlocks

	DefaultALExtents = 1237
	MinALExtents     = 7
	MaxALExtents     = 65534
)

// Extent numbers a 4 MiB region of the device.
type Extent uint32

// ExtentOf returns the extent holding a block.
func ExtentOf(block uint64) Extent { return Extent(block / ExtentBlocks) }

// ExtentsOf returns the first and last extent touched by length bytes at
// off (length > 0).
func ExtentsOf(off, length int64) (first, last Extent) {
	return Extent(off / ExtentSize), Extent((off + length - 1) / ExtentSize)
}

// Page returns the bitmap page holding the extent's bits.
func (e Extent) Page() int { return int(e) / ExtentsPerPage }

// Blocks returns the extent's first block and block count.
func (e Extent) Blocks() (first, n uint64) { return uint64(e) * ExtentBlocks, ExtentBlocks }

// Status is the answer to Acquire.
type Status int

const (
	// Ready: every extent is in the durable activity log; write at once.
	Ready Status = iota
	// Wait: the references are taken, but some extent must first be
	// written to the log by a transaction; wait until Ready reports true.
	Wait
	// Full: there is no room; nothing was taken. Retry after a Release.
	Full
)

// Transaction is one change of the activity log: the complete set of
// active extents after it (Active, sorted), which extents it adds and which
// idle ones it evicts. The bitmap pages of the evicted extents must be on
// disk before the transaction is written (EvictPages).
type Transaction struct {
	Seq    uint64
	Active []Extent
	Add    []Extent
	Evict  []Extent
}

// EvictPages returns the bitmap pages covering the evicted extents.
func (t *Transaction) EvictPages() []int {
	var pages []int
	for _, e := range t.Evict {
		pages = append(pages, e.Page())
	}
	slices.Sort(pages)
	return slices.Compact(pages)
}

type entryState uint8

const (
	stPending    entryState = iota // waiting for the next transaction
	stCommitting                   // in the transaction being written
	stActive                       // durable in the log
)

type alEntry struct {
	ext        Extent
	refs       int
	state      entryState
	prev, next *alEntry // idle list links (active with no references)
}

// ActivityLog decides which 4 MiB extents must be in the on-disk activity
// log before a write may touch them: a bounded set of "hot" extents with an
// LRU of the idle ones. It does no I/O: its owner writes each Transaction
// that Prepare returns, makes it durable, and then calls Committed.
//
// Every write takes references on its extents with Acquire and drops them
// with Release once the blocks are safe (written locally and, with a peer,
// acknowledged); an extent with references is never evicted. At most one
// transaction is prepared at a time.
//
// An ActivityLog is not safe for concurrent use: the owner serialises calls.
type ActivityLog struct {
	capacity int
	entries  map[Extent]*alEntry
	idle     alEntry // sentinel of the idle list: head.next = least recently used
	nIdle    int
	nActive  int // stActive entries
	pending  []*alEntry
	inTx     *Transaction
	seq      uint64

	transactions, evictions uint64
}

// NewActivityLog returns an empty log of the given capacity (al-extents);
// lastSeq is the sequence number of the newest transaction already on
// disk, so that new transactions are numbered after it.
func NewActivityLog(capacity int, lastSeq uint64) *ActivityLog {
	a := &ActivityLog{capacity: max(capacity, 1), entries: make(map[Extent]*alEntry), seq: lastSeq}
	a.idle.next, a.idle.prev = &a.idle, &a.idle
	return a
}

// Capacity returns al-extents.
func (a *ActivityLog) Capacity() int { return a.capacity }

// Seq returns the sequence number of the last prepared transaction.
func (a *ActivityLog) Seq() uint64 { return a.seq }

// Stats returns the number of transactions prepared and extents evicted.
func (a *ActivityLog) Stats() (transactions, evictions uint64) { return a.transactions, a.evictions }

// Len returns the number of extents in the log or on their way into it.
func (a *ActivityLog) Len() int { return len(a.entries) }

// Active returns the durable active set, sorted.
func (a *ActivityLog) Active() []Extent {
	l := make([]Extent, 0, a.nActive)
	for e, ent := range a.entries {
		if ent.state == stActive {
			l = append(l, e)
		}
	}
	slices.Sort(l)
	return l
}

func (a *ActivityLog) unlinkIdle(ent *alEntry) {
	ent.prev.next, ent.next.prev = ent.next, ent.prev
	ent.prev, ent.next = nil, nil
	a.nIdle--
}

func (a *ActivityLog) pushIdle(ent *alEntry) {
	ent.prev, ent.next = a.idle.prev, &a.idle
	a.idle.prev.next = ent
	a.idle.prev = ent
	a.nIdle++
}

// Acquire takes one reference on every extent in [first, last] for a write,
// all or nothing. Ready means the write may proceed; Wait means it must wait
// until Ready(first, last) holds (after a transaction); Full means nothing
// was taken because the log has no room until some extent is released (a
// span of more than Capacity extents is always Full: callers split it).
func (a *ActivityLog) Acquire(first, last Extent) Status {
	if last < first {
		return Ready
	}
	var fresh, reused int
	for e := first; ; e++ {
		ent := a.entries[e]
		switch {
		case ent == nil:
			fresh++
		case ent.state == stActive && ent.refs == 0:
			reused++
		}
		if e == last {
			break
		}
	}
	// Extents with references (in the log, pending or committing) must
	// never outnumber the capacity, or a pending extent could wait for
	// room that only its own waiters could free.
	if len(a.entries)+fresh-(a.nIdle-reused) > a.capacity {
		return Full
	}
	st := Ready
	for e := first; ; e++ {
		ent := a.entries[e]
		if ent == nil {
			ent = &alEntry{ext: e, state: stPending}
			a.entries[e] = ent
			a.pending = append(a.pending, ent)
		} else if ent.state == stActive && ent.refs == 0 {
			a.unlinkIdle(ent)
		}
		ent.refs++
		if ent.state != stActive {
			st = Wait
		}
		if e == last {
			break
		}
	}
	return st
}

// Ready reports whether every extent in [first, last] is durable in the log
// (the caller holds references on them).
func (a *ActivityLog) Ready(first, last Extent) bool {
	for e := first; ; e++ {
		if ent := a.entries[e]; ent == nil || ent.state != stActive {
			return false
		}
		if e == last {
			return true
		}
	}
}

// Release drops one reference on every extent in [first, last]. An active
// extent left without references becomes the most recently used idle one.
func (a *ActivityLog) Release(first, last Extent) {
	for e := first; ; e++ {
		if ent := a.entries[e]; ent != nil && ent.refs > 0 {
			ent.refs--
			if ent.refs == 0 && ent.state == stActive {
				a.pushIdle(ent)
			}
		}
		if e == last {
			break
		}
	}
}

// Pending reports whether extents wait for a transaction.
func (a *ActivityLog) Pending() bool { return len(a.pending) > 0 }

// Prepare returns the next transaction to write, or nil if none is needed
// or possible (one is already being written, nothing waits, or there is no
// room until an extent is released). It evicts least recently used idle
// extents to make room; their bitmap pages must be written before the
// transaction (Transaction.EvictPages).
func (a *ActivityLog) Prepare() *Transaction {
	if a.inTx != nil || len(a.pending) == 0 {
		return nil
	}
	room := a.capacity - a.nActive
	take := min(len(a.pending), room+a.nIdle)
	if take <= 0 {
		return nil
	}
	tx := &Transaction{}
	for need := take - room; need > 0; need-- {
		victim := a.idle.next
		a.unlinkIdle(victim)
		delete(a.entries, victim.ext)
		a.nActive--
		tx.Evict = append(tx.Evict, victim.ext)
		a.evictions++
	}
	for _, ent := range a.pending[:take] {
		ent.state = stCommitting
		tx.Add = append(tx.Add, ent.ext)
	}
	a.pending = slices.Delete(a.pending, 0, take)
	tx.Active = make([]Extent, 0, a.nActive+take)
	for e, ent := range a.entries {
		if ent.state == stActive || ent.state == stCommitting {
			tx.Active = append(tx.Active, e)
		}
	}
	slices.Sort(tx.Active)
	slices.Sort(tx.Add)
	slices.Sort(tx.Evict)
	a.seq++
	tx.Seq = a.seq
	a.inTx = tx
	a.transactions++
	return tx
}

// Committed records that tx is durable: its extents become active.
func (a *ActivityLog) Committed(tx *Transaction) {
	if tx != a.inTx {
		panic("bitmap: Committed with a transaction that was not prepared")
	}
	a.inTx = nil
	for _, e := range tx.Add {
		ent := a.entries[e]
		ent.state = stActive
		a.nActive++
		if ent.refs == 0 {
			a.pushIdle(ent)
		}
	}
}

// NextSeq reserves the next sequence number for a transaction written
// outside Prepare (the empty transaction that replaces an applied log).
func (a *ActivityLog) NextSeq() uint64 {
	a.seq++
	return a.seq
}

// InUse returns the number of extents with references.
func (a *ActivityLog) InUse() int {
	n := 0
	for _, ent := range a.entries {
		if ent.refs > 0 {
			n++
		}
	}
	return n
}

// Reset empties the log after its contents were folded into the bitmap
// (apply-al) or all bits were set anyway; references must all be released.
func (a *ActivityLog) Reset() {
	clear(a.entries)
	a.idle.next, a.idle.prev = &a.idle, &a.idle
	a.nIdle, a.nActive, a.pending, a.inTx = 0, 0, nil, nil
}
