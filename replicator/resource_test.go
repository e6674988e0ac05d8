package replicator

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nbdmirror/nbdmirror/bitmap"
	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// logBuf collects a resource's log.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// fixture is one resource r0 on node alpha over a 64 MiB file with
// internal metadata and al-extents 7, its metadata freshly created.
type fixture struct {
	t      *testing.T
	cfg    *config.Resource
	disk   string
	held   []string // NBD clients holding it
	others []string // other holders
	log    logBuf
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	disk := filepath.Join(dir, "d0")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 64<<20); err != nil {
		t.Fatal(err)
	}
	src := fmt.Sprintf(`resource r0 { protocol C; disk { al-extents 7; } disk %s; meta-disk internal;
  on alpha { address 127.0.0.1:7000; } on beta { address 127.0.0.2:7000; } }`, disk)
	c, err := config.Parse(fstest.MapFS{"r.conf": {Data: []byte(src)}}, "r.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, cfg: c.Resources[0], disk: disk}
	host, _ := f.cfg.Host("alpha")
	dev, err := OpenMetaDevice(host, true)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := metadisk.Create(dev.File, dev.Layout, "alpha", "r0", false, metadisk.Options{}); err != nil {
		t.Fatal(err)
	}
	return f
}

// open returns a new Resource over the fixture (as a restarted daemon
// would make), closed at the end of the test.
func (f *fixture) open() *Resource {
	f.t.Helper()
	r, err := New(Options{Config: f.cfg, Node: "alpha", Logger: slog.New(slog.NewTextHandler(&f.log, nil)),
		HeldOpen: func() ([]string, []string) { return f.held, f.others },
		Clients:  func() []string { return f.held }})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		r.admin.Lock()
		defer r.admin.Unlock()
		if r.md != nil { // the test left it up: drop it as a crash would
			r.crash()
		}
	})
	return r
}

// crash drops the disk and metadata without writing anything, as a
// killed process does.
func (r *Resource) crash() {
	r.md.Abandon()
	r.dev.Close()
	r.mdev.Close()
	r.md, r.dev, r.mdev = nil, nil, nil
}

// up attaches and promotes with --force.
func (f *fixture) up() *Resource {
	f.t.Helper()
	r := f.open()
	if err := r.Attach(); err != nil {
		f.t.Fatal(err)
	}
	if err := r.Primary(true); err != nil {
		f.t.Fatal(err)
	}
	return r
}

func stateErr(t *testing.T, err error, code int, text string) {
	t.Helper()
	var se *StateError
	if !errors.As(err, &se) || se.Code != code || !strings.Contains(err.Error(), text) {
		t.Fatalf("got %v, want a refusal (%d) saying %q", err, code, text)
	}
}

