package replicator

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/wire"
	"github.com/nbdmirror/nbdmirror/transport"
)

// grow truncates the backing files of the nodes given to size bytes.
func (p *pair) grow(size int64, nodes ...int) {
	p.t.Helper()
	for _, i := range nodes {
		if err := os.Truncate(p.disks[i], size); err != nil {
			p.t.Fatal(err)
		}
	}
}

// primaryInSync connects the pair and makes alpha Primary with beta fully
// synced, then writes a pattern over the first MiB.
func (p *pair) primaryInSync() []byte {
	p.t.Helper()
	p.connect()
	p.connected()
	if err := p.alpha.Primary(true); err != nil {
		p.t.Fatal(err)
	}
	p.inSync()
	buf := make([]byte, 1<<20)
	rand.Read(buf)
	if err := p.alpha.WriteAt(buf, 0, false); err != nil {
		p.t.Fatal(err)
	}
	return buf
}

// writeEnd writes through alpha into the last 64 KiB of the device, flushes,
// and waits for the peer's ack.
func (p *pair) writeEnd() {
	p.t.Helper()
	buf := make([]byte, 64<<10)
	rand.Read(buf)
	if err := p.alpha.WriteAt(buf, p.alpha.Size()-int64(len(buf)), true); err != nil {
		p.t.Fatal(err)
	}
	if err := p.alpha.Flush(); err != nil {
		p.t.Fatal(err)
	}
}

// internalData is the data size of a disk of n bytes with internal metadata.
func internalData(t *testing.T, n int64) int64 {
	t.Helper()
	l, err := metadisk.InternalLayout(n)
	if err != nil {
		t.Fatal(err)
	}
	return l.DataSize
}

// TestPair_ResizeConnected: both backing disks grow, resize on the
// Primary: both nodes agree the size, both metadata areas move to the new
// end, the new area is resynced from the Primary (with --assume-clean only
// the old metadata areas, which are data now), writes land in the new
// area, and the disks end equal; the size survives a restart.
func TestPair_ResizeConnected(t *testing.T) {
	for _, clean := range []bool{false, true} {
		name := "new area synced"
		if clean {
			name = "assume clean"
		}
		t.Run(name, func(t *testing.T) {
			p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
			p.primaryInSync()
			old := p.alpha.Size()
			p.grow(48<<20, 0, 1)
			sent := p.alpha.Snapshot().ResyncBytes
			msg, err := p.alpha.Resize(ResizeOptions{AssumeClean: clean})
			if err != nil {
				t.Fatal(err)
			}
			want := internalData(t, 48<<20)
			if !strings.Contains(msg, "resized from") || p.alpha.Size() != want || p.beta.Size() != want {
				t.Fatalf("%q: alpha %d, beta %d bytes, want %d", msg, p.alpha.Size(), p.beta.Size(), want)
			}
			if got := p.beta.Snapshot().SizeBytes; got != want {
				t.Fatalf("beta's status says %d bytes", got)
			}
			p.inSync()
			synced := p.alpha.Snapshot().ResyncBytes - sent
			switch {
			case !clean && synced < uint64(want-old):
				t.Fatalf("%d bytes resynced, the new area is %d", synced, want-old)
			case clean && (synced == 0 || synced >= uint64(want-old)/2):
				t.Fatalf("--assume-clean resynced %d bytes of a %d-byte new area; want only the old metadata areas", synced, want-old)
			}
			p.writeEnd()
			p.wait(p.alpha, "every write acked", func(s Snapshot) bool { return s.Counters.PE == 0 })
			p.same()
			// A restart comes back at the new size.
			cfg := p.beta.cfg
			if err := p.beta.Stop(); err != nil {
				t.Fatal(err)
			}
			r, err := New(Options{Config: cfg, Node: "beta", Logger: slog.New(slog.NewTextHandler(p.logs[1], nil))})
			if err != nil {
				t.Fatal(err)
			}
			p.beta = r
			if err := r.Attach(); err != nil {
				t.Fatal(err)
			}
			if r.Size() != want {
				t.Fatalf("after a restart beta has %d bytes, want %d", r.Size(), want)
			}
			if err := r.Connect(false); err != nil {
				t.Fatal(err)
			}
			p.inSync()
		})
	}
}

