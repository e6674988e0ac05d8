// Package wire encodes and decodes the replication messages two nodes
// exchange over a transport.Session. The transport frames, checksums or
// seals, and types each payload; wire defines only the payloads: one
// struct per message type, an Append method to encode one, and Decode to
// read one back, checked field by field.
//
// # Streams
//
// A session has two streams (see package transport). Each message has its
// stream, so that acknowledgements never queue behind data:
//
//	Data     Params, State, UUIDs, Bitmap, SyncUUID, Write, Barrier,
//	         ResyncRequest, ResyncReply, ResyncAck, VerifyRequest,
//	         OutOfSync, Command, Sizes, ReadRequest, ReadReply
//	Control  BarrierAck, WriteAck, VerifyReply
//
// ResyncAck travels on the data stream so that the target's last acks
// reach the source before its Command "resync done".
//
// The package does not enforce the streams; the replicator sends each
// message on its own.
//
// # Decoding
//
// Decode rejects, with an error wrapping ErrMalformed that names the
// message and the field, a payload that is short or has trailing bytes, a
// version other than 1, an enum value out of range, a reserved flag bit
// set, a length out of its bounds, a misaligned offset or length, a range
// whose offset+length overflows uint64, data whose size disagrees with
// its length, and a non-canonical encoding (a varint that is not minimal):
// every payload Decode accepts is the one Append makes of the result. It
// never panics and allocates O(len(payload)). The byte slices of a
// decoded message (Write.Data, ResyncReply.Data, the digests) alias the
// payload: the caller owns it and must not reuse it while the message is
// in use (a transport.Message's payload belongs to its receiver).
//
// # Bounds
//
//	Write, ResyncReply data               ≤ MaxData (32 MiB)
//	Length of a Write                     1..MaxData, multiple of 512;
//	                                      Offset multiple of 512
//	Length of a resync, verify or         1..MaxData, multiple of 4096;
//	  out-of-sync range                   Offset multiple of 4096
//	Offset+Length of any range            ≤ 2^64-1
//	ResyncRequest digest                  0..MaxDigest (64) bytes
//	VerifyRequest digest                  1..MaxDigest (64) bytes
//	Params algorithm names                0..MaxName (64) bytes, printable ASCII
//	Params.MaxEpoch                       1..20000
//	Bitmap chunk Count                    0..2^32 blocks
//
// A Write payload, the largest, is 31 bytes plus its data: within
// transport.MaxPayload.
//
// # Layouts (version 1)
//
// Integers are big-endian; every payload starts with its version, 1. A
// later version that changes a payload will get a new version byte or a
// new message type; a decoder of version 1 rejects both.
//
// Params (16):
//
//	offset size field
//	0      1    version: 1
//	1      8    disk size: usable bytes of the backing disk, 0 diskless
//	9      8    size: the size exported or last agreed, 0 none
//	17     1    protocol: 'A', 'B' or 'C'
//	18     1    after-sb-0pri: policy code 0..7
//	19     1    after-sb-1pri: policy code 0..7
//	20     1    after-sb-2pri: policy code 0..7
//	21     4    flags: 1 discard-my-data, 2 csums; others zero
//	25     4    max-epoch-size: 1..20000
//	29     1+n  csums-alg: length n ≤ 64, then n bytes of printable ASCII
//	…      1+n  verify-alg: likewise
//
// State (17):
//
//	offset size field
//	0      1    version: 1
//	1      1    role: 0 unknown, 1 primary, 2 secondary
//	2      1    disk: DRBD disk state 0 (Diskless) .. 8 (UpToDate)
//	3      1    flags: 1 user-paused sync; others zero
//
// UUIDs (18):
//
//	offset size field
//	0      1    version: 1
//	1      8    current UUID
//	9      8    bitmap UUID
//	17     8    history UUID 0
//	25     8    history UUID 1
//	33     8    bits set in the sender's bitmap
//	41     8    flags: 1 discard-my-data, 2 crashed primary,
//	            4 inconsistent, 8 skip initial sync; others zero
//
// Bitmap (19), one chunk of a bitmap:
//
//	offset size field
//	0      1    version: 1
//	1      1    flags: 1 last chunk; others zero
//	2      8    start: first block described
//	10     8    count: blocks described, ≤ 2^32; 0 only in the last
//	            chunk, which then has no runs
//	18     …    runs: uvarints (encoding/binary, minimal) to the end of
//	            the payload, alternately clear and set blocks, from a
//	            clear run that may be 0; no other run is 0; they sum to
//	            count
//
// SyncUUID (20):
//
//	offset size field
//	0      1    version: 1
//	1      8    UUID
//
// Write (21):
//
//	offset size field
//	0      1    version: 1
//	1      8    seq: per-session sequence number
//	9      8    epoch
//	17     8    offset in bytes: multiple of 512
//	25     4    length in bytes: multiple of 512, 1..MaxData
//	29     1    kind: 0 data, 1 trim, 2 write zeroes
//	30     1    flags: 1 FUA, 2 ack wanted; others zero
//	31     n    data: length bytes for kind 0, none otherwise
//
// Barrier (22):
//
//	offset size field
//	0      1    version: 1
//	1      8    epoch
//	9      4    writes in the epoch
//	13     1    flags: 1 flush (durable before any later write); others zero
//
// BarrierAck (23):
//
//	offset size field
//	0      1    version: 1
//	1      8    epoch
//	9      4    writes in the epoch
//
// WriteAck (24):
//
//	offset size field
//	0      1    version: 1
//	1      8    seq of the Write
//	9      1    status: 0 ok, 1 failed
//
// ResyncRequest (25):
//
//	offset size field
//	0      1    version: 1
//	1      8    id
//	9      8    offset in bytes: multiple of 4096
//	17     4    length in bytes: multiple of 4096, 1..MaxData
//	21     2+n  digests: length n (big-endian), then n bytes: none, or one
//	            digest of 1..64 bytes per 4 KiB block of the range
//	            (at most 256 blocks), all of one size
//
// VerifyRequest (28):
//
//	offset size field
//	0      1    version: 1
//	1      8    id
//	9      8    offset in bytes: multiple of 4096
//	17     4    length in bytes: multiple of 4096, 1..MaxData
//	21     1+n  digest: length n, then n bytes; 1 ≤ n ≤ 64
//
// ResyncReply (26):
//
//	offset size field
//	0      1    version: 1
//	1      8    id of the request
//	9      8    offset in bytes: multiple of 4096
//	17     4    length in bytes: multiple of 4096, 1..MaxData
//	21     1    status: 0 data, 1 in sync, 2 read error, 3 partial
//	22     m    block map (status 3 only): one bit per 4 KiB block of the
//	            range, bit i%8 of byte i/8 for block i, m = ⌈blocks/8⌉;
//	            set for the blocks whose digests differ, at least one,
//	            none past the range
//	22+m   n    data: length bytes with status 0, the marked blocks in
//	            order with status 3, none otherwise
//
// ReadRequest (33), sent only on sessions of transport version 5 and up:
//
//	offset size field
//	0      1    version: 1
//	1      8    id
//	9      8    offset in bytes (any alignment)
//	17     4    length in bytes: 1..MaxData
//
// ReadReply (34), likewise:
//
//	offset size field
//	0      1    version: 1
//	1      8    id of the request
//	9      8    offset in bytes
//	17     4    length in bytes: 1..MaxData
//	21     1    status: 0 data, 1 error
//	22     n    data: length bytes with status 0, none otherwise
//
// ResyncAck (27) and VerifyReply (29):
//
//	offset size field
//	0      1    version: 1
//	1      8    id of the request
//	9      8    offset in bytes: multiple of 4096
//	17     4    length in bytes: multiple of 4096, 1..MaxData
//	21     1    status: ResyncAck 0 ok, 1 failed;
//	            VerifyReply 0 equal, 1 differs, 2 read error
//
// OutOfSync (30):
//
//	offset size field
//	0      1    version: 1
//	1      8    offset in bytes: multiple of 4096
//	9      4    length in bytes: multiple of 4096, 1..MaxData
//
// Command (31):
//
//	offset size field
//	0      1    version: 1
//	1      1    code: 1 invalidate, 2 invalidate-remote, 3 verify start,
//	            4 pause sync, 5 resume sync, 6 resync done, 7 verify done,
//	            8 ahead (the receiver is Behind)
//	2      8    argument: first block (3), blocks not synced (6),
//	            differing blocks (7); 0 otherwise (not checked)
//
// Sizes (32), online resize; only to a peer whose session speaks
// transport protocol version 4 or newer (SizesVersion), since a node of
// version 3 or older does not know the type and ends the session on it:
//
//	offset size field
//	0      1    version: 1
//	1      1    kind: 1 query (answer with a reply), 2 reply, 3 set (resize
//	            to size, answer with done), 4 done
//	2      1    flags: 1 assume-clean (set only: the grown area is not
//	            resynced); others zero, and zero on other kinds
//	3      1    status: done 0 resized, 1 failed (the sender logs why),
//	            2 resized and blocks marked out of sync on the sender
//	            (its old internal metadata area: resync even with
//	            assume-clean); 0 on other kinds
//	4      8    disk: the sender's capacity, the most data its disk and
//	            metadata hold now; multiple of 4096
//	12     8    size: the new size (set, done) or the sender's current
//	            size (query, reply); multiple of 4096, not 0 in a set
//
// A resize between two connected nodes runs query → reply → set → done,
// application I/O held on the Primary from the set until the done; see
// package replicator (resize.go).
package wire