func TestResource_Lifecycle(t *testing.T) {
	f := newFixture(t)
	r := f.open()
	s := r.Snapshot()
	if s.Role != RoleSecondary || s.Disk != Diskless || s.Conn != StandAlone || s.PeerDisk != DUnknown ||
		s.PeerRole != RoleUnknown || s.Peer != "beta" || s.SizeBytes != 0 {
		t.Fatalf("a new resource: %+v", s)
	}
	if _, err := r.ReadAt(make([]byte, 4096), 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("read while down: %v", err)
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	stateErr(t, r.Attach(), codeAttached, "r0: Failure: (124) Device is attached to a disk (use detach first)")
	s = r.Snapshot()
	if s.Disk != Inconsistent || s.SizeBytes == 0 || s.SizeBytes >= 64<<20 || s.UUIDs.Current != metadisk.UUIDJustCreated {
		t.Fatalf("attached fresh metadata: %+v", s)
	}
	err := r.Primary(false)
	stateErr(t, err, codeNoUpToDate, "r0: State change failed: (-2) Need access to UpToDate data (local disk Inconsistent, no peer; 'primary --force'")
	if se := (*StateError)(nil); !errors.As(err, &se) || !se.NoUpToDateData() {
		t.Fatal("the refusal is not the no-UpToDate-data one")
	}
	if err := r.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("write on a Secondary: %v", err)
	}
	if err := r.Primary(true); err != nil {
		t.Fatal(err)
	}
	s = r.Snapshot()
	if s.Role != RolePrimary || s.Disk != UpToDate || s.UUIDs.Current&1 != 1 || s.UUIDs.Bitmap != metadisk.UUIDJustCreated {
		t.Fatalf("after primary --force: %+v", s)
	}
	if !strings.Contains(f.log.String(), "Forced to consider local data as UpToDate!") ||
		!strings.Contains(f.log.String(), "role( Secondary -> Primary ) disk( Inconsistent -> UpToDate )") {
		t.Errorf("log:\n%s", f.log.String())
	}
	stateErr(t, r.Detach(), codeNoUpToDate, "(-2) Need access to UpToDate data (a Primary without a peer cannot give up its disk")
	stateErr(t, r.Invalidate(true), codeNeedConnection, "r0: State change failed: (-15) Need a connection to start verify or resync (a Primary's data cannot be replaced under its clients here")

	f.held = []string{"10.0.0.1:5000", "Unix socket", "Unix socket"}
	stateErr(t, r.Secondary(), codeInUse, "r0: State change failed: (-12) Device is held open by someone (3 NBD clients: 10.0.0.1:5000, Unix socket ×2)")
	stateErr(t, r.Down(), codeInUse, "held open")
	f.held, f.others = []string{"10.0.0.1:5000"}, []string{"/dev/nbd0 mounted on /mnt"}
	stateErr(t, r.Secondary(), codeInUse, "(-12) Device is held open by someone (1 NBD client: 10.0.0.1:5000; /dev/nbd0 mounted on /mnt)")
	f.held, f.others = nil, []string{"/dev/nbd0 open by dd (pid 7)"}
	stateErr(t, r.Secondary(), codeInUse, "(-12) Device is held open by someone (/dev/nbd0 open by dd (pid 7))")
	f.others = nil
	if err := r.Secondary(); err != nil {
		t.Fatal(err)
	}
	if s := r.Snapshot(); s.Role != RoleSecondary || s.UUIDs.Current&1 != 0 {
		t.Fatalf("after secondary: %+v", s)
	}
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	if s := r.Snapshot(); s.Disk != Diskless || s.SizeBytes != 0 {
		t.Fatalf("after down: %+v", s)
	}
	if err := r.Down(); err != nil {
		t.Fatalf("down when down: %v", err)
	}
	stateErr(t, r.Detach(), codeDiskless, "r0: State change failed: (-11) Device is diskless")
	// Up again: the disk was UpToDate, and is again.
	r = f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	if s := r.Snapshot(); s.Disk != UpToDate || s.Role != RoleSecondary {
		t.Fatalf("attached again: %+v", s)
	}
	if err := r.Primary(false); err != nil {
		t.Fatalf("promoting an UpToDate disk: %v", err)
	}
}

// TestResource_WritePath: writes reach the disk and read back, every
// written block is marked out of sync with the absent peer, the counters
// count, and a write spanning more extents than the activity log holds is
// split, not refused.
func TestResource_WritePath(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	tests := []struct {
		name    string
		off, n  int64
		wantOOS int64 // blocks newly marked
	}{
		{"one block", 0, 4096, 1},
		{"unaligned, two blocks", 4096 + 100, 4096, 2},
		{"across an extent boundary", 4<<20 - 4096, 8192, 2},
		{"32 MiB over 9 extents (al-extents 7)", 10<<20 + 512, 32 << 20, (32<<20)/4096 + 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := r.Snapshot()
			p := make([]byte, tc.n)
			rand.Read(p)
			if err := r.WriteAt(p, tc.off, true); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, tc.n)
			if _, err := r.ReadAt(got, tc.off); err != nil || !bytes.Equal(got, p) {
				t.Fatalf("read back: %v", err)
			}
			after := r.Snapshot()
			if d := int64(after.OutOfSyncBytes-before.OutOfSyncBytes) / 4096; d != tc.wantOOS {
				t.Errorf("%d blocks newly marked, want %d", d, tc.wantOOS)
			}
			if after.Counters.DW-before.Counters.DW != uint64(tc.n)/1024 && tc.n >= 1024 {
				t.Errorf("dw grew by %d KiB for %d bytes", after.Counters.DW-before.Counters.DW, tc.n)
			}
		})
	}
	s := r.Snapshot()
	if s.Counters.AL == 0 || s.Counters.DR == 0 || s.Counters.AP != 0 || s.Counters.LO != 0 {
		t.Errorf("counters %+v", s.Counters)
	}
	// TRIM and WRITE_ZEROES mark their blocks too.
	before := r.Snapshot().OutOfSyncBytes
	if err := r.WriteZeroes(48<<20, 1<<20, false, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Trim(50<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := r.Snapshot().OutOfSyncBytes - before; d != 2<<20 {
		t.Errorf("trim and write-zeroes marked %d bytes, want 2 MiB", d)
	}
	got := make([]byte, 1<<20)
	if _, err := r.ReadAt(got, 48<<20); err != nil || !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatalf("zeroed range: %v", err)
	}
}