// TestPair_ResizeDisconnected: the Primary resizes alone
// (--assume-peer-has-space) and marks the new area; at the next connect a
// peer whose disk holds the size takes it and is resynced, and a peer whose
// disk is too small is refused, as DRBD does.
func TestPair_ResizeDisconnected(t *testing.T) {
	tests := []struct {
		name      string
		peerGrown bool
	}{{"peer grown", true}, {"peer too small", false}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
			p.primaryInSync()
			old := p.alpha.Size()
			if err := p.beta.Disconnect(); err != nil {
				t.Fatal(err)
			}
			p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
			p.grow(48<<20, 0)
			if tc.peerGrown {
				p.grow(48<<20, 1)
			}
			if _, err := p.alpha.Resize(ResizeOptions{}); !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "--assume-peer-has-space") {
				t.Fatalf("disconnected resize without --assume-peer-has-space: %v", err)
			}
			msg, err := p.alpha.Resize(ResizeOptions{AssumePeerHasSpace: true})
			if err != nil {
				t.Fatal(err)
			}
			want := internalData(t, 48<<20)
			if p.alpha.Size() != want || !strings.Contains(msg, "next connect") {
				t.Fatalf("%q: %d bytes, want %d", msg, p.alpha.Size(), want)
			}
			if got := p.alpha.Snapshot().OutOfSyncBytes; got < uint64(want-old) {
				t.Fatalf("%d bytes out of sync, the new area is %d", got, want-old)
			}
			p.writeEnd()
			if err := p.beta.Connect(false); err != nil {
				t.Fatal(err)
			}
			if !tc.peerGrown {
				p.wait(p.alpha, "StandAlone", func(s Snapshot) bool { return s.Conn == StandAlone })
				if !strings.Contains(p.logs[0].String(), "The peer's disk size is too small!") {
					t.Fatal("alpha did not say why it refused the peer")
				}
				if p.beta.Size() != old || p.alpha.Size() != want {
					t.Fatalf("sizes after the refusal: alpha %d, beta %d", p.alpha.Size(), p.beta.Size())
				}
				return
			}
			p.inSync()
			if p.beta.Size() != want {
				t.Fatalf("beta has %d bytes after the connect, want %d", p.beta.Size(), want)
			}
			p.same()
		})
	}
}

// TestPair_ResizeRefusals: resize on the Secondary, during a resync,
// beyond the disks, with nothing to grow; shrinking needs --size and
// --allow-shrink and never goes below an ext filesystem; an allowed shrink
// is agreed by both nodes.
func TestPair_ResizeRefusals(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	p.primaryInSync()
	cur := p.alpha.Size()
	_, err := p.beta.Resize(ResizeOptions{})
	stateErr(t, err, codeNeedPrimary, "(131) Need one Primary node to resize. (this node is Secondary: run resize on the Primary)")
	msg, err := p.alpha.Resize(ResizeOptions{})
	if err != nil || !strings.Contains(msg, "the size stays") || !strings.Contains(msg, "grow the backing disks first") {
		t.Fatalf("nothing to grow: %q, %v", msg, err)
	}
	p.grow(48<<20, 0) // only alpha's
	if _, err := p.alpha.Resize(ResizeOptions{Size: 40 << 20}); !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "more than the disks hold") {
		t.Fatalf("beyond the peer's disk: %v", err)
	}
	if _, err := p.alpha.Resize(ResizeOptions{Size: 4097}); !errors.Is(err, ErrResize) {
		t.Fatalf("unaligned size: %v", err)
	}
	shrink := cur - 8<<20
	if _, err := p.alpha.Resize(ResizeOptions{Size: shrink}); !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "--allow-shrink") {
		t.Fatalf("shrink without --allow-shrink: %v", err)
	}
	// An ext4 superblock saying 28 MiB.
	sb := make([]byte, 1024)
	binary.LittleEndian.PutUint32(sb[4:], 28<<10) // blocks of 1 KiB
	binary.LittleEndian.PutUint16(sb[56:], 0xEF53)
	if err := p.alpha.WriteAt(sb, 1024, true); err != nil {
		t.Fatal(err)
	}
	_, err = p.alpha.Resize(ResizeOptions{Size: shrink, AllowShrink: true})
	if !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "shrinking below the filesystem is refused") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("shrink below an ext filesystem: %v", err)
	}
	if p.alpha.Size() != cur || p.beta.Size() != cur {
		t.Fatalf("a refused resize changed the sizes: %d, %d", p.alpha.Size(), p.beta.Size())
	}
	// During a resync (held by pause-sync).
	if err := p.beta.PauseSync(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.InvalidateRemote(false); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "PausedSyncS", func(s Snapshot) bool { return s.Conn == PausedSyncS })
	_, err = p.alpha.Resize(ResizeOptions{})
	stateErr(t, err, codeResizeResync, "(130) Resize not allowed during resync.")
	if err := p.beta.ResumeSync(); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	// Below no filesystem, an explicit shrink is agreed by both.
	clear(sb)
	if err := p.alpha.WriteAt(sb, 1024, true); err != nil {
		t.Fatal(err)
	}
	if _, err := p.alpha.Resize(ResizeOptions{Size: shrink, AllowShrink: true}); err != nil {
		t.Fatal(err)
	}
	if p.alpha.Size() != shrink || p.beta.Size() != shrink {
		t.Fatalf("after the shrink: alpha %d, beta %d, want %d", p.alpha.Size(), p.beta.Size(), shrink)
	}
	p.writeEnd()
	if err := p.alpha.WriteAt(make([]byte, 4096), shrink, false); err == nil {
		t.Fatal("a write past the new end was taken")
	}
	p.wait(p.alpha, "every write acked", func(s Snapshot) bool { return s.Counters.PE == 0 })
	p.same()
}

