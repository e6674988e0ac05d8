package replicator

import (
	"encoding"
	"fmt"
)

// Role is a node's role for a resource (reference/drbd.md §3.2).
type Role uint8

// Roles, as DRBD names them.
const (
	RoleUnknown Role = iota // only ever the peer's, when not connected
	RolePrimary
	RoleSecondary
)

var roleNames = [...]string{"Unknown", "Primary", "Secondary"}

func (r Role) String() string { return name(roleNames[:], int(r), "Role") }

// Roles returns every role, in order.
func Roles() []Role { return all[Role](len(roleNames)) }

// DiskStates returns every disk state, in order.
func DiskStates() []DiskState { return all[DiskState](len(diskNames)) }

// ConnStates returns every connection state, in order.
func ConnStates() []ConnState { return all[ConnState](len(connNames)) }

func all[T ~uint8](n int) []T {
	v := make([]T, n)
	for i := range v {
		v[i] = T(i)
	}
	return v
}

// MarshalText writes the DRBD name.
func (r Role) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// DiskState is the state of a node's copy of the data, in DRBD 8.4's enum
// order (reference/drbd.md §3.3): states compare with < and >.
type DiskState uint8

// Disk states.
const (
	Diskless DiskState = iota
	Attaching
	Failed
	Negotiating
	Inconsistent
	Outdated
	DUnknown
	Consistent
	UpToDate
)

var diskNames = [...]string{"Diskless", "Attaching", "Failed", "Negotiating", "Inconsistent",
	"Outdated", "DUnknown", "Consistent", "UpToDate"}

func (d DiskState) String() string { return name(diskNames[:], int(d), "DiskState") }

// MarshalText writes the DRBD name.
func (d DiskState) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// ConnState is a resource's connection state, in DRBD 8.4's enum order
// (reference/drbd.md §3.1).
type ConnState uint8

// Connection states.
const (
	StandAlone ConnState = iota
	Disconnecting
	Unconnected
	Timeout
	BrokenPipe
	NetworkFailure
	ProtocolError
	TearDown
	WFConnection
	WFReportParams
	Connected
	StartingSyncS
	StartingSyncT
	WFBitMapS
	WFBitMapT
	WFSyncUUID
	SyncSource
	SyncTarget
	VerifyS
	VerifyT
	PausedSyncS
	PausedSyncT
	Ahead
	Behind
)

var connNames = [...]string{"StandAlone", "Disconnecting", "Unconnected", "Timeout", "BrokenPipe",
	"NetworkFailure", "ProtocolError", "TearDown", "WFConnection", "WFReportParams", "Connected",
	"StartingSyncS", "StartingSyncT", "WFBitMapS", "WFBitMapT", "WFSyncUUID", "SyncSource",
	"SyncTarget", "VerifyS", "VerifyT", "PausedSyncS", "PausedSyncT", "Ahead", "Behind"}

func (c ConnState) String() string { return name(connNames[:], int(c), "ConnState") }

// MarshalText writes the DRBD name.
func (c ConnState) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// Syncing reports whether a resync or verify is running (the states in
// which /proc/drbd prints progress lines).
func (c ConnState) Syncing() bool {
	return c == SyncSource || c == SyncTarget || c == VerifyS || c == VerifyT
}

// Replication is the DRBD 9 name of the replication state of a connected
// peer (reference/drbd.md §3.1): "Off" below Connected, "Established" for
// Connected, the 8.4 name otherwise.
func (c ConnState) Replication() string {
	switch {
	case c < Connected:
		return "Off"
	case c == Connected:
		return "Established"
	}
	return c.String()
}

// Connection is the DRBD 9 name of the connection state: "Connecting" for
// WFConnection and WFReportParams, "Connected" from Connected on.
func (c ConnState) Connection() string {
	switch {
	case c == WFConnection || c == WFReportParams:
		return "Connecting"
	case c >= Connected:
		return "Connected"
	}
	return c.String()
}

func name(names []string, i int, kind string) string {
	if i >= 0 && i < len(names) {
		return names[i]
	}
	return fmt.Sprintf("%s(%d)", kind, i)
}

var (
	_ encoding.TextMarshaler = Role(0)
	_ encoding.TextMarshaler = DiskState(0)
	_ encoding.TextMarshaler = ConnState(0)
)
