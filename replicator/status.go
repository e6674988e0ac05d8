package replicator

// The status formats: the /proc/drbd file of DRBD 8.4 (WriteProc), the
// tree of `drbdadm status` of DRBD 9 (WriteStatus), and a JSON document
// (StatusJSON). Section numbers refer to reference/drbd.md; where the
// reference leaves a rule open, the choice is written next to the code that
// makes it.

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"strconv"
	"time"
)

// ProcInfo is what the first two lines of the status file say about the
// build (reference/drbd.md §1.1).
type ProcInfo struct {
	Version            string // release, printed as "nbdmirror <Version>"
	API                int    // version of the control API
	ProtoMin, ProtoMax int    // peer protocol versions this build speaks
	// Build is the second line, printed as given (DRBD prints
	// "GIT-hash: <hash> build by <who>, <date>" or "srcversion: <id>").
	Build string
}

// WriteProc writes snaps in the layout of DRBD 8.4's /proc/drbd
// (reference/drbd.md §1): the version and build lines, then one block per
// snapshot in the order given, numbered by Snapshot.Minor. As 8.4's
// drbd_seq_show does, a blank line comes before a block whose minor is not
// the previous block's plus one; the first block counts as following
// minor -1, so a blank line precedes it unless its minor is 0. A resource
// that is StandAlone, Diskless and Secondary prints only
// " N: cs:Unconfigured". Progress lines (§1.5, §1.6) follow the counters
// while the connection state is SyncSource, SyncTarget, VerifyS or VerifyT
// and Snapshot.Resync is set.
//
// The text is built in memory and written with one Write.
func WriteProc(w io.Writer, info ProcInfo, snaps []Snapshot) error {
	var b bytes.Buffer
	fmt.Fprintf(&b, "version: nbdmirror %s (api:%d/proto:%d-%d)\n%s\n",
		info.Version, info.API, info.ProtoMin, info.ProtoMax, info.Build)
	prev := -1
	for i := range snaps {
		s := &snaps[i]
		if s.Minor != prev+1 {
			b.WriteByte('\n')
		}
		prev = s.Minor
		writeProcBlock(&b, s)
	}
	_, err := w.Write(b.Bytes())
	return err
}

func writeProcBlock(b *bytes.Buffer, s *Snapshot) {
	if s.Conn == StandAlone && s.Disk == Diskless && s.Role == RoleSecondary {
		fmt.Fprintf(b, "%2d: cs:Unconfigured\n", s.Minor)
		return
	}
	proto := byte(s.Protocol)
	if proto == 0 {
		proto = ' ' // no network configuration (§1.2)
	}
	congestion := s.Congestion
	if congestion == 0 {
		congestion = '-'
	}
	fmt.Fprintf(b, "%2d: cs:%s ro:%s/%s ds:%s/%s %c %c%c%c%c%c%c\n",
		s.Minor, s.Conn, s.Role, s.PeerRole, s.Disk, s.PeerDisk, proto,
		procFlag(s.Suspended, 's', 'r'), procFlag(s.AfterISP, 'a', '-'),
		procFlag(s.PeerISP, 'p', '-'), procFlag(s.UserISP, 'u', '-'),
		congestion, procFlag(s.ALSuspended, 's', '-'))
	c := &s.Counters
	wo := c.WO
	if wo == 0 {
		wo = 'f'
	}
	fmt.Fprintf(b, "    ns:%d nr:%d dw:%d dr:%d al:%d bm:%d lo:%d pe:%d ua:%d ap:%d ep:%d wo:%c oos:%d\n",
		c.NS, c.NR, c.DW, c.DR, c.AL, c.BM, c.LO, c.PE, c.UA, c.AP, c.EP, wo, s.OutOfSyncBytes/1024)
	if s.Conn.Syncing() && s.Resync != nil {
		writeProcProgress(b, s.Conn, s.Resync)
	}
}

func procFlag(on bool, yes, no byte) byte {
	if on {
		return yes
	}
	return no
}