func TestExtFSBytes(t *testing.T) {
	sb := func(blocksLo, blocksHi, logBlock, incompat uint32, magic uint16) []byte {
		b := make([]byte, 1024)
		binary.LittleEndian.PutUint32(b[4:], blocksLo)
		binary.LittleEndian.PutUint32(b[24:], logBlock)
		binary.LittleEndian.PutUint16(b[56:], magic)
		binary.LittleEndian.PutUint32(b[96:], incompat)
		binary.LittleEndian.PutUint32(b[0x150:], blocksHi)
		return b
	}
	tests := []struct {
		name string
		sb   []byte
		want int64
	}{
		{"ext4 4 KiB blocks", sb(2560, 0, 2, 0, 0xEF53), 10 << 20},
		{"ext2 1 KiB blocks", sb(1000, 0, 0, 0, 0xEF53), 1000 << 10},
		{"64bit", sb(0, 1, 2, 0x80, 0xEF53), 1 << 44},
		{"high word ignored without 64bit", sb(16, 1, 2, 0, 0xEF53), 64 << 10},
		{"no magic", sb(2560, 0, 2, 0, 0), 0},
		{"absurd block size", sb(2560, 0, 30, 0, 0xEF53), 0},
		{"short", make([]byte, 100), 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := extFSBytes(tc.sb); got != tc.want {
				t.Fatalf("extFSBytes = %d, want %d", got, tc.want)
			}
		})
	}
}

// TestPair_ResizeAgreedAtConnect: two disks of different sizes agree the
// smaller at connect, and the larger node's metadata is cut to it, so a
// restart comes back at the agreed size; a disk grown later does not grow
// the device at a connect, only resize does.
func TestPair_ResizeAgreedAtConnect(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	// alpha's disk is re-created at 48 MiB.
	cfg := p.alpha.cfg
	if err := p.alpha.Stop(); err != nil {
		t.Fatal(err)
	}
	p.grow(48<<20, 0)
	host, _ := cfg.Host("alpha")
	dev, err := OpenMetaDevice(host, true)
	if err != nil {
		t.Fatal(err)
	}
	err = metadisk.Create(dev.File, dev.Layout, "alpha", "r0", true, metadisk.Options{})
	dev.Close()
	if err != nil {
		t.Fatal(err)
	}
	restart := func() {
		t.Helper()
		if err := p.alpha.Stop(); err != nil {
			t.Fatal(err)
		}
		r, err := New(Options{Config: cfg, Node: "alpha", Logger: slog.New(slog.NewTextHandler(p.logs[0], nil))})
		if err != nil {
			t.Fatal(err)
		}
		p.alpha = r
		if err := r.Attach(); err != nil {
			t.Fatal(err)
		}
	}
	restart()
	small, big := internalData(t, 32<<20), internalData(t, 48<<20)
	if p.alpha.Size() != big {
		t.Fatalf("alpha alone: %d bytes, want %d", p.alpha.Size(), big)
	}
	p.connect()
	p.connected()
	if p.alpha.Size() != small || p.alpha.md.Layout().DataSize != small {
		t.Fatalf("after the connect alpha exports %d, its metadata covers %d; want %d", p.alpha.Size(), p.alpha.md.Layout().DataSize, small)
	}
	restart()
	if p.alpha.Size() != small {
		t.Fatalf("after a restart alpha has %d bytes, want the agreed %d", p.alpha.Size(), small)
	}
	// beta's disk grows too: a connect keeps the agreed size.
	p.grow(48<<20, 1)
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.connected()
	if p.alpha.Size() != small || p.beta.Size() != small {
		t.Fatalf("a connect grew the device: alpha %d, beta %d", p.alpha.Size(), p.beta.Size())
	}
	if err := p.alpha.Primary(true); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if _, err := p.alpha.Resize(ResizeOptions{}); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if p.alpha.Size() != big || p.beta.Size() != big {
		t.Fatalf("after resize: alpha %d, beta %d, want %d", p.alpha.Size(), p.beta.Size(), big)
	}
	p.writeEnd()
	p.wait(p.alpha, "every write acked", func(s Snapshot) bool { return s.Counters.PE == 0 })
	p.same()
}

