package replicator

import (
	"time"

	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// Snapshot is the state of one resource at one instant: what the status
// file, `status`, `status --json` and `events` print.
type Snapshot struct {
	Name  string
	Minor int    // the resource's position in the configuration, from 0
	Peer  string // the peer's node name ("" if none is configured)

	Role, PeerRole Role
	Conn           ConnState
	Disk, PeerDisk DiskState
	// Protocol is the replication protocol; 0 when the resource has no
	// network configuration (StandAlone), printed as a space.
	Protocol config.Protocol

	// I/O state flags of /proc/drbd (reference/drbd.md §1.2).
	Suspended   bool // application I/O suspended (by fencing: the only cause)
	AfterISP    bool // resync paused by a resync-after dependency
	PeerISP     bool // resync paused by the peer
	UserISP     bool // resync paused by pause-sync here
	Congestion  byte // '-', 'd', 'c', 'b', 'n' or 'a'; 0 prints '-'
	ALSuspended bool // activity-log updates suspended

	Counters Counters
	// The byte counts behind Counters' KiB: sent to and received from the
	// peer (messages, before transport framing), written to and read from
	// the disk for the application and the peer.
	SentBytes, ReceivedBytes, WrittenBytes, ReadBytes uint64
	// ResyncBytes is the resync data this node wrote as SyncTarget or
	// sent as SyncSource, since the daemon started.
	ResyncBytes uint64
	// PendingBytes are the replicated writes sent to the peer and not yet
	// on its stable storage (barrier-acked); Lag is how long the oldest of
	// them has waited (0 when there is none): what a failover now would
	// lose under protocol A.
	PendingBytes int64
	Lag          time.Duration
	// AuthFailures counts the peer's connections refused for failed
	// authentication (a proof, a certificate, a node name), since the
	// daemon started.
	AuthFailures uint64
	// HandlerRuns counts the handlers run since the daemon started, by
	// handler name and exit code (those that occurred, sorted).
	HandlerRuns []HandlerRuns
	// OutOfSyncBytes is what the bitmap marks: set bits × 4 KiB.
	OutOfSyncBytes uint64
	UUIDs          UUIDs
	SizeBytes      int64
	// Resync is the progress of a resync or verify, nil when none runs.
	Resync *Resync
	// Clients are the NBD clients of the export (their addresses).
	Clients []string
}

// Counters are /proc/drbd's counters line (reference/drbd.md §1.3), each
// in its unit there.
type Counters struct {
	NS, NR, DW, DR uint64 // KiB sent to / received from the peer, written to / read from the disk
	AL, BM         uint64 // activity-log transactions and bitmap page writes
	LO             int64  // requests in flight on the local disk
	PE             int64  // requests sent to the peer awaiting an answer
	UA             int64  // requests from the peer not yet answered
	AP             int64  // application requests in flight
	EP             int64  // epochs awaiting a barrier ack on the receiving side
	// WO is the write-ordering method: 'f' flush, 'd' drain, 'n' none.
	WO byte
}

// UUIDs are the generation identifiers (reference/drbd.md §4.1).
type UUIDs struct {
	Current, Bitmap uint64
	History         [2]uint64
}

// Resync is the progress of a running resync or online verify.
type Resync struct {
	Verify     bool   // online verify rather than resync
	TotalBytes uint64 // to do when it began
	LeftBytes  uint64 // still to do
	// SpeedRecent is over the last ~18 s, SpeedAverage since the start
	// (pauses excluded), Want the controller's target (0: not this node's
	// to show), all in bytes per second.
	SpeedRecent, SpeedAverage, Want int64
	// ETA is the time left at the recent speed; negative when the resync
	// is not progressing (shown as ∞).
	ETA     time.Duration
	Stalled bool // no progress for 3 minutes
}

// Percent returns how much is done, from 0 to 100.
func (r *Resync) Percent() float64 {
	if r.TotalBytes == 0 {
		return 100
	}
	return 100 * float64(r.TotalBytes-min(r.LeftBytes, r.TotalBytes)) / float64(r.TotalBytes)
}
