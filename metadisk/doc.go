// Package metadisk is the on-disk metadata of a resource: a superblock with
// the generation UUIDs and flags, the activity-log ring, and the dirty
// bitmap. It makes the promise of invariant I1 hold across crashes: after
// any crash, every block that may differ from the peer is set in the
// persisted bitmap or lies in an extent of the newest complete activity-log
// transaction, which Open finds and ApplyAL folds into the bitmap.
//
// # Placement
//
//	meta-disk internal;      the area sits at the end of the data disk; the
//	                         data size is what remains, rounded down to 4 KiB
//	meta-disk PATH;          the area starts at offset 0 of PATH, sized to the data
//	meta-disk PATH[N];       the area sits in 128 MiB slot N of PATH (data up to
//	                         about 3.9 TiB), DRBD's indexed convention
//
// # Metadata area (format version 1; offsets relative to its start)
//
//	offset            size            content
//	0                 4 KiB           superblock slot A
//	4 KiB             4 KiB           superblock slot B
//	8 KiB             1 MiB           activity-log ring: 256 blocks of 4 KiB
//	8 KiB + 1 MiB     P × 4 KiB       bitmap pages (package bitmap's page format),
//	                                  P = ceil(blocks / 31744), blocks = data / 4 KiB
//
// Integers are big-endian. Every block ends with an xxhash64 of the bytes
// before it, and reserved bytes must be zero: a block that fails either
// check is never trusted.
//
// # Superblock (4096 bytes)
//
//	offset size field
//	0      8    magic "NBDMIRMD"
//	8      2    format version (1)
//	10     2    placement: 1 internal, 2 external, 3 indexed
//	12     4    slot index (indexed only)
//	16     8    sequence number: +1 on every write; the newer valid slot wins
//	24     8    data size in bytes (a multiple of 4096): the size
//	            agreed with the peer, which the bitmap covers; at most
//	            what the disk provides (a larger disk is not used until
//	            `resize`)
//	32     8    metadata area size in bytes: the size the data size
//	            needs; for internal metadata at least that (the area
//	            covers the whole disk; the data size may be smaller)
//	40     4    block size (4096)
//	44     4    activity-log ring blocks (256)
//	48     4    flags: consistent 1, was-up-to-date 2, primary 4,
//	            crashed-primary 8, peer-outdated 16, clean 32
//	52     4    reserved
//	56     32   UUIDs: current, bitmap, history 1, history 2
//	88     8    activity-log floor: a transaction at least this new must be
//	            in the ring, or the log was lost
//	96     8    creation time (unix seconds)
//	104    8    metadata identity (random, fixed at create-md)
//	112    66   node name: length (2), bytes (64)
//	178    66   resource name: length (2), bytes (64)
//	244    3844 reserved
//	4088   8    xxhash64 of bytes [0, 4088)
//
// Superblocks are written alternately to the two slots, each write flushed,
// so a torn write leaves the previous one readable. Open uses the valid
// slot with the higher sequence and logs a torn or corrupt other slot; if
// neither is valid it fails (ErrNoMetadata if none was ever written,
// ErrCorrupt otherwise), never guessing a clean or a dirty state.
//
// # Activity-log transaction (1 to 65 blocks of 4096 bytes)
//
// A transaction records the complete set of active extents after a change,
// in ascending order, in ceil(n/1012) consecutive ring blocks that never
// wrap around the ring:
//
//	offset size field
//	0      4    magic "NMAL"
//	4      2    format version (1)
//	6      2    part index in the transaction
//	8      2    parts in the transaction
//	10     2    reserved
//	12     4    extents in the whole transaction (at most 65534)
//	16     8    transaction sequence number
//	24     4    ring slot of part 0
//	28     4    extents in this block (n ≤ 1012)
//	32     8    reserved
//	40     4×n  extent numbers, ascending across parts
//	4088   8    xxhash64 of bytes [0, 4088)
//
// On Open the newest transaction whose every part is present and valid is
// the activity log; a torn or partial newer one is ignored (its new extents
// were not written to yet, and its evicted extents are still in the older
// one). Every count is bounded before use and every extent checked against
// the device.
//
// # Write protocol
//
//   - Before a write touches an extent not in the log, BeginWrite writes a
//     transaction adding it (after writing the bitmap pages of any extent the
//     transaction evicts) and flushes; concurrent writers share it. With
//     SetDataSync (external metadata) a transaction that evicts extents
//     flushes the data device first: the evicted extents' writes leave the
//     log's cover only once they are on the disk.
//   - Bitmap pages are otherwise written lazily: FlushBitmap, eviction,
//     ApplyAL and Close. A torn page reads as all-set (a larger resync,
//     logged, never a lost bit).
//   - Activate clears the clean flag before the first write; Close writes the
//     bitmap, an empty transaction and a clean superblock. After an unclean
//     stop, ApplyAL (the apply-al verb, or Activate) marks every block of the
//     logged extents, writes the bitmap, an empty transaction and a superblock
//     whose floor names it, and sets crashed-primary if the node was Primary.
//
// # Resize
//
// Meta.Resize changes the data size online. External and indexed metadata
// grow in place, up to what the metadata device (or the 128 MiB slot, about
// 3.9 TiB) can describe: MaxDataIn says how much an area holds. Internal
// metadata moves to the end of the grown disk: the new area is written
// whole, its superblock last, then the old superblocks are wiped and the
// old area's blocks, now data, are marked out of sync. In every case the
// bitmap pages are written before the superblock that carries the new size;
// a crash in between leaves the old size, whose pages, if rewritten for the
// new length, read as torn (all set). A shrink first folds the activity log
// into the bitmap and clears the ring (an empty transaction, a superblock
// naming it, then the other ring blocks zeroed), so that no transaction
// names an extent past the new end.
//
// Metadata writes are serialised, so an older copy of a page never
// overtakes a newer one. A failed write makes the Meta unusable (ErrFailed):
// the caller detaches and re-attaches, which re-reads the disk.
package metadisk