// TestResize_ExternalCapped: external metadata sized at create-md grows
// in place as far as its device describes, says so, and refuses beyond,
// telling the admin to grow the metadata device; after the device grows,
// the rest follows.
func TestResize_ExternalCapped(t *testing.T) {
	dir := t.TempDir()
	disk, meta := filepath.Join(dir, "d0"), filepath.Join(dir, "m0")
	for path, size := range map[string]int64{disk: 64 << 20, meta: metadisk.AreaSize(64 << 20)} {
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
	}
	cfg := parseRes(t, fmt.Sprintf(`resource r0 { disk %s; meta-disk %s;
  on alpha { address 127.0.0.1:7000; } on beta { address 127.0.0.2:7000; } }`, disk, meta))
	r, _ := adjustResource(t, disk, cfg)
	if err := r.Primary(true); err != nil {
		t.Fatal(err)
	}
	max := metadisk.MaxDataIn(metadisk.AreaSize(64 << 20)) // one bitmap page: 124 MiB
	if err := os.Truncate(disk, 256<<20); err != nil {
		t.Fatal(err)
	}
	msg, err := r.Resize(ResizeOptions{AssumePeerHasSpace: true})
	if err != nil || r.Size() != max || !strings.Contains(msg, "grow the metadata device to go further") {
		t.Fatalf("resize: %q, %v; size %d, want %d", msg, err, r.Size(), max)
	}
	_, err = r.Resize(ResizeOptions{Size: 200 << 20, AssumePeerHasSpace: true})
	if !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "grow the metadata device") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("resize past the metadata device: %v", err)
	}
	if err := os.Truncate(meta, metadisk.AreaSize(256<<20)); err != nil {
		t.Fatal(err)
	}
	msg, err = r.Resize(ResizeOptions{AssumePeerHasSpace: true, AssumeClean: true})
	if err != nil || r.Size() != 256<<20 {
		t.Fatalf("after the metadata device grew: %v, size %d", err, r.Size())
	}
	// Disconnected, --assume-clean spares no resync at the connect.
	if !strings.Contains(msg, "is resynced there") || strings.Contains(msg, "no resync") {
		t.Fatalf("disconnected --assume-clean resize says %q", msg)
	}
}

// TestPair_ResizeShrinkDisconnected: a Primary shrinks while its peer is
// disconnected; at the connect the peer, whose disk holds data up to the
// larger size it agreed before, refuses to be cut ("The peer's disk size
// is too small!", as DRBD's receive_sizes); invalidated, it connects, cuts
// its metadata to the Primary's size and is resynced.
func TestPair_ResizeShrinkDisconnected(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	p.primaryInSync()
	if err := p.beta.Disconnect(); err != nil {
		t.Fatal(err)
	}
	p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
	old := p.beta.Size()
	const size = 24 << 20
	if _, err := p.alpha.Resize(ResizeOptions{Size: size, AllowShrink: true, AssumePeerHasSpace: true}); err != nil {
		t.Fatal(err)
	}
	p.writeEnd()
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.wait(p.beta, "StandAlone", func(s Snapshot) bool { return s.Conn == StandAlone })
	if !strings.Contains(p.logs[1].String(), "The peer's disk size is too small!") {
		t.Fatal("beta did not say why it refused the peer")
	}
	if p.beta.Size() != old || p.beta.md.Layout().DataSize != old {
		t.Fatalf("the refused connect changed beta: %d bytes, metadata %d, want %d", p.beta.Size(), p.beta.md.Layout().DataSize, old)
	}
	if err := p.beta.Invalidate(true); err != nil {
		t.Fatal(err)
	}
	if err := p.beta.Connect(false); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if p.alpha.Size() != size || p.beta.Size() != size || p.beta.md.Layout().DataSize != size {
		t.Fatalf("after the connect: alpha %d, beta %d (metadata %d), want %d", p.alpha.Size(), p.beta.Size(), p.beta.md.Layout().DataSize, size)
	}
	p.same()
}

