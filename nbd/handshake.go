package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// maxOptionLen bounds an option's payload: a longer one is treated as an
// attack and ends the connection without reading it (CVE-2017-15119).
const maxOptionLen = 32 << 20

// maxInfoLen is the longest well-formed NBD_OPT_INFO/GO payload: name length,
// a name of up to 4096 bytes, an information-request count and 65535 requests.
const maxInfoLen = 4 + maxStringLen + 2 + 2*0xffff

// Negotiation errors. Each ends the connection; errAborted is the client's
// own clean ending.
var (
	errAborted         = errors.New("nbd: client aborted negotiation")
	errClientFlags     = errors.New("nbd: unknown client flags")
	errOptionTooLong   = errors.New("nbd: option longer than 32 MiB")
	errNotFixed        = errors.New("nbd: option other than EXPORT_NAME from a client without fixed newstyle")
	errBadOption       = errors.New("nbd: malformed option")
	errExportNameLimit = errors.New("nbd: export name longer than 4096 bytes")
)

// negotiation is the option-haggling phase of one connection. It reads
// straight from the connection (no read-ahead), so no byte of the
// transmission phase is consumed by it.
type negotiation struct {
	rw       io.ReadWriter
	catalog  Catalog
	log      *slog.Logger
	fixed    bool
	noZeroes bool
	hdr      [optHeaderSize]byte
	payload  []byte // reused; never longer than maxInfoLen
	out      []byte // reused reply buffer
	chosen   func(*Export)
}

// choose reports the export the client is about to use.
func (n *negotiation) choose(exp *Export) {
	if n.chosen != nil {
		n.chosen(exp)
	}
}

// negotiate runs the fixed-newstyle handshake and returns the export chosen
// by NBD_OPT_GO or NBD_OPT_EXPORT_NAME. chosen, if not nil, is called with
// that export before the client is told it may start (so the export counts
// it as a client from then on).
func negotiate(rw io.ReadWriter, catalog Catalog, log *slog.Logger, chosen func(*Export)) (*Export, error) {
	n := &negotiation{rw: rw, catalog: catalog, log: log, chosen: chosen}
	return n.run()
}

