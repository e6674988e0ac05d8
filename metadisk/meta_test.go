package metadisk

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/nbdmirror/nbdmirror/bitmap"
)

// sealed recomputes a superblock's checksum after a test changed it.
func sealed(b []byte) []byte {
	binary.BigEndian.PutUint64(b[sbOffSum:], xxhash.Sum64(b[:sbOffSum]))
	return b
}

// sealedTx recomputes an activity-log block's checksum.
func sealedTx(b []byte) []byte {
	binary.BigEndian.PutUint64(b[alOffSum:], xxhash.Sum64(b[:alOffSum]))
	return b
}

const mib = 1 << 20

func TestLayouts(t *testing.T) {
	tests := []struct {
		name              string
		layout            func() (Layout, error)
		wantData, wantOff int64
		wantSize          int64
		wantErr           error
	}{
		{"internal 1 GiB", func() (Layout, error) { return InternalLayout(1 << 30) },
			1<<30 - areaSize(1<<30-offBitmap), 1<<30 - areaSize(1<<30-offBitmap), areaSize(1<<30 - offBitmap), nil},
		{"internal, odd size", func() (Layout, error) { return InternalLayout(100*mib + 1234) },
			-1, -1, -1, nil},
		{"internal too small", func() (Layout, error) { return InternalLayout(offBitmap) }, 0, 0, 0, ErrTooSmall},
		{"external", func() (Layout, error) { return ExternalLayout(1<<30+100, 2*mib) },
			1 << 30, 0, areaSize(1 << 30), nil},
		{"external device too small", func() (Layout, error) { return ExternalLayout(1<<40, 2*mib) }, 0, 0, 0, ErrTooSmall},
		{"indexed slot 2", func() (Layout, error) { return IndexedLayout(10<<30, 3*IndexSlotSize, 2) },
			10 << 30, 2 * IndexSlotSize, areaSize(10 << 30), nil},
		{"indexed slot past the device", func() (Layout, error) { return IndexedLayout(10<<30, 3*IndexSlotSize, 3) }, 0, 0, 0, ErrTooSmall},
		{"indexed, 4 TiB does not fit a slot", func() (Layout, error) { return IndexedLayout(4<<40, IndexSlotSize, 0) }, 0, 0, 0, ErrTooSmall},
		{"indexed, 3.9 TiB fits", func() (Layout, error) { return IndexedLayout(3900<<30, IndexSlotSize, 0) },
			3900 << 30, 0, areaSize(3900 << 30), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := tc.layout()
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if l.DataSize%BlockSize != 0 || l.Offset%BlockSize != 0 || l.Size != areaSize(l.DataSize) {
				t.Errorf("layout %+v misaligned or inconsistent", l)
			}
			if l.Kind == Internal && (l.DataSize > l.Offset || l.Offset+l.Size > 100*mib+1234 && tc.wantData == -1) {
				t.Errorf("internal layout %+v overlaps", l)
			}
			if tc.wantData >= 0 && (l.DataSize != tc.wantData || l.Offset != tc.wantOff || l.Size != tc.wantSize) {
				t.Errorf("layout %+v, want data %d offset %d size %d", l, tc.wantData, tc.wantOff, tc.wantSize)
			}
		})
	}
}