// TestPair_ResizeConnectKeepsData: a node that holds data beyond the size a
// connect would agree refuses the connection whatever its role, and a
// connect that the handshake refuses (split brain) leaves both nodes'
// sizes and metadata as they were.
func TestPair_ResizeConnectKeepsData(t *testing.T) {
	tests := []struct {
		name       string
		splitBrain bool // beta's disk grows too, and beta writes while alone
	}{{"demoted node, smaller peer", false}, {"split brain", true}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
			p.primaryInSync()
			old := p.alpha.Size()
			if err := p.beta.Disconnect(); err != nil {
				t.Fatal(err)
			}
			p.wait(p.alpha, "WFConnection", func(s Snapshot) bool { return s.Conn == WFConnection })
			p.grow(48<<20, 0)
			if tc.splitBrain {
				p.grow(48<<20, 1)
			}
			if _, err := p.alpha.Resize(ResizeOptions{AssumePeerHasSpace: true}); err != nil {
				t.Fatal(err)
			}
			big := internalData(t, 48<<20)
			p.writeEnd() // past the old end
			if err := p.alpha.Secondary(); err != nil {
				t.Fatal(err)
			}
			if tc.splitBrain {
				if err := p.beta.Primary(false); err != nil {
					t.Fatal(err)
				}
				if err := p.beta.WriteAt(make([]byte, 4096), 0, true); err != nil {
					t.Fatal(err)
				}
				if err := p.beta.Secondary(); err != nil {
					t.Fatal(err)
				}
			}
			if err := p.beta.Connect(false); err != nil {
				t.Fatal(err)
			}
			refuser, text := p.alpha, "The peer's disk size is too small!"
			if tc.splitBrain {
				refuser, text = p.beta, "Split-Brain detected but unresolved"
			}
			p.wait(refuser, "StandAlone", func(s Snapshot) bool { return s.Conn == StandAlone })
			if !strings.Contains(p.logs[0].String()+p.logs[1].String(), text) {
				t.Fatalf("no node logged %q", text)
			}
			if p.alpha.Size() != big || p.alpha.md.Layout().DataSize != big {
				t.Fatalf("alpha: %d bytes, metadata %d; want %d", p.alpha.Size(), p.alpha.md.Layout().DataSize, big)
			}
			if p.beta.Size() != old || p.beta.md.Layout().DataSize != old {
				t.Fatalf("beta: %d bytes, metadata %d; want %d", p.beta.Size(), p.beta.md.Layout().DataSize, old)
			}
		})
	}
}

// TestPair_ResizeAssumeCleanPeerMarked: with --assume-clean, a peer whose
// internal metadata moved marks its old area (now data, holding its old
// metadata) and says so; the Primary, whose external metadata marked
// nothing, resyncs those blocks anyway, and the disks end equal.
func TestPair_ResizeAssumeCleanPeerMarked(t *testing.T) {
	md := filepath.Join(t.TempDir(), "md")
	if err := os.WriteFile(md, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(md, metadisk.AreaSize(64<<20)); err != nil {
		t.Fatal(err)
	}
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }", md)
	p.primaryInSync()
	old := p.alpha.Size()
	p.grow(48<<20, 0, 1)
	sent := p.alpha.Snapshot().ResyncBytes
	msg, err := p.alpha.Resize(ResizeOptions{AssumeClean: true})
	if err != nil {
		t.Fatal(err)
	}
	want := internalData(t, 48<<20) // beta's disk is the smaller
	if p.alpha.Size() != want || p.beta.Size() != want || !strings.Contains(msg, "being synced") {
		t.Fatalf("%q: alpha %d, beta %d, want %d", msg, p.alpha.Size(), p.beta.Size(), want)
	}
	p.inSync()
	if synced := p.alpha.Snapshot().ResyncBytes - sent; synced == 0 || synced >= uint64(want-old)/2 {
		t.Fatalf("%d bytes resynced; want beta's old metadata area only", synced)
	}
	p.same()
}

