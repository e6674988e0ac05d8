// Package nbd is an NBD server: the fixed-newstyle handshake and a
// concurrent transmission phase in front of a Backend, plus Attach, which
// serves a Linux kernel /dev/nbdN device over a socketpair.
//
// # Usage
//
//	var cat nbd.Exports
//	cat.Add(&nbd.Export{Name: "r0", Backend: disk, MultiConn: true})
//	srv := &nbd.Server{Catalog: &cat, Logger: log}
//	go srv.Serve(listener)          // TCP or Unix
//	...
//	srv.Shutdown(ctx)               // graceful; srv.Close() is immediate
//
// # Protocol subset
//
// Handshake: fixed newstyle with NBD_FLAG_NO_ZEROES. Options answered:
// NBD_OPT_EXPORT_NAME (1), ABORT (2), LIST (3; one NBD_REP_SERVER per
// export), INFO (6) and GO (7) with NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE
// (always) and NAME/DESCRIPTION (on request). STARTTLS, STRUCTURED_REPLY,
// the META_CONTEXT pair, EXTENDED_HEADERS and unknown options get
// NBD_REP_ERR_UNSUP after their payload is skipped by its length, so the
// client stays in sync. Clients without NBD_FLAG_C_FIXED_NEWSTYLE may only
// use EXPORT_NAME.
//
// Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
// SEND_WRITE_ZEROES always; READ_ONLY and CAN_MULTI_CONN per export.
// Commands: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE);
// FUA is accepted on every command. Replies are simple replies.
//
// # Wire layout (all integers big-endian)
//
// Server greeting, 18 bytes:
//
//	offset size field
//	0      8    "NBDMAGIC"  0x4e42444d41474943
//	8      8    "IHAVEOPT"  0x49484156454f5054
//	16     2    handshake flags: bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES
//
// Client flags, 4 bytes: bit 0 C_FIXED_NEWSTYLE, bit 1 C_NO_ZEROES; any
// other bit ends the connection.
//
// Option request, 16 bytes + data:
//
//	0      8    "IHAVEOPT"
//	8      4    option
//	12     4    data length (more than 32 MiB ends the connection unread)
//	16     n    data
//
// Option reply, 20 bytes + data:
//
//	0      8    0x0003e889045565a9
//	8      4    option (echoed)
//	12     4    reply type (ACK 1, SERVER 2, INFO 3; errors have bit 31 set)
//	16     4    data length
//	20     n    data
//
// INFO/GO request data: name length (4), name (≤ 4096 bytes), count of
// information requests (2), that many 16-bit NBD_INFO types. The lengths
// must agree exactly with the option length; if they do not, or the name
// is longer than 4096 bytes, the client gets NBD_REP_ERR_INVALID (or
// ERR_TOO_BIG) with a message and the connection ends.
//
// NBD_INFO_EXPORT: type 0 (2), size (8), transmission flags (2).
// NBD_INFO_BLOCK_SIZE: type 3 (2), minimum (4), preferred (4), maximum
// payload (4); by default 1, 4096 and 32 MiB.
//
// Request, 28 bytes (+ data for WRITE only):
//
//	0      4    0x25609513
//	4      2    command flags: FUA 1, NO_HOLE 2 (others are refused)
//	6      2    command: READ 0, WRITE 1, DISC 2, FLUSH 3, TRIM 4, WRITE_ZEROES 6
//	8      8    cookie (echoed)
//	16     8    offset
//	24     4    length
//
// Simple reply, 16 bytes (+ data for a successful READ):
//
//	0      4    0x67446698
//	4      4    error: 0, EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28
//	8      8    cookie
//
// # Errors
//
// EINVAL for reads and trims past the end, unknown or unadvertised commands
// and flags, FLUSH with an offset or length, requests over the maximum
// payload, and requests misaligned to a minimum block size above 1. ENOSPC
// for writes and write-zeroes past the end. EPERM for writes, trims and
// write-zeroes on a read-only export. Backend errors are mapped by errno
// (see Backend); anything unknown is EIO. The payload of a refused WRITE is
// read and dropped, so the connection stays usable, up to 128 MiB; a larger
// one ends the connection. A request with a bad magic ends the connection.
// A READ reply's header is sent only after its data has been read, so a
// failed read is an EIO reply with no data, never a broken stream.
//
// # Concurrency and limits
//
// Each connection has one goroutine reading requests; it reads a WRITE's
// payload into a pooled buffer and hands the request to a pool of worker
// goroutines that call the Backend concurrently, so replies may go out of
// order. At most MaxInFlight requests and MaxInFlightBytes payload bytes
// are in flight per connection, and MaxTotalInFlightBytes over the server
// beyond the first 256 KiB of each connection (its own share, so clients
// that hold the server's budget whole by reading no reply cannot stop the
// others); at the limit the server stops reading (backpressure). A request
// waiting for the server's budget takes its connection's share instead as
// soon as the connection's own requests give it back. A client that takes
// no reply for ReplyTimeout (its socket stays full) is disconnected, which
// frees what it held: the budget is held by no client for ever. Memory for
// payloads is bounded by MaxTotalInFlightBytes + MaxConns × 256 KiB (plus,
// per connection, a 64 KiB read buffer and its workers' stacks). Replies
// are written whole by one goroutine at a time and batched into one writev
// under pipelined load and when handlers finish together (see
// replyWriter). Negotiation must finish within
// HandshakeTimeout, and at most MaxConns connections are open. At that
// limit a new connection replaces the oldest one that has been negotiating
// for a quarter of HandshakeTimeout or more (a client stalling in
// negotiation cannot lock others out, CVE-2024-7409); without one it is
// closed at once. Connections in transmission are never evicted.
//
// FLUSH calls Backend.Flush, which covers writes completed on every
// connection; that is what CAN_MULTI_CONN promises. DISC finishes the
// requests in flight, then flushes. Shutdown finishes what each connection
// has read, flushes and closes; Close drops everything at once.
package nbd
