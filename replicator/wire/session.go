package wire

import (
	"encoding/binary"
	"slices"

	"github.com/nbdmirror/nbdmirror/transport"
)

// Params.Flags bits. Part of the wire format.
const (
	// ParamDiscardMyData: this node was told to throw its data away in a
	// split brain (--discard-my-data).
	ParamDiscardMyData = 1 << 0
	// ParamCsums: this node resyncs by checksum (CsumsAlg).
	ParamCsums = 1 << 1

	paramFlags = ParamDiscardMyData | ParamCsums
)

// State.Role values. Part of the wire format.
const (
	RoleUnknown   = 0
	RolePrimary   = 1
	RoleSecondary = 2
)

// State.Flags bits. Part of the wire format.
const (
	// StateUserPause: the sync is paused by the user (pause-sync).
	StateUserPause = 1 << 0

	stateFlags = StateUserPause
	maxDisk    = 8 // State.Disk is DRBD's disk-state enum, 0 (Diskless) to 8 (UpToDate)
)

// UUIDs.Flags bits. Part of the wire format.
const (
	UUIDDiscardMyData   = 1 << 0
	UUIDCrashedPrimary  = 1 << 1
	UUIDInconsistent    = 1 << 2
	UUIDSkipInitialSync = 1 << 3

	uuidFlags = UUIDDiscardMyData | UUIDCrashedPrimary | UUIDInconsistent | UUIDSkipInitialSync
)

// Params is the first message both sides send on a new session (Data
// stream): the disk and the settings the two must agree on.
type Params struct {
	DiskSize  uint64 // usable bytes of this node's backing disk (0 = diskless)
	Size      uint64 // the size this node exports or last agreed (0 = none)
	Protocol  byte   // 'A', 'B' or 'C'
	AfterSB0  uint8  // after-sb-0pri policy, an opaque code 0..7
	AfterSB1  uint8  // after-sb-1pri policy, an opaque code 0..7
	AfterSB2  uint8  // after-sb-2pri policy, an opaque code 0..7
	Flags     uint32 // ParamDiscardMyData, ParamCsums; other bits zero
	CsumsAlg  string // ≤ MaxName bytes of printable ASCII, may be ""
	VerifyAlg string // ≤ MaxName bytes of printable ASCII, may be ""
	MaxEpoch  uint32 // max-epoch-size, 1..20000
}

// Type returns TypeParams.
func (Params) Type() transport.Type { return TypeParams }

// Append appends m's payload to dst.
func (m Params) Append(dst []byte) []byte {
	dst = slices.Grow(dst, 31+len(m.CsumsAlg)+len(m.VerifyAlg))
	dst = append(dst, version)
	dst = binary.BigEndian.AppendUint64(dst, m.DiskSize)
	dst = binary.BigEndian.AppendUint64(dst, m.Size)
	dst = append(dst, m.Protocol, m.AfterSB0, m.AfterSB1, m.AfterSB2)
	dst = binary.BigEndian.AppendUint32(dst, m.Flags)
	dst = binary.BigEndian.AppendUint32(dst, m.MaxEpoch)
	dst = append(append(dst, byte(len(m.CsumsAlg))), m.CsumsAlg...)
	return append(append(dst, byte(len(m.VerifyAlg))), m.VerifyAlg...)
}

// Validate reports the first field that Decode would reject.
func (m Params) Validate() error {
	const msg = "Params"
	switch {
	case m.Protocol != 'A' && m.Protocol != 'B' && m.Protocol != 'C':
		return malformed(msg, "protocol %q, want 'A', 'B' or 'C'", m.Protocol)
	case m.AfterSB0 > 7:
		return malformed(msg, "after-sb-0pri %d above 7", m.AfterSB0)
	case m.AfterSB1 > 7:
		return malformed(msg, "after-sb-1pri %d above 7", m.AfterSB1)
	case m.AfterSB2 > 7:
		return malformed(msg, "after-sb-2pri %d above 7", m.AfterSB2)
	case m.Flags&^paramFlags != 0:
		return malformed(msg, "reserved flags %#x set", m.Flags&^paramFlags)
	case m.MaxEpoch < 1 || m.MaxEpoch > maxEpoch:
		return malformed(msg, "max-epoch-size %d, want 1 to %d", m.MaxEpoch, maxEpoch)
	}
	if err := checkName(msg, "csums-alg", m.CsumsAlg); err != nil {
		return err
	}
	return checkName(msg, "verify-alg", m.VerifyAlg)
}

// checkName checks an algorithm name: at most MaxName bytes of printable
// ASCII.
func checkName(msg, field, s string) error {
	if len(s) > MaxName {
		return malformed(msg, "%s of %d bytes above the %d maximum", field, len(s), MaxName)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return malformed(msg, "%s has byte %#x at %d, not printable ASCII", field, s[i], i)
		}
	}
	return nil
}

func decodeParams(p []byte) (Message, error) {
	d := newDecoder("Params", p)
	m := Params{
		DiskSize: d.u64("disk size"),
		Size:     d.u64("size"),
		Protocol: d.u8("protocol"),
		AfterSB0: d.u8("after-sb-0pri"),
		AfterSB1: d.u8("after-sb-1pri"),
		AfterSB2: d.u8("after-sb-2pri"),
		Flags:    d.u32("flags"),
		MaxEpoch: d.u32("max-epoch-size"),
	}
	m.CsumsAlg = string(d.bytes8("csums-alg"))
	m.VerifyAlg = string(d.bytes8("verify-alg"))
	return finish(&d, m)
}

// State is this node's role and disk state, sent at session start and on
// every change (Data stream).
type State struct {
	Role  uint8 // RoleUnknown, RolePrimary or RoleSecondary
	Disk  uint8 // DRBD's disk-state enum, opaque here: 0..8
	Flags uint8 // StateUserPause; other bits zero
}