// TestPair_ResizeGrowAtConnectResyncs: a Primary peer was resized alone,
// with the same generation as this node (the handshake's generations say
// no resync): this node, whose disk holds the size, grows at the connect
// and marks its new area after its bitmap count went out; it still
// becomes SyncTarget of the node ahead, so no marked block is left
// behind in Connected.
func TestPair_ResizeGrowAtConnectResyncs(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	if err := p.alpha.NewCurrentUUID(true); err != nil {
		t.Fatal(err)
	}
	p.alpha.md.UpdateSuperblock(func(sb *metadisk.Superblock) {
		sb.Flags |= metadisk.FlagConsistent | metadisk.FlagWasUpToDate
	})
	if err := p.alpha.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := p.alpha.Attach(); err != nil {
		t.Fatal(err)
	}
	old := p.alpha.Size()
	p.grow(48<<20, 0)
	big := internalData(t, 48<<20)
	if err := p.alpha.Connect(false); err != nil {
		t.Fatal(err)
	}
	handshakeFake(t, p, wire.Params{DiskSize: uint64(big), Size: uint64(big), Protocol: 'C', MaxEpoch: 2048},
		wire.State{Role: uint8(RolePrimary), Disk: uint8(UpToDate)})
	p.wait(p.alpha, "grown and past the handshake", func(s Snapshot) bool {
		return s.SizeBytes == big && s.Conn > WFReportParams
	})
	st := p.alpha.Snapshot()
	if st.Conn == Connected || st.OutOfSyncBytes < uint64(big-old) {
		t.Fatalf("alpha grew from %d to %d bytes: %s with %d bytes marked; want a resync of the new area", old, big, st.Conn, st.OutOfSyncBytes)
	}
	if st.Conn != WFBitMapT {
		t.Fatalf("alpha is %s, want WFBitMapT (SyncTarget of the node ahead)", st.Conn)
	}
}

