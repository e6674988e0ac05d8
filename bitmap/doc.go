// Package bitmap holds the in-memory state that says which blocks may differ
// from the peer: the dirty Bitmap (1 bit per 4 KiB block) with its on-disk
// page encoding, and the ActivityLog logic that bounds which 4 MiB extents
// may be written without an activity-log transaction first. It does no I/O
// and starts no goroutines; package metadisk persists both.
//
// # Concurrency
//
// Neither Bitmap nor ActivityLog is safe for concurrent use. Their owner
// (metadisk.Meta) serialises every call with one mutex.
//
// # Bitmap
//
// Block k of the device (bytes [k·4096, (k+1)·4096)) is bit k. A set bit
// means "may differ from the peer". Bits are set by writes the peer has not
// confirmed, and cleared only by resync. The bitmap tracks which of its
// on-disk pages changed since they were last written (DirtyPages), so the
// metadata layer writes only those.
//
// # On-disk bitmap page (format version 1)
//
// The bitmap is stored in 4096-byte pages. Each page carries 3968 bytes
// (31744 blocks, exactly 31 activity-log extents, 124 MiB of data) of bits
// and a checksum, so a torn or corrupt page is detected and never trusted.
// Integers are big-endian; the bits are little-endian words, i.e. block k of
// the page is bit k%8 of payload byte k/8.
//
//	offset size  field
//	0      4     magic "NMBP"
//	4      2     page format version (1)
//	6      2     flags, zero
//	8      4     page index p: the page covers blocks [p·31744, (p+1)·31744)
//	12     4     reserved, zero
//	16     8     number of blocks of the whole bitmap (detects a page from
//	             a bitmap of another size)
//	24     96    reserved, zero
//	120    3968  bits
//	4088   8     xxhash64 of bytes [0, 4088)
//
// A page is accepted only if its checksum, magic, version, index and block
// count match and no bit past the end of the device is set.
//
// # Activity log
//
// An extent is 4 MiB (1024 blocks); extent e covers blocks
// [e·1024, (e+1)·1024) and its bits lie in bitmap page e/31. Before a write
// touches an extent, the extent must be in the durable activity log, so that
// after a crash every block that may have been written but not replicated
// lies either in a set bit of the persisted bitmap or in a logged extent
// (invariant I1). The log holds at most al-extents extents (default 1237,
// range 7-65534). A write calls Acquire for its extents (all or nothing):
// extents already logged cost nothing; new ones wait for the next
// Transaction, which also evicts the least recently used idle extents (no
// references) when the log is full. Writes waiting at the same time share
// one transaction (group commit). An evicted extent's bitmap page must be
// written before the transaction that drops it, so its bits are on disk by
// the time the log no longer covers it.
package bitmap