// TestResource_DownUpKeepsDataAndBitmap: a clean down and up keeps the
// data, the bitmap and the UUIDs.
func TestResource_DownUpKeepsDataAndBitmap(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	p := make([]byte, 1<<20)
	rand.Read(p)
	if err := r.WriteAt(p, 20<<20, false); err != nil {
		t.Fatal(err)
	}
	before := r.Snapshot()
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	r = f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	after := r.Snapshot()
	if after.OutOfSyncBytes != before.OutOfSyncBytes || after.UUIDs.Current != before.UUIDs.Current&^1 ||
		after.UUIDs.Bitmap != before.UUIDs.Bitmap {
		t.Fatalf("after down/up: oos %d uuids %+v, before: oos %d uuids %+v", after.OutOfSyncBytes, after.UUIDs,
			before.OutOfSyncBytes, before.UUIDs)
	}
	if strings.Contains(f.log.String(), "activity log applied") {
		t.Error("a clean down was treated as a crash")
	}
	if err := r.Primary(false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := r.ReadAt(got, 20<<20); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("data after down/up: %v", err)
	}
}

// TestResource_CrashAppliesAL: after a crash, attach applies the activity
// log: every block of the extents written to is marked (I1), and logged.
func TestResource_CrashAppliesAL(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	if err := r.WriteAt(make([]byte, 4096), 12<<20, false); err != nil {
		t.Fatal(err)
	}
	r.markInSync(12<<20, 4096) // as if the peer had it: only the AL remembers the extent
	r.admin.Lock()
	r.crash()
	r.admin.Unlock()

	r = f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	s := r.Snapshot()
	ext := int64(12<<20) / bitmap.ExtentSize
	if s.OutOfSyncBytes != bitmap.ExtentSize {
		t.Fatalf("after the crash %d bytes out of sync, want extent %d's %d", s.OutOfSyncBytes, ext, bitmap.ExtentSize)
	}
	if !strings.Contains(f.log.String(), "the last stop was unclean: activity log applied") {
		t.Errorf("log:\n%s", f.log.String())
	}
	if s.Disk != UpToDate || s.Role != RoleSecondary {
		t.Errorf("disk %s, role %s after a crash of a Primary", s.Disk, s.Role)
	}
	// It comes back Secondary: the role flag and bit go, crashed-primary
	// stays.
	sb := r.superblock()
	if sb.Flags&metadisk.FlagPrimary != 0 || sb.UUIDs.Current&1 != 0 || sb.Flags&metadisk.FlagCrashedPrimary == 0 {
		t.Errorf("after the crash: flags %v, current %016X", sb.Flags, sb.UUIDs.Current)
	}
}

func (r *Resource) superblock() metadisk.Superblock {
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	return md.Superblock()
}

// markInSync clears bits, as a finished resync would.
func (r *Resource) markInSync(off, n int64) {
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	md.MarkInSync(off, n)
}