// TestAgreeSizes: the handshake's size decision: a node holding data is
// never cut at a connect, whatever its role; an Inconsistent one is; a
// node behind grows and is resynced; a peer on protocol 3, which takes the
// smaller disk, is refused when the sizes would differ.
func TestAgreeSizes(t *testing.T) {
	const m = 1 << 20
	params := func(disk, size uint64) wire.Params { return wire.Params{DiskSize: disk, Size: size} }
	tests := []struct {
		name           string
		role, peerRole Role
		disk           DiskState
		cur            int64
		version        uint16
		mine, theirs   wire.Params
		want           sizePlan
		refused        string // a part of the refusal, "" if accepted
	}{
		{"equal", RoleSecondary, RoleSecondary, UpToDate, 32 * m, 4, params(32*m, 32*m), params(32*m, 32*m), sizePlan{size: 32 * m}, ""},
		{"demoted node ahead, smaller peer", RoleSecondary, RoleSecondary, UpToDate, 48 * m, 4, params(48*m, 48*m), params(32*m, 32*m), sizePlan{}, "The peer's disk size is too small!"},
		{"Outdated node ahead of a shrunk Primary", RoleSecondary, RolePrimary, Outdated, 32 * m, 4, params(32*m, 32*m), params(32*m, 24*m), sizePlan{}, "The peer's disk size is too small!"},
		{"Inconsistent node is cut", RoleSecondary, RolePrimary, Inconsistent, 32 * m, 4, params(32*m, 32*m), params(32*m, 24*m), sizePlan{size: 24 * m, meta: true}, ""},
		{"Primary ahead of a small peer", RolePrimary, RoleSecondary, UpToDate, 48 * m, 4, params(48*m, 48*m), params(32*m, 32*m), sizePlan{}, "this Primary exports"},
		{"node behind grows, is resync target", RoleSecondary, RolePrimary, UpToDate, 32 * m, 4, params(48*m, 32*m), params(48*m, 48*m), sizePlan{size: 48 * m, meta: true, grow: true, resync: -1}, ""},
		{"node ahead is resync source", RolePrimary, RoleSecondary, UpToDate, 48 * m, 4, params(48*m, 48*m), params(48*m, 32*m), sizePlan{size: 48 * m, resync: 1}, ""},
		{"fresh peer grows no node with data", RoleSecondary, RoleSecondary, UpToDate, 32 * m, 4, params(48*m, 32*m), params(48*m, 48*m), sizePlan{size: 32 * m}, ""},
		{"fresh node takes the size of the peer's data", RoleSecondary, RoleSecondary, Inconsistent, 48 * m, 4, params(48*m, 48*m), params(48*m, 32*m), sizePlan{size: 32 * m, meta: true}, ""},
		{"protocol 3 peer, equal", RoleSecondary, RoleSecondary, UpToDate, 32 * m, 3, params(32*m, 32*m), params(32*m, 32*m), sizePlan{size: 32 * m}, ""},
		{"protocol 3 peer after a shrink", RolePrimary, RoleSecondary, UpToDate, 24 * m, 3, params(32*m, 24*m), params(32*m, 32*m), sizePlan{}, "peer protocol 3"},
		{"protocol 3 peer, this node behind", RoleSecondary, RoleSecondary, UpToDate, 32 * m, 3, params(48*m, 32*m), params(48*m, 48*m), sizePlan{}, "peer protocol 3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			peerDisk := UpToDate
			if strings.HasPrefix(tc.name, "fresh peer") {
				peerDisk = Inconsistent
			}
			got, err := agreeSizes(sizeInput{role: tc.role, peerRole: tc.peerRole, disk: tc.disk, peerDisk: peerDisk, cur: tc.cur, has: tc.cur,
				version: tc.version, mine: tc.mine, theirs: tc.theirs})
			switch {
			case tc.refused != "" && (err == nil || !strings.Contains(err.Error(), tc.refused)):
				t.Fatalf("got %+v, %v; want a refusal saying %q", got, err, tc.refused)
			case tc.refused == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.refused == "" && got != tc.want:
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestPair_ResizeHoldsHandshakes: a connected resize holds back any new
// session's handshake for its whole course (while it waits for the peer's
// answers too), so that no handshake agrees a size while it changes.
func TestPair_ResizeHoldsHandshakes(t *testing.T) {
	p, f := connectFake(t, wire.State{Role: uint8(RoleSecondary), Disk: uint8(UpToDate)})
	if err := p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	const size = 16 << 20
	type result struct {
		msg string
		err error
	}
	done := make(chan result, 1)
	go func() {
		msg, err := p.alpha.Resize(ResizeOptions{Size: size, AllowShrink: true})
		done <- result{msg, err}
	}()
	next := func(kind uint8) wire.Sizes {
		t.Helper()
		for {
			m, ok := f.recv(t, transport.Data).(wire.Sizes)
			if ok {
				if m.Kind != kind {
					t.Fatalf("resize message of kind %d, want %d", m.Kind, kind)
				}
				return m
			}
		}
	}
	held := func() bool {
		p.alpha.mu.Lock()
		defer p.alpha.mu.Unlock()
		return p.alpha.promoting
	}
	q := next(wire.SizesQuery)
	if !held() {
		t.Fatal("handshakes not held while the peer is asked for its size")
	}
	f.send(t, wire.Sizes{Kind: wire.SizesReply, Disk: q.Size, Size: q.Size})
	set := next(wire.SizesSet)
	if !held() {
		t.Fatal("handshakes not held while the peer resizes")
	}
	f.send(t, wire.Sizes{Kind: wire.SizesDone, Size: set.Size})
	r := <-done
	if r.err != nil || p.alpha.Size() != size {
		t.Fatalf("resize: %q, %v; %d bytes", r.msg, r.err, p.alpha.Size())
	}
	if held() {
		t.Fatal("handshakes still held after the resize")
	}
}

// TestPair_ResizePeerBusy: the Secondary applies a resize only when no
// administrative command runs there: while one does, the Primary's resize
// is refused (retry), nothing changes on either node, and a retry works.
func TestPair_ResizePeerBusy(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	p.primaryInSync()
	old := p.alpha.Size()
	p.grow(48<<20, 0, 1)
	p.beta.admin.Lock()
	_, err := p.alpha.Resize(ResizeOptions{})
	p.beta.admin.Unlock()
	if err == nil || !strings.Contains(err.Error(), "retry") {
		t.Fatalf("resize while the peer is busy: %v", err)
	}
	if p.alpha.Size() != old || p.beta.Size() != old || p.beta.md.Layout().DataSize != old {
		t.Fatalf("a refused resize changed sizes: alpha %d, beta %d (metadata %d)", p.alpha.Size(), p.beta.Size(), p.beta.md.Layout().DataSize)
	}
	if !strings.Contains(p.logs[1].String(), "an administrative command is running") {
		t.Fatal("beta did not log why it refused")
	}
	if _, err := p.alpha.Resize(ResizeOptions{}); err != nil {
		t.Fatal(err)
	}
	p.inSync()
	if want := internalData(t, 48<<20); p.beta.Size() != want {
		t.Fatalf("beta %d bytes, want %d", p.beta.Size(), want)
	}
}

// TestPair_ResizeShrinkBounds: after a shrink, application requests past
// the new end fail as the NBD server fails them (a read with EINVAL, a
// write, trim or zeroing with ENOSPC), checked once admitted, so also for
// requests that waited while the size changed; the old data area past the
// end (and the metadata there) is never read.
func TestPair_ResizeShrinkBounds(t *testing.T) {
	p := newPair(t, "net { protocol C; } disk { c-plan-ahead 0; resync-rate 1G; }")
	p.primaryInSync()
	const size = 24 << 20
	if _, err := p.alpha.Resize(ResizeOptions{Size: size, AllowShrink: true}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	if _, err := p.alpha.ReadAt(buf, size-4096); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read across the new end: %v, want EINVAL", err)
	}
	if _, err := p.alpha.ReadAt(buf[:4096], size); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past the new end: %v, want EINVAL", err)
	}
	if _, err := p.alpha.ReadAt(buf, size-8192); err != nil {
		t.Fatalf("read before the end: %v", err)
	}
	for name, err := range map[string]error{
		"write":  p.alpha.WriteAt(buf, size-4096, false),
		"trim":   p.alpha.Trim(size, 4096, false),
		"zeroes": p.alpha.WriteZeroes(size-4096, 8192, false, false),
	} {
		if !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("%s past the new end: %v, want ENOSPC", name, err)
		}
	}
	if err := p.alpha.WriteAt(buf, size-8192, true); err != nil {
		t.Fatalf("write before the end: %v", err)
	}
}

// TestPair_ResizeSessionLostMidway: the session ends after the peer
// resized (its SizesDone arrives as the session is ending): this node's
// metadata is left as it was and the resize says what happened and what
// to do, instead of resizing for a session that is gone.
func TestPair_ResizeSessionLostMidway(t *testing.T) {
	p, f := connectFake(t, wire.State{Role: uint8(RoleSecondary), Disk: uint8(UpToDate)})
	if err := p.alpha.Primary(false); err != nil {
		t.Fatal(err)
	}
	old := p.alpha.Size()
	const size = 16 << 20
	done := make(chan error, 1)
	go func() {
		_, err := p.alpha.Resize(ResizeOptions{Size: size, AllowShrink: true})
		done <- err
	}()
	next := func(kind uint8) wire.Sizes {
		t.Helper()
		for {
			if m, ok := f.recv(t, transport.Data).(wire.Sizes); ok && m.Kind == kind {
				return m
			}
		}
	}
	q := next(wire.SizesQuery)
	f.send(t, wire.Sizes{Kind: wire.SizesReply, Disk: q.Size, Size: q.Size})
	set := next(wire.SizesSet)
	// The session ends (as end() begins it) before the answer is read.
	p.alpha.mu.Lock()
	p.alpha.p.ending = true
	p.alpha.mu.Unlock()
	f.send(t, wire.Sizes{Kind: wire.SizesDone, Size: set.Size})
	err := <-done
	if !errors.Is(err, ErrResize) || !strings.Contains(err.Error(), "the connection was lost after the peer resized") ||
		!strings.Contains(err.Error(), "run resize again") {
		t.Fatalf("resize: %v", err)
	}
	if p.alpha.Size() != old || p.alpha.md.Layout().DataSize != old {
		t.Fatalf("alpha: %d bytes, metadata %d; want %d", p.alpha.Size(), p.alpha.md.Layout().DataSize, old)
	}
	f.s.Close("test: gone")
	p.wait(p.alpha, "connection lost", func(s Snapshot) bool { return s.Conn != Connected })
}