// procBits is a byte count in bitmap bits of 4 KiB, a partial block
// counting whole as it does in the bitmap.
func procBits(n uint64) uint64 { return n/4096 + min(n%4096, 1) }

// procPermille is how much of a resync is done, in tenths of a percent,
// computed as DRBD 8.4's drbd_get_syncer_progress does: both counts are
// shifted right by 10 bits (16 above 2^32 bits) and the total gets one
// added, so the result is truncated and coarse. The coarseness is visible
// in real output: §1.8's "sync'ed: 28.3% (7352/10236)M" comes out as 28.2
// from the exact bit counts and as 28.3 only this way. A consequence kept
// for fidelity: a resync of less than 4 MiB shows 100.0 from its start.
// More left than the total (a race DRBD tolerates) counts as nothing done.
func procPermille(left, total uint64) uint64 {
	if left > total {
		if total == 0 {
			return 1000
		}
		return 0
	}
	shift := 10
	if total > math.MaxUint32 {
		shift = 16
	}
	return 1000 - (left>>shift)*1000/(1+total>>shift)
}

// writeProcProgress writes the two progress lines of §1.5 and §1.6:
//
//	\t[<bar>] sync'ed:<pct> (<left>/<total>)<unit>
//	\tfinish: h:mm:ss speed: <recent> (<average>)[ want: <target>] K/sec[ (stalled)]
//
// The bar holds x-1 '=' then '>' then 20-x '.', x being the permille / 50,
// so it is 21 characters inside the brackets below 5 % and 20 from there
// on. Sizes are KiB, or MiB when the total is over 4 GiB (2^20 bits), each
// derived from whole bits as DRBD does (so MiB figures are multiples of 4).
// Speeds are KiB/s with thousands separators. "want:" appears when
// Resync.Want is set: DRBD shows it on the node running the resync
// controller (SyncTarget, VerifyS) and Snapshot leaves it 0 elsewhere.
func writeProcProgress(b *bytes.Buffer, conn ConnState, r *Resync) {
	left, total := procBits(r.LeftBytes), procBits(r.TotalBytes)
	pm := procPermille(left, total)
	left = min(left, total)
	x := int(pm / 50)
	b.WriteString("\t[")
	for i := 1; i < x; i++ {
		b.WriteByte('=')
	}
	b.WriteByte('>')
	for i := 0; i < 20-x; i++ {
		b.WriteByte('.')
	}
	b.WriteString("] ")
	if conn == VerifyS || conn == VerifyT {
		b.WriteString("verified:")
	} else {
		b.WriteString("sync'ed:")
	}
	fmt.Fprintf(b, "%3d.%d%% ", pm/10, pm%10)
	if total > 1<<20 {
		fmt.Fprintf(b, "(%d/%d)M", (left>>10)<<2, (total>>10)<<2)
	} else {
		fmt.Fprintf(b, "(%d/%d)K", left<<2, total<<2)
	}
	if r.ETA < 0 {
		b.WriteString("\n\tfinish: ∞ speed: ")
	} else {
		rt := int64(r.ETA / time.Second)
		fmt.Fprintf(b, "\n\tfinish: %d:%02d:%02d speed: ", rt/3600, rt%3600/60, rt%60)
	}
	procThousands(b, r.SpeedRecent/1024)
	b.WriteString(" (")
	procThousands(b, r.SpeedAverage/1024)
	b.WriteByte(')')
	if r.Want > 0 {
		b.WriteString(" want: ")
		procThousands(b, r.Want/1024)
	}
	b.WriteString(" K/sec")
	if r.Stalled {
		b.WriteString(" (stalled)")
	}
	b.WriteByte('\n')
}

// procThousands writes v with a comma before each group of three digits,
// as DRBD's seq_printf_with_thousands_grouping: 999, 1,000, 1,234,567.
// Like DRBD it groups at most the last six digits (1234,567,890); a
// negative value prints as 0.
func procThousands(b *bytes.Buffer, v int64) {
	v = max(v, 0)
	switch {
	case v >= 1000000:
		fmt.Fprintf(b, "%d,%03d,%03d", v/1000000, v%1000000/1000, v%1000)
	case v >= 1000:
		fmt.Fprintf(b, "%d,%03d", v/1000, v%1000)
	default:
		fmt.Fprintf(b, "%d", v)
	}
}