// Type returns TypeState.
func (State) Type() transport.Type { return TypeState }

// Append appends m's payload to dst.
func (m State) Append(dst []byte) []byte {
	return append(dst, version, m.Role, m.Disk, m.Flags)
}

// Validate reports the first field that Decode would reject.
func (m State) Validate() error {
	switch {
	case m.Role > RoleSecondary:
		return malformed("State", "role %d above %d", m.Role, RoleSecondary)
	case m.Disk > maxDisk:
		return malformed("State", "disk %d above %d", m.Disk, maxDisk)
	case m.Flags&^stateFlags != 0:
		return malformed("State", "reserved flags %#x set", m.Flags&^stateFlags)
	}
	return nil
}

func decodeState(p []byte) (Message, error) {
	d := newDecoder("State", p)
	m := State{Role: d.u8("role"), Disk: d.u8("disk"), Flags: d.u8("flags")}
	return finish(&d, m)
}

// UUIDs is this node's generation identifiers (Data stream).
type UUIDs struct {
	Current, Bitmap uint64
	History         [2]uint64
	BitsSet         uint64 // the number of set bits in the sender's bitmap
	Flags           uint64 // UUIDDiscardMyData, UUIDCrashedPrimary, UUIDInconsistent, UUIDSkipInitialSync; other bits zero
}

// Type returns TypeUUIDs.
func (UUIDs) Type() transport.Type { return TypeUUIDs }

// Append appends m's payload to dst.
func (m UUIDs) Append(dst []byte) []byte {
	dst = slices.Grow(dst, 49)
	dst = append(dst, version)
	for _, v := range [...]uint64{m.Current, m.Bitmap, m.History[0], m.History[1], m.BitsSet, m.Flags} {
		dst = binary.BigEndian.AppendUint64(dst, v)
	}
	return dst
}

// Validate reports the first field that Decode would reject.
func (m UUIDs) Validate() error {
	if m.Flags&^uuidFlags != 0 {
		return malformed("UUIDs", "reserved flags %#x set", m.Flags&^uuidFlags)
	}
	return nil
}

func decodeUUIDs(p []byte) (Message, error) {
	d := newDecoder("UUIDs", p)
	m := UUIDs{
		Current: d.u64("current"),
		Bitmap:  d.u64("bitmap"),
		History: [2]uint64{d.u64("history 0"), d.u64("history 1")},
		BitsSet: d.u64("bits set"),
		Flags:   d.u64("flags"),
	}
	return finish(&d, m)
}

// SyncUUID is the new bitmap UUID the SyncSource sets when a resync
// starts (Data stream).
type SyncUUID struct{ UUID uint64 }

// Type returns TypeSyncUUID.
func (SyncUUID) Type() transport.Type { return TypeSyncUUID }

// Append appends m's payload to dst.
func (m SyncUUID) Append(dst []byte) []byte {
	return binary.BigEndian.AppendUint64(append(dst, version), m.UUID)
}

// Validate reports the first field that Decode would reject: none.
func (m SyncUUID) Validate() error { return nil }

func decodeSyncUUID(p []byte) (Message, error) {
	d := newDecoder("SyncUUID", p)
	m := SyncUUID{UUID: d.u64("uuid")}
	return finish(&d, m)
}

// Command is an admin request or a resync control between the peers
// (Data stream).
type Command struct {
	Code uint8  // CmdInvalidate … CmdAhead
	Arg  uint64 // see the codes; zero for those without an argument
}

// Command codes. Part of the wire format: never renumber.
const (
	// CmdInvalidate: my data is to be discarded; become SyncSource toward
	// me, with a full sync.
	CmdInvalidate = 1
	// CmdInvalidateRemote: your data is to be discarded; become
	// SyncTarget, with a full sync.
	CmdInvalidateRemote = 2
	// CmdVerifyStart: an online verify starts; Arg is the first block.
	CmdVerifyStart = 3
	// CmdPauseSync: the resync is paused on the sender's side.
	CmdPauseSync = 4
	// CmdResumeSync: the resync is resumed on the sender's side.
	CmdResumeSync = 5
	// CmdResyncDone: the SyncTarget finished; Arg is the number of blocks
	// it could not sync.
	CmdResyncDone = 6
	// CmdVerifyDone: the verify finished; Arg is the number of differing
	// blocks found.
	CmdVerifyDone = 7
	// CmdAhead: the sender is Ahead (on-congestion pull-ahead): it no
	// longer replicates writes but sends OutOfSync for them; the receiver
	// is Behind, its disk Outdated, until a resync brings it up to date.
	CmdAhead = 8
)

// Type returns TypeCommand.
func (Command) Type() transport.Type { return TypeCommand }

// Append appends m's payload to dst.
func (m Command) Append(dst []byte) []byte {
	return binary.BigEndian.AppendUint64(append(dst, version, m.Code), m.Arg)
}

// Validate reports the first field that Decode would reject. Arg is not
// checked: the replicator gives it its meaning.
func (m Command) Validate() error {
	if m.Code < CmdInvalidate || m.Code > CmdAhead {
		return malformed("Command", "code %d unknown", m.Code)
	}
	return nil
}

func decodeCommand(p []byte) (Message, error) {
	d := newDecoder("Command", p)
	m := Command{Code: d.u8("code"), Arg: d.u64("arg")}
	return finish(&d, m)
}

// validator is a decoded message, checked by finish.
type validator interface {
	Message
	Validate() error
}

// finish checks that d read its whole payload and that m is valid,
// returning m or the first error.
func finish[M validator](d *decoder, m M) (Message, error) {
	if err := d.finish(); err != nil {
		return nil, err
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return m, nil
}