func TestSuperblock_Binary(t *testing.T) {
	sb := Superblock{Seq: 7, Kind: Indexed, Index: 3, DataSize: 1 << 30, AreaSize: areaSize(1 << 30),
		Flags: FlagConsistent | FlagWasUpToDate, UUIDs: UUIDs{0xAAAA, 0xBBBB, [2]uint64{0xCCCC, 0xDDDD}},
		ALFloor: 9, Created: 1700000000, DevUUID: 0x1122334455667788, Node: "alpha", Resource: "r0"}
	b, err := sb.AppendBinary(nil)
	if err != nil || len(b) != BlockSize {
		t.Fatalf("encode: %v, %d bytes", err, len(b))
	}
	const head = "4e42444d4952 4d44" + "0001" + "0003" + "00000003" + "0000000000000007" + "0000000040000000"
	if got, want := hex.EncodeToString(b[:32]), stripSpaces(head); got != want {
		t.Errorf("header %s, want %s", got, want)
	}
	var got Superblock
	if err := got.UnmarshalBinary(b); err != nil || got != sb {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	bad := func(f func([]byte)) []byte {
		c := slices.Clone(b)
		f(c)
		return c
	}
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"never written", make([]byte, BlockSize), ErrNoSuperblock},
		{"torn", bad(func(c []byte) { c[300] = 1 }), ErrSuperChecksum},
		{"short", b[:100], ErrBlockLength},
		{"future version", sealed(bad(func(c []byte) { c[sbOffVersion+1] = 2 })), ErrSuperVersion},
		{"unknown flag", sealed(bad(func(c []byte) { c[sbOffFlags] = 0x80 })), errUnknownSbFields},
		{"reserved byte", sealed(bad(func(c []byte) { c[3000] = 1 })), errUnknownSbFields},
		{"bad kind", sealed(bad(func(c []byte) { c[sbOffKind+1] = 9 })), ErrSuperInvalid},
		{"area size disagrees", sealed(bad(func(c []byte) { c[sbOffArea+7]++ })), ErrSuperInvalid},
		{"name too long", sealed(bad(func(c []byte) { c[sbOffNode+1] = 65 })), ErrSuperInvalid},
	}
	for _, tc := range tests {
		var s Superblock
		if err := s.UnmarshalBinary(tc.b); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := (&Superblock{Node: string(make([]byte, 65))}).AppendBinary(nil); !errors.Is(err, errNameTooLong) {
		t.Errorf("long name: %v", err)
	}
}

func stripSpaces(s string) string {
	out := []byte{}
	for i := range len(s) {
		if s[i] != ' ' {
			out = append(out, s[i])
		}
	}
	return string(out)
}

