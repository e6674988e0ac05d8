package nbd

// Limits on what a client may make the server read or hold.
const (
	// maxStringLen bounds export names and other strings (doc/proto.md).
	maxStringLen = 4096
	// maxPayloadLimit bounds the advertised maximum payload.
	maxPayloadLimit = 64 << 20
	// maxDrain is the largest oversized WRITE payload the server reads and
	// drops to keep the connection in sync; a larger one is treated as an
	// attack and the connection is closed.
	maxDrain = 128 << 20
)

// verdict is what the request reader does with a request header.
type verdict struct {
	errno Errno // non-zero: reply with this error instead of executing
	// drop: the connection must be closed (no reply can keep it in sync).
	drop bool
}

// allowedFlags are the command flags accepted per command. FUA is accepted on
// every command because SEND_FUA is always advertised (doc/proto.md: "the
// server MUST accept it even where it means nothing").
func allowedFlags(cmd uint16) uint16 {
	switch cmd {
	case CmdWriteZeroes:
		return CmdFlagFUA | CmdFlagNoHole
	default:
		return CmdFlagFUA
	}
}

// validate judges a request header against the export, before any payload is
// read. size is the backend size at this instant. For a WRITE with a non-zero
// errno the caller still reads and drops the payload (unless drop is set).
func validate(r *Request, e *Export, size uint64) verdict {
	switch r.Type {
	case CmdRead, CmdWrite, CmdFlush, CmdTrim, CmdWriteZeroes:
	case CmdDisc:
		return verdict{}
	default:
		// Unknown or unadvertised (CACHE, BLOCK_STATUS, RESIZE): EINVAL,
		// and no payload is consumed.
		return verdict{errno: EINVAL}
	}
	if r.Type == CmdWrite && uint64(r.Length) > maxDrain {
		return verdict{errno: EINVAL, drop: true}
	}
	if r.Flags&^allowedFlags(r.Type) != 0 {
		return verdict{errno: EINVAL}
	}
	if r.Type == CmdFlush {
		if r.Offset != 0 || r.Length != 0 {
			return verdict{errno: EINVAL}
		}
		return verdict{}
	}
	if e.ReadOnly && r.Type != CmdRead {
		return verdict{errno: EPERM}
	}
	if (r.Type == CmdRead || r.Type == CmdWrite) && r.Length > e.maxPayload() {
		return verdict{errno: EINVAL}
	}
	if mb := uint64(e.minBlock()); mb > 1 && (r.Offset%mb != 0 || uint64(r.Length)%mb != 0) {
		return verdict{errno: EINVAL}
	}
	// Overflow-safe bounds check: off+len must not pass size.
	if r.Offset > size || uint64(r.Length) > size-r.Offset {
		if r.Type == CmdWrite || r.Type == CmdWriteZeroes {
			return verdict{errno: ENOSPC}
		}
		return verdict{errno: EINVAL}
	}
	return verdict{}
}