// statusColumns is the width WriteStatus wraps lines to: drbdsetup's
// wrap_printf wraps at the terminal width, 80 columns when its output is
// not a terminal (reference/drbd.md §2.2, the UG84 statistics example).
const statusColumns = 80

// statusLine builds WriteStatus output the way drbdsetup's wrap_printf
// does: a token at the start of a line loses its leading spaces and is
// indented by its indent instead; a token that does not fit starts a new
// line. wrap_printf counts a line's column from -1 after the indentation,
// so the text after the indentation may run to statusColumns+1 characters;
// this counts the same way, so lines break where drbdsetup's do.
// (wrap_printf also takes a line whose first token is one character long
// to be empty, and indents the next token again; that is not copied.)
type statusLine struct {
	b      bytes.Buffer
	inLine bool // the current line has a token
	text   int  // characters on the current line after the indentation
}

func (l *statusLine) add(indent int, tok string) {
	if l.inLine && l.text+len(tok) > statusColumns+1 {
		l.end()
	}
	if !l.inLine {
		for len(tok) > 0 && tok[0] == ' ' {
			tok = tok[1:]
		}
		for range indent {
			l.b.WriteByte(' ')
		}
		l.inLine, l.text = true, 0
	}
	l.b.WriteString(tok)
	l.text += len(tok)
}

func (l *statusLine) end() {
	l.b.WriteByte('\n')
	l.inLine, l.text = false, 0
}

// WriteStatus writes snaps in the layout of DRBD 9's `drbdadm status`
// (reference/drbd.md §2.1, §2.2; the rules follow resource_status,
// device_status, connection_status and peer_device_status of drbd-utils'
// drbdsetup.c):
//
//	<name> role:<Role>[ suspended:fencing|no]
//	  disk:<Disk>                          (verbose: volume:0 minor:<Minor> disk:… open:yes|no)
//	  <peer> connection:<state>            (not Connected; role:<PeerRole> instead when Connected)
//	    [replication:<state> ]peer-disk:<PeerDisk>[ done:NN.NN]
//
// with a blank line after every resource, as drbdsetup prints one after
// each (the last included). Resources come in the order given. A resource
// with no peer (Snapshot.Peer == "") has no connection lines. A resource
// that is down is shown with its states (StandAlone, Diskless) where DRBD 9
// would not list it at all, since every configured resource is listed
// here.
//
// Choices where the reference is open or Snapshot holds less than DRBD:
//   - open: is printed with verbose only. drbd-utils prints it whenever the
//     kernel reports it, but none of the §2.2 examples has it (their kernels
//     did not report it), and plain output matches them this way. With
//     verbose it is always printed, yes when the export has a client.
//   - suspended: says "fencing" when I/O is suspended: fencing is the only
//     reason nbdmirror suspends it (DRBD also has user, no-data, quorum).
//   - client:no (peer-client:no) follows a Diskless disk (peer disk), as
//     drbdsetup prints when its output is not a terminal; nbdmirror has no
//     intentionally diskless nodes.
//   - congested: (connection line, verbose or when congested) is yes when
//     the /proc congestion flag names the network ('n' or 'a').
//   - With verbose, role: of the peer is printed in every connection state,
//     as the code does (§2.1 reads as "only when Connected").
//   - done: is printed while a resync or verify runs or is paused (SyncSource
//     to PausedSyncT with Snapshot.Resync set): Resync.Percent, 2 decimals.
//   - Not printed, for want of data: node-id, backing_dev, quorum,
//     force-io-failures, tls, blocked, ap-in-flight, rs-in-flight and the
//     -vv resync details.
//
// Statistics add, each after a line break at a deeper indent: with verbose,
// the resource's write-ordering; the device's [size (verbose)] read and
// written in KiB, then with verbose al-writes, bm-writes, upper-pending
// (Counters.AP), lower-pending (Counters.LO) and al-suspended; the peer
// device's received and sent in KiB, out-of-sync in KiB (verbose or when
// non-zero), then with verbose pending, unacked and, during a resync, dbdt1
// (recent MiB/s) and eta (seconds).
//
// With no snapshots it writes one comment line, as drbdsetup does.
func WriteStatus(w io.Writer, snaps []Snapshot, verbose, statistics bool) error {
	var l statusLine
	if len(snaps) == 0 {
		l.b.WriteString("# No currently configured resources.\n")
	}
	for i := range snaps {
		s := &snaps[i]
		writeStatusResource(&l, s, verbose, statistics)
		writeStatusDevice(&l, s, verbose, statistics)
		if s.Peer != "" {
			writeStatusConnection(&l, s, verbose, statistics)
		}
		l.end()
	}
	_, err := w.Write(l.b.Bytes())
	return err
}

