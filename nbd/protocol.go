package nbd

import (
	"encoding/binary"
	"errors"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Wire constants. They are part of the NBD protocol (doc/proto.md) and must
// never be renumbered. Where github.com/pojntfx/go-nbd defines a constant it is
// used; the rest are defined here.
const (
	magicNBD       = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	magicIHaveOpt  = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	magicOptReply  = protocol.NEGOTIATION_MAGIC_REPLY
	magicRequest   = protocol.TRANSMISSION_MAGIC_REQUEST
	magicReply     = protocol.TRANSMISSION_MAGIC_REPLY
	requestSize    = 28
	replySize      = 16
	optHeaderSize  = 16
	greetingSize   = 18
	exportNameZero = 124 // zero padding after the NBD_OPT_EXPORT_NAME reply
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)

	clientFlagFixedNewstyle = uint32(1 << 0)
	clientFlagNoZeroes      = uint32(1 << 1)
	clientFlagsKnown        = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// Options.
const (
	optExportName      = uint32(1)
	optAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	optList            = protocol.NEGOTIATION_ID_OPTION_LIST
	optPeekExport      = uint32(4)
	optStartTLS        = uint32(5)
	optInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	optGo              = protocol.NEGOTIATION_ID_OPTION_GO
	optStructuredReply = uint32(8)
	optListMetaContext = uint32(9)
	optSetMetaContext  = uint32(10)
	optExtendedHeaders = uint32(11)
)

// Option reply types.
const (
	repAck           = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repServer        = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo          = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repErrUnsup      = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrPolicy     = uint32(2 | 1<<31)
	repErrInvalid    = uint32(3 | 1<<31)
	repErrPlatform   = uint32(4 | 1<<31)
	repErrTLSReqd    = uint32(5 | 1<<31)
	repErrUnknown    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrShutdown   = uint32(7 | 1<<31)
	repErrBlockReqd  = uint32(8 | 1<<31)
	repErrTooBig     = uint32(9 | 1<<31)
	repErrExtHdrReqd = uint32(10 | 1<<31)
)

// NBD_INFO types.
const (
	infoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags, sent in NBD_INFO_EXPORT and the EXPORT_NAME reply, and
// given to the kernel with NBD_SET_FLAGS.
const (
	FlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	FlagReadOnly        = uint16(1 << 1)
	FlagSendFlush       = uint16(1 << 2)
	FlagSendFUA         = uint16(1 << 3)
	FlagRotational      = uint16(1 << 4)
	FlagSendTrim        = uint16(1 << 5)
	FlagSendWriteZeroes = uint16(1 << 6)
	FlagSendDF          = uint16(1 << 7)
	FlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	FlagSendResize      = uint16(1 << 9)
	FlagSendCache       = uint16(1 << 10)
	FlagSendFastZero    = uint16(1 << 11)
)

// Commands.
const (
	CmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	CmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	CmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdCache       = uint16(5)
	CmdWriteZeroes = uint16(6)
	CmdBlockStatus = uint16(7)
	CmdResize      = uint16(8)
)

// Command flags.
const (
	CmdFlagFUA      = uint16(1 << 0)
	CmdFlagNoHole   = uint16(1 << 1)
	CmdFlagDF       = uint16(1 << 2)
	CmdFlagReqOne   = uint16(1 << 3)
	CmdFlagFastZero = uint16(1 << 4)
)

// Errno is an error value carried in an NBD simple reply. Only the values the
// protocol defines are ever sent; see errnoOf for the mapping from Go errors.
type Errno uint32

// Error values of the protocol (doc/proto.md, "Error values").
const (
	EPERM     = Errno(protocol.TRANSMISSION_ERROR_EPERM)
	EIO       = Errno(5)
	ENOMEM    = Errno(12)
	EINVAL    = Errno(protocol.TRANSMISSION_ERROR_EINVAL)
	ENOSPC    = Errno(28)
	EOVERFLOW = Errno(75)
	ENOTSUP   = Errno(95)
	ESHUTDOWN = Errno(108)
)

func (e Errno) Error() string {
	switch e {
	case 0:
		return "nbd: success"
	case EPERM:
		return "nbd: operation not permitted (EPERM)"
	case EIO:
		return "nbd: input/output error (EIO)"
	case ENOMEM:
		return "nbd: out of memory (ENOMEM)"
	case EINVAL:
		return "nbd: invalid argument (EINVAL)"
	case ENOSPC:
		return "nbd: no space left on device (ENOSPC)"
	case EOVERFLOW:
		return "nbd: value too large (EOVERFLOW)"
	case ENOTSUP:
		return "nbd: operation not supported (ENOTSUP)"
	case ESHUTDOWN:
		return "nbd: server shutting down (ESHUTDOWN)"
	}
	return "nbd: unknown error"
}

// ErrBadMagic is returned when a request or option does not start with the
// magic the protocol requires; the connection cannot be resynchronised.
var ErrBadMagic = errors.New("nbd: bad magic")

// Request is a decoded transmission-phase request header. WRITE requests are
// followed on the wire by Length bytes of payload; no other command is.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// decodeRequest decodes a 28-byte request header. It checks only the magic;
// validate judges the fields.
func decodeRequest(b *[requestSize]byte) (Request, error) {
	if binary.BigEndian.Uint32(b[0:4]) != magicRequest {
		return Request{}, ErrBadMagic
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Cookie: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// AppendBinary appends the 28-byte wire form of the request header to b.
func (r Request) AppendBinary(b []byte) ([]byte, error) {
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Cookie)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	b = binary.BigEndian.AppendUint32(b, r.Length)
	return b, nil
}

// putReply writes a 16-byte simple reply header into b.
func putReply(b *[replySize]byte, errno Errno, cookie uint64) {
	binary.BigEndian.PutUint32(b[0:4], magicReply)
	binary.BigEndian.PutUint32(b[4:8], uint32(errno))
	binary.BigEndian.PutUint64(b[8:16], cookie)
}

// cmdName names a command for logs.
func cmdName(t uint16) string {
	switch t {
	case CmdRead:
		return "read"
	case CmdWrite:
		return "write"
	case CmdDisc:
		return "disc"
	case CmdFlush:
		return "flush"
	case CmdTrim:
		return "trim"
	case CmdCache:
		return "cache"
	case CmdWriteZeroes:
		return "write_zeroes"
	case CmdBlockStatus:
		return "block_status"
	case CmdResize:
		return "resize"
	}
	return "unknown"
}