func TestResource_InvalidateAndNewCurrentUUID(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	u0 := r.Snapshot().UUIDs
	if err := r.NewCurrentUUID(false); err != nil {
		t.Fatal(err)
	}
	u1 := r.Snapshot().UUIDs
	if u1.Bitmap != u0.Current || u1.Current == u0.Current || u1.Current&1 != 1 ||
		u1.History[0] != u0.Bitmap || u1.History[1] != u0.History[0] {
		t.Fatalf("new-current-uuid: %+v -> %+v", u0, u1)
	}
	if err := r.WriteAt(make([]byte, 8192), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.NewCurrentUUID(true); err != nil {
		t.Fatal(err)
	}
	if s := r.Snapshot(); s.OutOfSyncBytes != 0 || s.UUIDs.Bitmap != u1.Current {
		t.Fatalf("new-current-uuid --clear-bitmap: %+v", s)
	}
	if err := r.Secondary(); err != nil {
		t.Fatal(err)
	}
	if err := r.Invalidate(true); err != nil {
		t.Fatal(err)
	}
	s := r.Snapshot()
	if s.Disk != Inconsistent || s.OutOfSyncBytes != uint64(s.SizeBytes) {
		t.Fatalf("after invalidate: disk %s, %d of %d bytes out of sync", s.Disk, s.OutOfSyncBytes, s.SizeBytes)
	}
	stateErr(t, r.Primary(false), codeNoUpToDate, "Need access to UpToDate data")
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	stateErr(t, r.Invalidate(true), codeDiskless, "(-11) Device is diskless, the requested operation requires a disk")
	stateErr(t, r.NewCurrentUUID(false), codeNoDiskConfig, "r0: Failure: (138) Device does not have a disk-config (attach it first)")
	// Inconsistent survives a restart.
	r = f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	if s := r.Snapshot(); s.Disk != Inconsistent {
		t.Fatalf("invalidated disk attaches as %s", s.Disk)
	}
}

// TestResource_DemoteWaitsForIO: demotion and detach wait for requests in
// flight, and requests after demotion are refused (run under -race).
func TestResource_DemoteWaitsForIO(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 4 {
		wg.Go(func() {
			p := make([]byte, 64<<10)
			for j := 0; ; j++ {
				err := r.WriteAt(p, int64((i*16+j%16))*(64<<10)+int64(i)*(8<<20), j%4 == 0)
				if err != nil {
					if !errors.Is(err, ErrNotPrimary) {
						errs <- err
					}
					return
				}
			}
		})
	}
	waitWritten(t, r, 16<<20)
	if err := r.Down(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("a write failed otherwise than by the demotion: %v", err)
	}
	if strings.Contains(f.log.String(), "ERROR") {
		t.Errorf("log:\n%s", f.log.String())
	}
}

// TestResource_PromotionUUIDs: DRBD's rules for a new data generation on
// promotion (reference/drbd.md §4.2).
func TestResource_PromotionUUIDs(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, r *Resource) // from attached, Inconsistent, UUIDs 4:0
		force   bool
		rotate  bool // a new current UUID, the old one the bitmap UUID
	}{
		{"forced from Inconsistent", func(*testing.T, *Resource) {}, true, true},
		{"UpToDate, bitmap UUID 0", func(t *testing.T, r *Resource) {
			setSuper(t, r, func(sb *metadisk.Superblock) {
				sb.Flags |= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
				sb.UUIDs.Current, sb.UUIDs.Bitmap = 0xAAAA0, 0
			}, UpToDate)
		}, false, true},
		{"UpToDate, bitmap UUID set", func(t *testing.T, r *Resource) {
			setSuper(t, r, func(sb *metadisk.Superblock) {
				sb.Flags |= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
				sb.UUIDs.Current, sb.UUIDs.Bitmap = 0xAAAA0, 0xBBBB0
			}, UpToDate)
		}, false, false},
		{"--force on UpToDate changes nothing", func(t *testing.T, r *Resource) {
			setSuper(t, r, func(sb *metadisk.Superblock) {
				sb.Flags |= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
				sb.UUIDs.Current, sb.UUIDs.Bitmap = 0xAAAA0, 0xBBBB0
			}, UpToDate)
		}, true, false},
		{"forced from Outdated", func(t *testing.T, r *Resource) {
			setSuper(t, r, func(sb *metadisk.Superblock) {
				sb.Flags |= metadisk.FlagConsistent
				sb.UUIDs.Current, sb.UUIDs.Bitmap = 0xAAAA0, 0xBBBB0
			}, Outdated)
		}, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			r := f.open()
			if err := r.Attach(); err != nil {
				t.Fatal(err)
			}
			tc.prepare(t, r)
			before := r.Snapshot().UUIDs
			if err := r.Primary(tc.force); err != nil {
				t.Fatal(err)
			}
			after := r.Snapshot().UUIDs
			if after.Current&1 != 1 {
				t.Errorf("current %016X lacks the role bit", after.Current)
			}
			rotated := after.Current&^1 != before.Current&^1
			if rotated != tc.rotate || rotated && after.Bitmap != before.Current {
				t.Errorf("UUIDs %+v -> %+v; want rotation %v", before, after, tc.rotate)
			}
			if after.History != before.History {
				t.Errorf("history changed: %+v -> %+v", before.History, after.History)
			}
		})
	}
	// Outdated without --force is refused.
	f := newFixture(t)
	r := f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	setSuper(t, r, func(sb *metadisk.Superblock) { sb.Flags |= metadisk.FlagConsistent }, Outdated)
	stateErr(t, r.Primary(false), codeNoUpToDate, "(local disk Outdated, no peer; 'primary --force'")
}