func TestTransactionBlocks(t *testing.T) {
	var ext []bitmap.Extent
	for i := range 2500 {
		ext = append(ext, bitmap.Extent(i*3))
	}
	enc := appendTx(nil, 42, 10, ext)
	if len(enc) != 3*BlockSize || TxBlocks(len(ext)) != 3 {
		t.Fatalf("%d bytes", len(enc))
	}
	ring := make([]byte, ALRingBlocks*BlockSize)
	copy(ring[10*BlockSize:], enc)
	copy(ring[20*BlockSize:], appendTx(nil, 41, 20, ext[:5]))
	st, err := scanRing(ring, 10000)
	if err != nil || st.newest != 42 || !slices.Equal(st.active, ext) || st.nextSlot != 13 {
		t.Fatalf("scan: %v newest %d next %d", err, st.newest, st.nextSlot)
	}
	// Tear the middle part of 42: 41 is the newest complete one.
	ring[11*BlockSize+100] ^= 1
	st, err = scanRing(ring, 10000)
	if err != nil || st.newest != 41 || len(st.active) != 5 || st.torn != 1 || st.maxSeq != 42 {
		t.Fatalf("after tear: %v %+v", err, st)
	}
	// An extent past the device is corruption, not a torn write.
	if _, err := scanRing(ring, 100); !errors.Is(err, ErrALInvalid) {
		t.Fatalf("extent past the device: %v", err)
	}
	// Decoder bounds.
	blk := appendTx(nil, 1, 0, []bitmap.Extent{1, 2, 3})
	for name, f := range map[string]func([]byte){
		"parts":     func(b []byte) { b[alOffParts+1] = 200 },
		"count":     func(b []byte) { b[alOffCount+3] = 9 },
		"total":     func(b []byte) { b[alOffTotal] = 0xff },
		"slot":      func(b []byte) { b[alOffSlot+2] = 1 },
		"unsorted":  func(b []byte) { b[alOffExtents+3] = 7 },
		"reserved":  func(b []byte) { b[35] = 1 },
		"trailing":  func(b []byte) { b[alOffExtents+20] = 1 },
		"version":   func(b []byte) { b[alOffVersion+1] = 2 },
		"part>=all": func(b []byte) { b[alOffPart+1] = 1 },
	} {
		c := slices.Clone(blk)
		f(c)
		if _, err := decodeTxBlock(sealedTx(c), 100); !errors.Is(err, ErrALInvalid) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestMeta_Lifecycle(t *testing.T) {
	dev, l, m := newMeta(t, 256*mib, Options{ALExtents: 8})
	span, err := m.BeginWrite(5*mib, 8192)
	if err != nil {
		t.Fatal(err)
	}
	m.MarkOutOfSync(5*mib, 8192)
	if !slices.Equal(m.ActiveExtents(), []bitmap.Extent{1}) || m.OutOfSync() != 2 {
		t.Fatalf("active %v oos %d", m.ActiveExtents(), m.OutOfSync())
	}
	if err := m.Close(); err == nil {
		t.Fatal("Close with a write in flight succeeded")
	}
	m.EndWrite(span)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.BeginWrite(0, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("BeginWrite after Close: %v", err)
	}
	// A clean reopen: nothing to apply, the bits are there.
	m, err = Open(dev, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	rec := m.Recovery()
	if !rec.Clean || len(rec.ALActive) != 0 || m.OutOfSync() != 2 || !m.Test(5*mib/4096) {
		t.Fatalf("reopen: %+v oos %d", rec, m.OutOfSync())
	}
	if _, err := m.BeginWrite(0, 1); err == nil {
		t.Fatal("BeginWrite before Activate succeeded")
	}
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	if err := m.UpdateSuperblock(func(sb *Superblock) {
		sb.Flags |= FlagPrimary | FlagConsistent
		sb.UUIDs.Current = 0x1234
		sb.DataSize = 1 // ignored
	}); err != nil {
		t.Fatal(err)
	}
	// Writes to extents 10 and 11, then a crash.
	for _, off := range []int64{40 * mib, 44*mib + 4096} {
		s, err := m.BeginWrite(off, 4096)
		if err != nil {
			t.Fatal(err)
		}
		m.MarkOutOfSync(off, 4096)
		m.EndWrite(s)
	}
	m.Abandon()
	m, err = Open(dev, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	rec = m.Recovery()
	if rec.Clean || !slices.Equal(rec.ALActive, []bitmap.Extent{10, 11}) {
		t.Fatalf("after crash: %+v", rec)
	}
	// The two writes' bits never reached the disk: the log covers them.
	if m.Test(40 * mib / 4096) {
		t.Fatal("an unflushed bit is on disk")
	}
	n, err := m.ApplyAL()
	if err != nil || n != 2*bitmap.ExtentBlocks {
		t.Fatalf("ApplyAL: %d, %v", n, err)
	}
	sb := m.Superblock()
	if sb.Flags&FlagCrashedPrimary == 0 || sb.UUIDs.Current != 0x1234 || sb.DataSize != l.DataSize || sb.Flags&FlagClean == 0 {
		t.Fatalf("superblock after apply-al: %+v", sb)
	}
	if n, _ := m.ApplyAL(); n != 0 {
		t.Error("second ApplyAL applied again")
	}
	m.Abandon()
	// apply-al left the metadata clean: the next open has nothing to do.
	m, err = Open(dev, l, Options{})
	if err != nil || !m.Recovery().Clean || m.OutOfSync() != 2+2*bitmap.ExtentBlocks {
		t.Fatalf("after apply-al: %v, %+v, oos %d", err, m.Recovery(), m.OutOfSync())
	}
}

func TestMeta_CreateRefusesExisting(t *testing.T) {
	dev, l, m := newMeta(t, 64*mib, Options{})
	m.MarkOutOfSync(0, mib)
	m.Close()
	if err := Create(dev, l, "alpha", "r0", false, Options{}); !errors.Is(err, ErrExists) {
		t.Fatalf("create over valid metadata: %v", err)
	}
	if err := Create(dev, l, "alpha", "r0", true, Options{}); err != nil {
		t.Fatal(err)
	}
	m, err := Open(dev, l, Options{})
	if err != nil || m.OutOfSync() != 0 || m.Superblock().UUIDs.Current != UUIDJustCreated {
		t.Fatalf("after forced create: %v", err)
	}
	// A forced create that crashes half way leaves no valid-looking old
	// superblock over a half-written bitmap: give the old metadata bits,
	// then crash a second forced create at every step.
	if err := m.Activate(); err != nil {
		t.Fatal(err)
	}
	m.MarkOutOfSync(0, mib)
	old := m.Superblock()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	dev.Sync()
	for crashAt := 1; crashAt < 8; crashAt++ {
		d := dev.clone()
		var img *memDev
		n := 0
		d.onOp = func(op int) {
			if n++; n == crashAt && img == nil {
				img = d.Crash(rand.New(rand.NewPCG(2, uint64(crashAt))))
			}
		}
		Create(d, l, "alpha", "r0", true, Options{})
		if img == nil {
			continue
		}
		m, err := Open(img, l, Options{})
		if err == nil && m.Superblock().DevUUID == old.DevUUID && m.OutOfSync() != mib/BlockSize {
			t.Fatalf("crash at op %d: old superblock still valid over a new bitmap (%d bits set)", crashAt, m.OutOfSync())
		}
	}
}

func TestMeta_OpenErrors(t *testing.T) {
	dev, l, m := newMeta(t, 64*mib, Options{})
	m.Close()
	tests := []struct {
		name   string
		mutate func(d *memDev)
		layout Layout
		want   error
	}{
		{"disk shrank", nil, func() Layout { l2 := l; l2.DataSize -= BlockSize; return l2 }(), ErrMismatch},
		{"placement differs", nil, func() Layout { l2 := l; l2.Kind = Indexed; return l2 }(), ErrMismatch},
		{"no metadata", func(d *memDev) { d.zero(0, d.size) }, l, ErrNoMetadata},
		{"both superblocks torn", func(d *memDev) { d.corrupt(100, 1); d.corrupt(BlockSize+100, 1) }, l, ErrCorrupt},
		{"activity log wiped", func(d *memDev) { d.zero(offALRing, ALRingBlocks*BlockSize) }, l, ErrCorrupt},
		{"bitmap page from elsewhere", func(d *memDev) {
			bm := bitmap.New(l.Blocks())
			d.WriteAt(bm.AppendPage(nil, 1), offBitmap)
		}, l, ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := dev.clone()
			if tc.mutate != nil {
				tc.mutate(d)
			}
			if _, err := Open(d, tc.layout, Options{}); !errors.Is(err, tc.want) {
				t.Fatalf("Open: %v, want %v", err, tc.want)
			}
		})
	}
	t.Run("one superblock torn", func(t *testing.T) {
		d := dev.clone()
		m, err := Open(d, l, Options{})
		if err != nil {
			t.Fatal(err)
		}
		d.corrupt(int64(m.Recovery().Slot)*BlockSize+100, 1) // tear the newest
		m2, err := Open(d, l, Options{Logger: testLog(t)})
		if err != nil || m2.Recovery().Slot == m.Recovery().Slot || !errors.Is(m2.Recovery().OtherSlotErr, ErrSuperChecksum) {
			t.Fatalf("open with the newest slot torn: %v %+v", err, m2.Recovery())
		}
	})
	t.Run("torn bitmap page reads as all set", func(t *testing.T) {
		d := dev.clone()
		d.corrupt(offBitmap+500, 1)
		m, err := Open(d, l, Options{Logger: testLog(t)})
		if err != nil || !slices.Equal(m.Recovery().TornPages, []int{0}) || m.OutOfSync() != min(l.Blocks(), bitmap.BitsPerPage) {
			t.Fatalf("%v %+v oos %d", err, m.Recovery(), m.OutOfSync())
		}
	})
}

// TestMeta_GroupCommit: writers that need new extents at the same time
// share transactions.
func TestMeta_GroupCommit(t *testing.T) {
	dev, _, m := newMeta(t, 1<<30, Options{})
	// A real disk takes time to flush; that is when writers pile up.
	dev.onOp = func(int) { time.Sleep(time.Millisecond) }
	before := m.Stats().ALTransactions
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range 64 {
		wg.Go(func() {
			<-start
			s, err := m.BeginWrite(int64(i)*bitmap.ExtentSize, 4096)
			if err != nil {
				t.Error(err)
				return
			}
			m.EndWrite(s)
		})
	}
	close(start)
	wg.Wait()
	txs := m.Stats().ALTransactions - before
	if len(m.ActiveExtents()) != 64 {
		t.Fatalf("%d active extents", len(m.ActiveExtents()))
	}
	if txs >= 64 {
		t.Errorf("%d transactions for 64 concurrent writers: no group commit", txs)
	}
	t.Logf("%d transactions for 64 concurrent writers", txs)
}

func TestMeta_WriteFailureIsSticky(t *testing.T) {
	dev, _, m := newMeta(t, 64*mib, Options{})
	dev.mu.Lock()
	dev.failWrites = dev.ops + 1
	dev.mu.Unlock()
	if _, err := m.BeginWrite(0, 4096); !errors.Is(err, ErrFailed) {
		t.Fatalf("BeginWrite with a failing device: %v", err)
	}
	if err := m.FlushBitmap(); !errors.Is(err, ErrFailed) {
		t.Fatalf("FlushBitmap after a failure: %v", err)
	}
}

// TestMeta_DataSyncBeforeEviction: with SetDataSync (external metadata),
// a transaction that lets extents go flushes the data disk before any
// metadata of it is written, and only such a transaction does; a failed
// data flush fails the metadata and writes no transaction.
func TestMeta_DataSyncBeforeEviction(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprintf("data flush fails=%v", fail), func(t *testing.T) {
			dev, _, m := newMeta(t, 64*mib, Options{ALExtents: 7})
			defer m.Abandon()
			opsNow := func() int {
				dev.mu.Lock()
				defer dev.mu.Unlock()
				return dev.ops
			}
			var syncedAt []int // metadata operations done when the data was flushed
			m.SetDataSync(func() error {
				syncedAt = append(syncedAt, opsNow())
				if fail {
					return errors.New("EIO")
				}
				return nil
			})
			for e := range int64(7) { // fills the log: nothing evicted
				s, err := m.BeginWrite(e*4*mib, 4096)
				if err != nil {
					t.Fatal(err)
				}
				m.EndWrite(s)
			}
			if len(syncedAt) != 0 {
				t.Fatalf("the data was flushed %d times while the log only grew", len(syncedAt))
			}
			before := opsNow()
			s, err := m.BeginWrite(7*4*mib, 4096) // evicts extent 0
			if len(syncedAt) != 1 || syncedAt[0] != before {
				t.Fatalf("data flushed at metadata operations %v, want once, at %d (before the transaction)", syncedAt, before)
			}
			if fail {
				if !errors.Is(err, ErrFailed) {
					t.Fatalf("BeginWrite after a failed data flush: %v, want ErrFailed", err)
				}
				if got := opsNow(); got != before {
					t.Fatalf("%d metadata operations after the failed data flush, want none", got-before)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			m.EndWrite(s)
			if opsNow() == before {
				t.Fatal("no transaction written")
			}
		})
	}
}