func (n *negotiation) run() (*Export, error) {
	var g [greetingSize]byte
	binary.BigEndian.PutUint64(g[0:8], magicNBD)
	binary.BigEndian.PutUint64(g[8:16], magicIHaveOpt)
	binary.BigEndian.PutUint16(g[16:18], flagFixedNewstyle|flagNoZeroes)
	if _, err := n.rw.Write(g[:]); err != nil {
		return nil, fmt.Errorf("send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.rw, cf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^clientFlagsKnown != 0 {
		return nil, fmt.Errorf("%w: %#x", errClientFlags, flags)
	}
	n.fixed = flags&clientFlagFixedNewstyle != 0
	n.noZeroes = flags&clientFlagNoZeroes != 0
	for {
		exp, err := n.option()
		if err != nil || exp != nil {
			return exp, err
		}
	}
}

// option reads and answers one option. It returns an export when the
// transmission phase starts.
func (n *negotiation) option() (*Export, error) {
	if _, err := io.ReadFull(n.rw, n.hdr[:]); err != nil {
		return nil, fmt.Errorf("read option header: %w", err)
	}
	if binary.BigEndian.Uint64(n.hdr[0:8]) != magicIHaveOpt {
		return nil, fmt.Errorf("option: %w", ErrBadMagic)
	}
	opt := binary.BigEndian.Uint32(n.hdr[8:12])
	length := binary.BigEndian.Uint32(n.hdr[12:16])
	if length > maxOptionLen {
		return nil, fmt.Errorf("%w: option %d, %d bytes", errOptionTooLong, opt, length)
	}
	if !n.fixed && opt != optExportName {
		return nil, fmt.Errorf("%w: option %d", errNotFixed, opt)
	}
	switch opt {
	case optExportName:
		return n.exportName(length)
	case optAbort:
		if err := n.discard(length); err != nil {
			return nil, err
		}
		_ = n.reply(opt, repAck, nil) // the client may close without reading it
		return nil, errAborted
	case optList:
		return nil, n.list(length)
	case optInfo, optGo:
		return n.infoGo(opt, length)
	default:
		// STARTTLS, STRUCTURED_REPLY, the META_CONTEXT pair,
		// EXTENDED_HEADERS, PEEK_EXPORT and anything unknown.
		if err := n.discard(length); err != nil {
			return nil, err
		}
		return nil, n.replyError(opt, repErrUnsup, "option not supported")
	}
}

// discard skips an option payload without holding it in memory.
func (n *negotiation) discard(length uint32) error {
	if _, err := io.CopyN(io.Discard, n.rw, int64(length)); err != nil {
		return fmt.Errorf("skip option payload: %w", err)
	}
	return nil
}

// read reads an option payload of at most maxInfoLen bytes.
func (n *negotiation) read(length uint32) ([]byte, error) {
	if cap(n.payload) < int(length) {
		n.payload = make([]byte, length)
	}
	p := n.payload[:length]
	if _, err := io.ReadFull(n.rw, p); err != nil {
		return nil, fmt.Errorf("read option payload: %w", err)
	}
	return p, nil
}

func (n *negotiation) exportName(length uint32) (*Export, error) {
	if length > maxStringLen {
		return nil, errExportNameLimit // the legacy option has no error reply
	}
	name, err := n.read(length)
	if err != nil {
		return nil, err
	}
	exp, err := n.catalog.Lookup(string(name))
	if err != nil {
		return nil, fmt.Errorf("export %q: %w", name, err)
	}
	n.choose(exp)
	out := binary.BigEndian.AppendUint64(n.out[:0], uint64(exp.Backend.Size()))
	out = binary.BigEndian.AppendUint16(out, exp.Flags())
	if !n.noZeroes {
		out = append(out, make([]byte, exportNameZero)...)
	}
	n.out = out
	if _, err := n.rw.Write(out); err != nil {
		return nil, fmt.Errorf("send export info: %w", err)
	}
	return exp, nil
}

func (n *negotiation) list(length uint32) error {
	if length != 0 {
		if err := n.discard(length); err != nil {
			return err
		}
		return n.replyError(optList, repErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, e := range n.catalog.List() {
		p := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
		p = append(p, e.Name...)
		p = append(p, e.Description...)
		if err := n.reply(optList, repServer, p); err != nil {
			return err
		}
	}
	return n.reply(optList, repAck, nil)
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO. A malformed request is a
// protocol violation: the client is told why, then the connection ends.
func (n *negotiation) infoGo(opt, length uint32) (*Export, error) {
	if length > maxInfoLen {
		_ = n.replyError(opt, repErrInvalid, "option length disagrees with its contents")
		return nil, fmt.Errorf("%w: %d-byte info request", errBadOption, length)
	}
	p, err := n.read(length)
	if err != nil {
		return nil, err
	}
	name, reqs, err := parseInfoRequest(p)
	if err != nil {
		kind := repErrInvalid
		if errors.Is(err, errExportNameLimit) {
			kind = repErrTooBig
		}
		_ = n.replyError(opt, kind, err.Error())
		return nil, err
	}
	exp, err := n.catalog.Lookup(name)
	if err != nil {
		n.log.Info("nbd export refused", "export", name, "reason", err)
		return nil, n.replyError(opt, repErrUnknown, err.Error())
	}
	if err := n.sendInfo(opt, exp, reqs); err != nil {
		return nil, err
	}
	if opt == optGo {
		n.choose(exp)
	}
	if err := n.reply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return exp, nil
	}
	return nil, nil
}

// parseInfoRequest splits an INFO/GO payload: a 32-bit name length, the
// name, a 16-bit count and that many 16-bit information types. Every length
// must agree exactly with the payload.
func parseInfoRequest(p []byte) (name string, reqs []byte, err error) {
	if len(p) < 6 {
		return "", nil, fmt.Errorf("%w: info request of %d bytes", errBadOption, len(p))
	}
	nameLen := binary.BigEndian.Uint32(p[0:4])
	if nameLen > maxStringLen {
		return "", nil, errExportNameLimit
	}
	if uint64(nameLen)+6 > uint64(len(p)) {
		return "", nil, fmt.Errorf("%w: name length %d exceeds the option", errBadOption, nameLen)
	}
	rest := p[4+nameLen:]
	count := binary.BigEndian.Uint16(rest[0:2])
	if int(count)*2 != len(rest)-2 {
		return "", nil, fmt.Errorf("%w: %d information requests in %d bytes", errBadOption, count, len(rest)-2)
	}
	return string(p[4 : 4+nameLen]), rest[2:], nil
}

// sendInfo sends NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, and NAME and
// DESCRIPTION when asked for. Unknown request types are ignored.
func (n *negotiation) sendInfo(opt uint32, exp *Export, reqs []byte) error {
	var p [18]byte
	binary.BigEndian.PutUint16(p[0:2], infoExport)
	binary.BigEndian.PutUint64(p[2:10], uint64(exp.Backend.Size()))
	binary.BigEndian.PutUint16(p[10:12], exp.Flags())
	if err := n.reply(opt, repInfo, p[:12]); err != nil {
		return err
	}
	binary.BigEndian.PutUint16(p[0:2], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:6], exp.minBlock())
	binary.BigEndian.PutUint32(p[6:10], exp.preferredBlock())
	binary.BigEndian.PutUint32(p[10:14], exp.maxPayload())
	if err := n.reply(opt, repInfo, p[:14]); err != nil {
		return err
	}
	var sentName, sentDesc bool
	for i := 0; i+1 < len(reqs); i += 2 {
		var text string
		typ := binary.BigEndian.Uint16(reqs[i : i+2])
		switch {
		case typ == infoName && !sentName:
			text, sentName = exp.Name, true
		case typ == infoDescription && !sentDesc && exp.Description != "":
			text, sentDesc = exp.Description, true
		default:
			continue
		}
		b := binary.BigEndian.AppendUint16(nil, typ)
		if err := n.reply(opt, repInfo, append(b, text...)); err != nil {
			return err
		}
	}
	return nil
}

// reply sends one option reply.
func (n *negotiation) reply(opt, typ uint32, payload []byte) error {
	out := binary.BigEndian.AppendUint64(n.out[:0], magicOptReply)
	out = binary.BigEndian.AppendUint32(out, opt)
	out = binary.BigEndian.AppendUint32(out, typ)
	out = binary.BigEndian.AppendUint32(out, uint32(len(payload)))
	out = append(out, payload...)
	n.out = out
	if _, err := n.rw.Write(out); err != nil {
		return fmt.Errorf("send option reply: %w", err)
	}
	return nil
}

// replyError sends an error reply whose payload is a human-readable message.
func (n *negotiation) replyError(opt, typ uint32, msg string) error {
	if len(msg) > maxStringLen {
		msg = msg[:maxStringLen]
	}
	return n.reply(opt, typ, []byte(msg))
}