func writeStatusResource(l *statusLine, s *Snapshot, verbose, statistics bool) {
	l.add(0, s.Name)
	l.add(4, " role:"+s.Role.String())
	if verbose || s.Suspended {
		l.add(4, " suspended:"+statusWord(s.Suspended, "fencing", "no"))
	}
	if verbose && statistics {
		l.end()
		l.add(4, " write-ordering:"+statusWriteOrdering(s.Counters.WO))
	}
	l.end()
}

func writeStatusDevice(l *statusLine, s *Snapshot, verbose, statistics bool) {
	indent := 2
	if verbose {
		l.add(indent, "volume:0")
		indent = 6
		l.add(indent, " minor:"+strconv.Itoa(s.Minor))
	}
	l.add(indent, " disk:"+s.Disk.String())
	if s.Disk == Diskless {
		l.add(indent, " client:no")
	}
	if verbose {
		l.add(indent, " open:"+statusWord(len(s.Clients) > 0, "yes", "no"))
	}
	if statistics {
		const in = 6
		c := &s.Counters
		l.end()
		if verbose {
			l.add(in, " size:"+strconv.FormatInt(s.SizeBytes/1024, 10))
		}
		l.add(in, " read:"+strconv.FormatUint(c.DR, 10))
		l.add(in, " written:"+strconv.FormatUint(c.DW, 10))
		if verbose {
			l.add(in, " al-writes:"+strconv.FormatUint(c.AL, 10))
			l.add(in, " bm-writes:"+strconv.FormatUint(c.BM, 10))
			l.add(in, " upper-pending:"+strconv.FormatInt(c.AP, 10))
			l.add(in, " lower-pending:"+strconv.FormatInt(c.LO, 10))
			l.add(in, " al-suspended:"+statusWord(s.ALSuspended, "yes", "no"))
		}
	}
	l.end()
}

func writeStatusConnection(l *statusLine, s *Snapshot, verbose, statistics bool) {
	connected := s.Conn.Connection() == "Connected"
	l.add(2, s.Peer)
	if verbose || !connected {
		l.add(6, " connection:"+s.Conn.Connection())
	}
	if verbose || connected {
		l.add(6, " role:"+s.PeerRole.String())
	}
	congested := s.Congestion == 'n' || s.Congestion == 'a'
	if verbose || congested {
		l.add(6, " congested:"+statusWord(congested, "yes", "no"))
	}
	l.end()
	if verbose || statistics || connected {
		writeStatusPeerDevice(l, s, verbose, statistics)
	}
}