// setSuper changes the superblock and re-attaches, so the disk state is
// derived from the new flags; want is the state that must result.
func setSuper(t *testing.T, r *Resource, f func(*metadisk.Superblock), want DiskState) {
	t.Helper()
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if err := md.UpdateSuperblock(f); err != nil {
		t.Fatal(err)
	}
	if err := r.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	if d := r.Snapshot().Disk; d != want {
		t.Fatalf("disk %s after the change, want %s", d, want)
	}
}

// TestResource_Stop: a daemon stop of a Primary with writes in flight
// finishes them, and leaves the metadata clean and Secondary.
func TestResource_Stop(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	f.held = []string{"10.0.0.1:5000"} // clients do not hold a stop back
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			p := make([]byte, 64<<10)
			for j := 0; ; j++ {
				if r.WriteAt(p, int64(i)*(8<<20)+int64(j%32)*(64<<10), false) != nil {
					return
				}
			}
		})
	}
	waitWritten(t, r, 8<<20)
	oos := r.Snapshot().OutOfSyncBytes
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	r = f.open()
	if err := r.Attach(); err != nil {
		t.Fatal(err)
	}
	s, sb := r.Snapshot(), r.superblock()
	if s.Role != RoleSecondary || s.Disk != UpToDate || s.OutOfSyncBytes < oos ||
		sb.Flags&metadisk.FlagPrimary != 0 || sb.UUIDs.Current&1 != 0 || sb.Flags&metadisk.FlagCrashedPrimary != 0 {
		t.Fatalf("after stop: %+v, flags %v", s, sb.Flags)
	}
	if strings.Contains(f.log.String(), "activity log applied") {
		t.Error("a stop was treated as a crash")
	}
}

// TestResource_ClearBitmapHoldsWritesBack: new-current-uuid
// --clear-bitmap on a busy Primary never clears the mark of a write that
// completes after it (run under -race).
func TestResource_ClearBitmapHoldsWritesBack(t *testing.T) {
	f := newFixture(t)
	r := f.up()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		p := make([]byte, 4096)
		for j := 0; ; j++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := r.WriteAt(p, int64(j%4096)*4096, false); err != nil {
				t.Error(err)
				return
			}
		}
	})
	waitWritten(t, r, 1<<20)
	if err := r.NewCurrentUUID(true); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	// Every block written after the clear is marked: write once more to
	// a known block and check it is marked.
	if err := r.WriteAt(make([]byte, 4096), 40<<20, false); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	md := r.md
	r.mu.Unlock()
	if !md.Test((40 << 20) / 4096) {
		t.Fatal("a write after the clear is not marked")
	}
}

// waitWritten waits until the writers of a test have written n bytes.
func waitWritten(t *testing.T, r *Resource, n uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for r.written.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the writers wrote %d bytes in 30 s, want %d", r.written.Load(), n)
		}
		runtime.Gosched()
	}
}
