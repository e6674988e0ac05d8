// Package transport is the link between the two nodes of a resource:
// sessions of two TCP connections, mutual authentication, encryption,
// compression, framing, liveness and a resync rate limiter. It moves typed
// frames between two named nodes and knows nothing of roles or disks.
//
// # Sessions
//
// A session is two connections to the peer: a Data stream (writes, resync
// data) and a Control stream (acks, pings), so that small messages never
// queue behind megabytes of data. Both nodes listen on their address and
// dial the peer's; a session is either whole (both streams authenticated
// and confirmed) or torn down. When both dial at once, the session dialed
// by the node with the smaller name wins on both sides (Transport.admit). A
// lost session is redialed with jittered backoff (200 ms doubling to
// connect-int), at once stoppable by Close.
//
// Liveness: each side pings on the control stream every ping interval,
// and while it sends application frames at most every second, and fails
// the session when a ping is not answered within the ping timeout. Data
// written into a silently cut link (no RST) sits in socket buffers without
// an error; the pings find the cut within about 1 s + ping-timeout while
// the application sends, and within ping-int + ping-timeout on an idle
// link, whatever TCP retransmission does. Socket writes have a deadline
// renewed per 256 KiB, so a dead peer never blocks a writer for longer
// than the timeout, while a slow but moving link is not cut.
//
// # Handshake (per stream; versions 2 to 4)
//
// Each connection (inside TLS 1.3 when configured, certificates checked
// against the peer's node names on both sides) starts with plain frames,
// each at most 4 KiB and never compressed (checked from the header, before
// anything is allocated):
//
//	client → server  HELLO   versions, stream, flags, session id, instance,
//	                         challenge Cc, resource, sender, receiver
//	server → client  ACK     chosen version, flags, instance, challenge Cs
//	                         (or REFUSE code + reason)
//	client → server  AUTH    client proof
//	server → client  OK      server proof  (or REFUSE)
//
// The server refuses, saying why, a version range with no overlap, another
// resource, node names other than the configured pair, a secret on one
// side only, and (code 8, busy) a connection past 8 per host or 64 in all
// still in their handshakes. With a shared secret, each side proves
// knowledge of it over the transcript, the exact HELLO and ACK payloads:
//
//	T            = SHA-256("nbdmirror/1 transcript" ‖ len32 ‖ HELLO ‖ len32 ‖ ACK)
//	client proof = HMAC-SHA256(secret, "nbdmirror/1 client proof" ‖ T)
//	server proof = HMAC-SHA256(secret, "nbdmirror/1 server proof" ‖ T)
//
// The dialer proves first, and the server sends its proof only after the
// client's verified, so a peer without the secret learns nothing it could
// use; proofs are compared with hmac.Equal. T covers both challenges,
// both instances, the session id, stream, flags, versions and all three
// names, so a field changed in transit makes the proofs fail; a peer that
// answers with our own challenge is refused (reflection); the labels bind
// each proof to its direction; fresh challenges make a replayed transcript
// fail. Then each stream gets per-direction keys, HKDF-SHA256(secret,
// salt = Cc ‖ Cs, info = "nbdmirror/1 " direction " key " ‖ T), and every
// later frame is sealed with AES-256-GCM whose 12-byte nonce is a 4-byte
// direction tag and an 8-byte frame counter: a frame cannot be read,
// altered, replayed, reordered, or moved to the other stream or another
// session. Without a secret, every later frame carries a checksum
// (XXH3-64, see Frames) and the transport logs once that the link is
// neither authenticated nor encrypted.
//
// A failed proof, a node name other than the configured pair, or a TLS
// certificate that does not verify holds the sending host off: its
// connections are closed unanswered for 1 s, doubling to 60 s with
// failures less than 10 minutes apart; a session from the host clears the
// record. Connections that merely break (port probes, resets, timeouts)
// do not count.
//
// The control stream's HELLO carries the data stream's session id; the
// server pairs them, whichever authenticates first. The dialer then sends
// CONFIRM on the data stream; the server answers CONFIRM (the session is up
// on both sides) or CLOSE (it keeps a crossed session of its own).
//
// HELLO payload (big-endian):
//
//	offset size field
//	0      8    magic "NBDMIRTP"
//	8      2    lowest version spoken
//	10     2    highest version spoken
//	12     1    stream: 1 data, 2 control
//	13     1    flags: 1 shared secret configured, 2 TLS
//	14     2    reserved, zero
//	16     16   session id (random per session)
//	32     8    instance (random per transport: tells a restarted peer)
//	40     32   challenge Cc
//	72     1+n  resource name (1 ≤ n ≤ 64)
//	…      1+n  sender node name
//	…      1+n  receiver node name
//
// ACK payload: version (2), flags (1), reserved (1), instance (8),
// challenge Cs (32). AUTH payload: client proof (32); OK payload: server
// proof (32); both all zero without a secret. REFUSE payload: code (2),
// reason (≤ 256).
//
// # Frames
//
//	offset size field
//	0      2    type: 1-9 the transport's (HELLO ACK AUTH OK REFUSE PING
//	            PONG CONFIRM CLOSE), ≥ 16 the application's (Config.Types)
//	2      2    flags: 1 s2-compressed, 2 zstd-compressed
//	4      4    payload length n (≤ MaxPayload, checked before allocating)
//	8      n    payload
//	8+n    8    plain session frames, version 3 and 4: with S = XXH3-64 of
//	            bytes [8, 8+min(n, 64)) seeded with bytes [0, 8)
//	            (big-endian), S if n ≤ 64, else XXH3-64 of bytes
//	            [72, 8+n) seeded with S; version 2: XXH3-64 of bytes
//	            [8, 8+n) seeded with bytes [0, 8); plain handshake
//	            frames: xxhash64 of bytes [0, 8+n)
//	  or   16   AES-GCM tag; payload encrypted, header authenticated (sealed)
//
// A payload of 256 bytes or more is compressed (s2 or zstd) when that
// makes it smaller; decompression is bounded by MaxPayload. Encoders
// append to a caller's buffer; decoders read from an io.Reader, so
// production, tests and fuzzing share the code. Any bad frame (length,
// checksum or tag, type, flags, compression) ends the session as a
// protocol violation (its error wraps ErrProtocol as well as the frame's).
//
// Receiving: a session reads payloads of 1 KiB and up straight into
// pooled buffers (Session.Recycle hands them back); from 4 KiB (in fact
// from about 2.2 KiB), byte Config.AlignAt of the payload lies on a PageAlign boundary (sealed
// frames are opened in place; a decompressed payload is not aligned). On
// a plain TCP stream, while 64 KiB or more of a frame's body are still to
// come, the reader sets SO_RCVLOWAT to what remains of it (at most 4 MiB)
// before each read, and back to 1 after: one wake-up per frame instead of
// one per segment, and never a mark above what the peer is sending.
//
// # Versions
//
// Version 1 was the first. Version 2 checksums a session's plain frames
// with XXH3-64 seeded with the header instead of xxhash64 (five times
// faster on this project's machine: 50 GB/s against 10 for 1 MiB); the
// handshake's frames keep version 1's checksum, so a version-1 node reads
// a version-2 HELLO and the two refuse each other cleanly ("no common
// protocol version"). Version 3 checksums a session's plain frames in two
// parts, the first 64 bytes of the body and the rest: a frame the sender
// gathers from a message header and data elsewhere (a write's) is
// checksummed without copying the data through a streaming hash's buffer
// (measured: 14 µs per MiB against 35). Nothing else changed, and a node
// speaks both: two nodes agree on the newest version both speak, so
// either may be upgraded first. Version 4 frames as version 3 does; it
// says that the application accepts frame types added with it (the
// replicator's Sizes, type 32, for online resize), which a node sends
// only on a session of version 4 or newer. Version 5, likewise, adds the
// replicator's ReadRequest and ReadReply (types 33 and 34: reads through
// the peer for a Primary whose disk was detached). A later version must
// keep HELLO's first 16 bytes,
// the handshake frames' checksum and the REFUSE frame, so that two
// versions can agree or refuse cleanly.
package transport