func writeStatusPeerDevice(l *statusLine, s *Snapshot, verbose, statistics bool) {
	indent := 4
	if verbose {
		l.add(indent, "volume:0")
		indent = 8
	}
	if verbose || s.Conn > Connected {
		l.add(indent, " replication:"+s.Conn.Replication())
		indent = 8
	}
	if verbose || statistics || s.Conn.Replication() != "Off" || s.PeerDisk != DUnknown {
		l.add(indent, " peer-disk:"+s.PeerDisk.String())
		if s.PeerDisk == Diskless {
			l.add(indent, " peer-client:no")
		}
		const in = 8
		r := s.Resync
		running := r != nil && s.Conn >= SyncSource && s.Conn <= PausedSyncT
		if running {
			l.add(in, fmt.Sprintf(" done:%.2f", r.Percent()))
		}
		if verbose || s.UserISP || s.PeerISP || s.AfterISP {
			l.add(in, " resync-suspended:"+statusResyncSuspended(s))
		}
		if statistics {
			l.end()
			l.add(in, " received:"+strconv.FormatUint(s.Counters.NR, 10))
			l.add(in, " sent:"+strconv.FormatUint(s.Counters.NS, 10))
			if verbose || s.OutOfSyncBytes != 0 {
				l.add(in, " out-of-sync:"+strconv.FormatUint(s.OutOfSyncBytes/1024, 10))
			}
			if verbose {
				l.add(in, " pending:"+strconv.FormatInt(s.Counters.PE, 10))
				l.add(in, " unacked:"+strconv.FormatInt(s.Counters.UA, 10))
				if running {
					l.add(in, fmt.Sprintf(" dbdt1:%.2f", float64(r.SpeedRecent)/(1<<20)))
					if r.ETA < 0 {
						l.add(in, " eta:∞")
					} else {
						l.add(in, fmt.Sprintf(" eta:%.0f", r.ETA.Seconds()))
					}
				}
			}
		}
	}
	l.end()
}

func statusWord(on bool, yes, no string) string {
	if on {
		return yes
	}
	return no
}

// statusResyncSuspended names why a resync is paused, in drbdsetup's order.
func statusResyncSuspended(s *Snapshot) string {
	var out string
	for _, r := range []struct {
		on   bool
		name string
	}{{s.UserISP, "user"}, {s.PeerISP, "peer"}, {s.AfterISP, "dependency"}} {
		if !r.on {
			continue
		}
		if out != "" {
			out += ","
		}
		out += r.name
	}
	if out == "" {
		return "no"
	}
	return out
}

// statusWriteOrdering names the write-ordering method as drbdsetup does;
// an unset Counters.WO is flush, as in WriteProc.
func statusWriteOrdering(wo byte) string {
	switch wo {
	case 'n':
		return "none"
	case 'd':
		return "drain"
	case 'b':
		return "barrier"
	}
	return "flush"
}

// StatusJSONVersion is the schema version StatusJSON carries. It changes
// only when a field changes meaning or goes away; added fields keep it.
const StatusJSONVersion = 1

// StatusJSON is the JSON form of a Snapshot, for `status --json` and the
// control API. Schema, version 1 (every key is always present):
//
//	version            int     StatusJSONVersion
//	name               string  resource name
//	minor              int     the resource's minor number
//	role, peer_role    string  Primary, Secondary, Unknown
//	cstate             string  connection state, DRBD 8.4 name (StandAlone … Behind)
//	disk, peer_disk    string  disk states, DRBD names (Diskless … UpToDate, DUnknown)
//	protocol           string  "A", "B", "C"; "" without network configuration
//	peer               string  the peer's node name; "" if none is configured
//	size_bytes         int     usable size of the device
//	out_of_sync_bytes  int     what the bitmap marks out of sync
//	clients            [string] addresses of the NBD clients; [] when none, never null
//	suspended          bool    application I/O suspended
//	counters           object  ns nr dw dr al bm lo pe ua ap ep, numbers in the
//	                           units of /proc/drbd's counters line (KiB or counts)
//	uuids              object  current, bitmap, history (2 entries): each 16
//	                           upper-case hex digits, as DRBD prints them (a JSON
//	                           number cannot hold every uint64)
//	resync             object  null unless a resync or verify runs:
//	                           percent (done, 2 decimals, as drbdadm's done:),
//	                           remaining_bytes, total_bytes,
//	                           speed_bytes_per_second (over the last ~18 s),
//	                           eta_seconds, verify (online verify, not resync)
type StatusJSON struct {
	Version        int          `json:"version"`
	Name           string       `json:"name"`
	Minor          int          `json:"minor"`
	Role           string       `json:"role"`
	PeerRole       string       `json:"peer_role"`
	CState         string       `json:"cstate"`
	Disk           string       `json:"disk"`
	PeerDisk       string       `json:"peer_disk"`
	Protocol       string       `json:"protocol"`
	Peer           string       `json:"peer"`
	SizeBytes      int64        `json:"size_bytes"`
	OutOfSyncBytes uint64       `json:"out_of_sync_bytes"`
	Clients        []string     `json:"clients"`
	Suspended      bool         `json:"suspended"`
	Counters       CountersJSON `json:"counters"`
	UUIDs          UUIDsJSON    `json:"uuids"`
	Resync         *ResyncJSON  `json:"resync"`
}

// CountersJSON is StatusJSON's counters: /proc/drbd's counters line
// (reference/drbd.md §1.3) without wo and oos.
type CountersJSON struct {
	NS uint64 `json:"ns"`
	NR uint64 `json:"nr"`
	DW uint64 `json:"dw"`
	DR uint64 `json:"dr"`
	AL uint64 `json:"al"`
	BM uint64 `json:"bm"`
	LO int64  `json:"lo"`
	PE int64  `json:"pe"`
	UA int64  `json:"ua"`
	AP int64  `json:"ap"`
	EP int64  `json:"ep"`
}

// UUIDsJSON is StatusJSON's generation identifiers, each 16 upper-case
// hex digits.
type UUIDsJSON struct {
	Current string    `json:"current"`
	Bitmap  string    `json:"bitmap"`
	History [2]string `json:"history"`
}

// ResyncJSON is StatusJSON's resync or verify progress.
type ResyncJSON struct {
	Percent             float64 `json:"percent"`
	RemainingBytes      uint64  `json:"remaining_bytes"`
	TotalBytes          uint64  `json:"total_bytes"`
	SpeedBytesPerSecond int64   `json:"speed_bytes_per_second"`
	ETASeconds          int64   `json:"eta_seconds"`
	Verify              bool    `json:"verify"`
}

// NewStatusJSON converts s to its JSON form.
func NewStatusJSON(s Snapshot) StatusJSON {
	j := StatusJSON{
		Version: StatusJSONVersion, Name: s.Name, Minor: s.Minor,
		Role: s.Role.String(), PeerRole: s.PeerRole.String(), CState: s.Conn.String(),
		Disk: s.Disk.String(), PeerDisk: s.PeerDisk.String(), Peer: s.Peer,
		SizeBytes: s.SizeBytes, OutOfSyncBytes: s.OutOfSyncBytes,
		Clients:   append([]string{}, s.Clients...),
		Suspended: s.Suspended,
		Counters: CountersJSON{NS: s.Counters.NS, NR: s.Counters.NR, DW: s.Counters.DW, DR: s.Counters.DR,
			AL: s.Counters.AL, BM: s.Counters.BM, LO: s.Counters.LO, PE: s.Counters.PE,
			UA: s.Counters.UA, AP: s.Counters.AP, EP: s.Counters.EP},
		UUIDs: UUIDsJSON{Current: statusUUID(s.UUIDs.Current), Bitmap: statusUUID(s.UUIDs.Bitmap),
			History: [2]string{statusUUID(s.UUIDs.History[0]), statusUUID(s.UUIDs.History[1])}},
	}
	if s.Protocol != 0 {
		j.Protocol = s.Protocol.String()
	}
	if r := s.Resync; r != nil {
		// The same two decimals as the text status's done:.
		pct, _ := strconv.ParseFloat(strconv.FormatFloat(r.Percent(), 'f', 2, 64), 64)
		j.Resync = &ResyncJSON{Percent: pct, RemainingBytes: r.LeftBytes, TotalBytes: r.TotalBytes,
			SpeedBytesPerSecond: r.SpeedRecent, ETASeconds: etaSeconds(r.ETA), Verify: r.Verify}
	}
	return j
}

func statusUUID(u uint64) string { return fmt.Sprintf("%016X", u) }

// etaSeconds is the JSON eta: −1 when the resync is not progressing.
func etaSeconds(d time.Duration) int64 {
	if d < 0 {
		return -1
	}
	return int64(d / time.Second)
}
