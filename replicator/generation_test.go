package replicator

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// u builds UUIDs: current, bitmap, history 1, history 2.
func u(c, b, h1, h2 uint64) UUIDs { return UUIDs{Current: c, Bitmap: b, History: [2]uint64{h1, h2}} }

func gen(x UUIDs) Generation { return Generation{UUIDs: x} }

// TestCompareGenerations: every rule of drbd_uuid_compare(), in order,
// with the verdict and rule DRBD logs, and the corrections.
func TestCompareGenerations(t *testing.T) {
	const (
		A, B, C, D, E = 0xA0, 0xB0, 0xC0, 0xD0, 0xE0
		off           = uint64(1) << 48
	)
	crashed := func(g Generation) Generation { g.CrashedPrimary = true; return g }
	tests := []struct {
		name                 string
		self, peer           Generation
		selfRole, peerRole   Role
		resolve              bool
		verdict              Verdict
		rule                 int
		wantSelf, wantPeer   *UUIDs // after corrections, when they change
		correctionMentioning string
	}{
		{"both just created", gen(u(4, 0, 0, 0)), gen(u(4, 0, 0, 0)), RoleSecondary, RoleSecondary, false, VerdictNoSync, 10, nil, nil, ""},
		{"I am new", gen(u(4, 0, 0, 0)), gen(u(A, 4, 0, 0)), RoleSecondary, RolePrimary, false, VerdictTargetFull, 20, nil, nil, ""},
		{"I have no UUID", gen(u(0, 0, 0, 0)), gen(u(A, 0, 0, 0)), RoleSecondary, RoleSecondary, false, VerdictTargetFull, 20, nil, nil, ""},
		{"the peer is new", gen(u(A|1, 4, 0, 0)), gen(u(4, 0, 0, 0)), RolePrimary, RoleSecondary, false, VerdictSourceFull, 30, nil, nil, ""},
		{"source missed the finish", gen(u(A, B, C, 0)), gen(u(A, 0, B, C)), RoleSecondary, RoleSecondary, false, VerdictSource, 34,
			&UUIDs{Current: A, History: [2]uint64{B, C}}, nil, "missed the resync finished event, corrected myself"},
		{"peer failed to write the sync UUID", gen(u(A, B, C, 0)), gen(u(A, 0, D, E)), RoleSecondary, RoleSecondary, false, VerdictSource, 36, nil, nil, "peer failed to write sync_uuid"},
		{"peer missed the finish", gen(u(A, 0, B, C)), gen(u(A, B, C, 0)), RoleSecondary, RoleSecondary, false, VerdictTarget, 35,
			nil, &UUIDs{Current: A, History: [2]uint64{B, C}}, "peer missed the resync finished event, corrected peer"},
		{"I failed to write the sync UUID", gen(u(A, 0, D, E)), gen(u(A, B, C, 0)), RoleSecondary, RoleSecondary, false, VerdictTarget, 37, nil, nil, "failed to write sync_uuid"},
		{"link hiccup", gen(u(A|1, 0, B, 0)), gen(u(A, 0, B, 0)), RolePrimary, RoleSecondary, false, VerdictNoSync, 40, nil, nil, ""},
		{"role bit ignored", gen(u(A|1, B|1, C, 0)), gen(u(A, B, C, 0)), RolePrimary, RoleSecondary, false, VerdictNoSync, 40, nil, nil, ""},
		{"crashed, I am Primary now", crashed(gen(u(A, 0, B, 0))), gen(u(A, 0, B, 0)), RolePrimary, RoleSecondary, false, VerdictSource, 41, nil, nil, ""},
		{"crashed, the peer is Primary now", crashed(gen(u(A, 0, B, 0))), gen(u(A, 0, B, 0)), RoleSecondary, RolePrimary, false, VerdictTarget, 41, nil, nil, ""},
		{"crashed, both Primary", crashed(gen(u(A, 0, B, 0))), gen(u(A, 0, B, 0)), RolePrimary, RolePrimary, false, VerdictSplitBrainDisconnect, 41, nil, nil, ""},
		{"I crashed as Primary", crashed(gen(u(A, 0, B, 0))), gen(u(A, 0, B, 0)), RoleSecondary, RoleSecondary, false, VerdictSource, 40, nil, nil, ""},
		{"the peer crashed as Primary", gen(u(A, 0, B, 0)), crashed(gen(u(A, 0, B, 0))), RoleSecondary, RoleSecondary, false, VerdictTarget, 40, nil, nil, ""},
		{"both crashed, I resolve conflicts", crashed(gen(u(A, 0, 0, 0))), crashed(gen(u(A, 0, 0, 0))), RoleSecondary, RoleSecondary, true, VerdictTarget, 40, nil, nil, ""},
		{"both crashed, the peer resolves", crashed(gen(u(A, 0, 0, 0))), crashed(gen(u(A, 0, 0, 0))), RoleSecondary, RoleSecondary, false, VerdictSource, 40, nil, nil, ""},
		{"the peer moved on from my generation", gen(u(A, 0, B, 0)), gen(u(C|1, A|1, B, 0)), RoleSecondary, RolePrimary, false, VerdictTarget, 50, nil, nil, ""},
		{"the peer's sync UUID never arrived", gen(u(A, 0, B, 0)), gen(u(C, A+off, A, B)), RoleSecondary, RoleSecondary, false, VerdictTarget, 51,
			nil, &UUIDs{Current: C, Bitmap: A, History: [2]uint64{B, B}}, "Lost last syncUUID packet"},
		{"I am the peer's ancestor", gen(u(A, 0, 0, 0)), gen(u(C, D, B, A)), RoleSecondary, RoleSecondary, false, VerdictTargetFull, 60, nil, nil, ""},
		{"my generation in the peer's newest history, no sync UUID", gen(u(A, 0, B, 0)), gen(u(C, D, A, B)), RoleSecondary, RoleSecondary, false, VerdictTargetFull, 60, nil, nil, ""},
		{"I moved on from the peer's generation", gen(u(C|1, A|1, B, 0)), gen(u(A, 0, B, 0)), RolePrimary, RoleSecondary, false, VerdictSource, 70, nil, nil, ""},
		{"my sync UUID never got through", gen(u(C, A+off, A, B)), gen(u(A, 0, B, 0)), RoleSecondary, RoleSecondary, false, VerdictSource, 71,
			&UUIDs{Current: C, Bitmap: A, History: [2]uint64{B, B}}, nil, "Last syncUUID did not get through"},
		{"the peer is my ancestor", gen(u(C, D, B, A)), gen(u(A, 0, 0, 0)), RoleSecondary, RoleSecondary, false, VerdictSourceFull, 80, nil, nil, ""},
		{"split brain from a common bitmap UUID", gen(u(C, A, B, 0)), gen(u(D, A|1, B, 0)), RoleSecondary, RoleSecondary, false, VerdictSplitBrainAuto, 90, nil, nil, ""},
		{"split brain from an older ancestor", gen(u(C, D, B, 0)), gen(u(E, A, 0x70, B)), RoleSecondary, RoleSecondary, false, VerdictSplitBrainDisconnect, 100, nil, nil, ""},
		{"unrelated", gen(u(C, 0, 0, 0)), gen(u(D, 0, 0, 0)), RoleSecondary, RoleSecondary, false, VerdictUnrelated, 0, nil, nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := CompareGenerations(tc.self, tc.peer, tc.selfRole, tc.peerRole, tc.resolve)
			if c.Verdict != tc.verdict || c.Rule != tc.rule {
				t.Fatalf("uuid_compare()=%d by rule %d, want %d by rule %d", c.Verdict, c.Rule, tc.verdict, tc.rule)
			}
			wantSelf, wantPeer := tc.self.UUIDs, tc.peer.UUIDs
			if tc.wantSelf != nil {
				wantSelf = *tc.wantSelf
			}
			if tc.wantPeer != nil {
				wantPeer = *tc.wantPeer
			}
			if c.Self != wantSelf || c.Peer != wantPeer {
				t.Errorf("after the comparison self %+v peer %+v, want %+v, %+v", c.Self, c.Peer, wantSelf, wantPeer)
			}
			if !strings.Contains(c.Correction, tc.correctionMentioning) || (tc.correctionMentioning == "") != (c.Correction == "") {
				t.Errorf("correction %q, want one mentioning %q", c.Correction, tc.correctionMentioning)
			}
			// The mirror image: the peer, comparing the other way, reaches
			// the opposite verdict (the two nodes must agree on a
			// direction), except where the tie-break flag differs.
			m := CompareGenerations(tc.peer, tc.self, tc.peerRole, tc.selfRole, !tc.resolve)
			want := -tc.verdict
			if tc.verdict == VerdictUnrelated || tc.verdict == VerdictSplitBrainDisconnect || tc.verdict == VerdictSplitBrainAuto {
				want = tc.verdict
			}
			if m.Verdict != want {
				t.Errorf("the peer's view: %d by rule %d, want %d", m.Verdict, m.Rule, want)
			}
		})
	}
}

// TestDecide: the connect-time decision after the comparison: disk
// states, split-brain policies, manual resolution, refusals and logs.
func TestDecide(t *testing.T) {
	const A, B, C, D = 0xA0, 0xB0, 0xC0, 0xD0
	split := func(selfBits, peerBits uint64) (Generation, Generation) {
		s, p := gen(u(C, A, B, 0)), gen(u(D, A, B, 0))
		s.Bits, p.Bits = selfBits, peerBits
		return s, p
	}
	base := func(self, peer Generation) Peering {
		return Peering{Self: self, Peer: peer, SelfRole: RoleSecondary, PeerRole: RoleSecondary,
			SelfDisk: UpToDate, PeerDisk: UpToDate, Policies: Policies{"disconnect", "disconnect", "disconnect", "disconnect"}}
	}
	tests := []struct {
		name     string
		in       func() Peering
		conn     ConnState
		full     bool
		err      error
		log      string
		handlers []string
	}{
		{"in sync", func() Peering { return base(gen(u(A, 0, B, 0)), gen(u(A, 0, B, 0))) }, Connected, false, nil, "uuid_compare()=0 by rule 40", nil},
		{"bitmap resync as source", func() Peering {
			in := base(gen(u(C|1, A|1, B, 0)), gen(u(A, 0, B, 0)))
			in.SelfRole = RolePrimary
			return in
		}, WFBitMapS, false, nil, "uuid_compare()=1 by rule 70", nil},
		{"initial full sync from a forced Primary", func() Peering {
			in := base(gen(u(C|1, 4, 0, 0)), gen(u(4, 0, 0, 0)))
			in.SelfRole, in.PeerDisk = RolePrimary, Inconsistent
			return in
		}, WFBitMapS, true, nil, "Writing the whole bitmap, full sync required after drbd_sync_handshake.", nil},
		{"unrelated", func() Peering { return base(gen(u(C, 0, 0, 0)), gen(u(D, 0, 0, 0))) }, StandAlone, false, ErrUnrelatedData, "Unrelated data, aborting!", nil},
		{"disk states override: I am Inconsistent", func() Peering {
			in := base(gen(u(A, 0, B, 0)), gen(u(A, 0, B, 0)))
			in.SelfDisk = Inconsistent
			return in
		}, WFBitMapT, false, nil, "Becoming sync target due to disk states.", nil},
		{"split brain, default policies", func() Peering { s, p := split(5, 9); return base(s, p) }, StandAlone, false, ErrSplitBrain,
			"Split-Brain detected but unresolved, dropping connection!", []string{"initial-split-brain", "split-brain"}},
		{"split brain, I discard my data", func() Peering {
			s, p := split(5, 9)
			s.DiscardMyData = true
			return base(s, p)
		}, WFBitMapT, false, nil, "Split-Brain detected, manually solved. Sync from peer node", []string{"initial-split-brain"}},
		{"split brain, the peer discards its data", func() Peering {
			s, p := split(5, 9)
			p.DiscardMyData = true
			return base(s, p)
		}, WFBitMapS, false, nil, "Split-Brain detected, manually solved. Sync from this node", []string{"initial-split-brain"}},
		{"split brain from an older ancestor, I discard my data", func() Peering {
			s, p := gen(u(C, D, B, 0)), gen(u(0xE0, A, 0x70, B))
			s.DiscardMyData = true
			return base(s, p)
		}, WFBitMapT, false, nil, "uuid_compare()=-100 by rule 100", []string{"initial-split-brain"}},
		{"discard-zero-changes: I changed nothing", func() Peering {
			s, p := split(0, 9)
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-zero-changes"
			return in
		}, WFBitMapT, false, nil, "Split-Brain detected, 0 primaries, automatically solved. Sync from peer node", []string{"initial-split-brain"}},
		{"discard-zero-changes: both changed", func() Peering {
			s, p := split(3, 9)
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-zero-changes"
			return in
		}, StandAlone, false, ErrSplitBrain, "Split-Brain detected but unresolved", []string{"initial-split-brain", "split-brain"}},
		{"discard-least-changes", func() Peering {
			s, p := split(30, 9)
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-least-changes"
			return in
		}, WFBitMapS, false, nil, "automatically solved. Sync from this node", []string{"initial-split-brain"}},
		{"discard-least-changes, a tie, I resolve conflicts", func() Peering {
			s, p := split(9, 9)
			in := base(s, p)
			in.ResolveConflicts = true
			in.Policies.AfterSB0Pri = "discard-least-changes"
			return in
		}, WFBitMapT, false, nil, "Sync from peer node", []string{"initial-split-brain"}},
		{"discard-least-changes, a tie, the peer resolves conflicts", func() Peering {
			s, p := split(9, 9)
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-least-changes"
			return in
		}, WFBitMapS, false, nil, "Sync from this node", []string{"initial-split-brain"}},
		{"discard-younger-primary: the peer was Primary later", func() Peering {
			s, p := split(30, 9)
			p.UUIDs.Bitmap |= 1
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-younger-primary"
			return in
		}, WFBitMapT, false, nil, "Sync from peer node", []string{"initial-split-brain"}},
		{"discard-older-primary", func() Peering {
			s, p := split(30, 9)
			p.UUIDs.Bitmap |= 1
			in := base(s, p)
			in.Policies.AfterSB0Pri = "discard-older-primary"
			return in
		}, WFBitMapS, false, nil, "Sync from this node", []string{"initial-split-brain"}},
		{"discard-secondary with me Primary", func() Peering {
			s, p := split(3, 9)
			in := base(s, p)
			in.SelfRole = RolePrimary
			in.Policies.AfterSB1Pri = "discard-secondary"
			return in
		}, WFBitMapS, false, nil, "1 primaries, automatically solved. Sync from this node", []string{"initial-split-brain"}},
		{"consensus agrees with the Secondary losing", func() Peering {
			s, p := split(0, 9)
			in := base(s, p)
			in.PeerRole = RolePrimary
			in.Policies.AfterSB0Pri, in.Policies.AfterSB1Pri = "discard-zero-changes", "consensus"
			return in
		}, WFBitMapT, false, nil, "Sync from peer node", []string{"initial-split-brain"}},
		{"consensus refuses to discard the Primary", func() Peering {
			s, p := split(0, 9)
			in := base(s, p)
			in.SelfRole = RolePrimary
			in.Policies.AfterSB0Pri, in.Policies.AfterSB1Pri = "discard-zero-changes", "consensus"
			return in
		}, StandAlone, false, ErrSplitBrain, "Split-Brain detected but unresolved", []string{"initial-split-brain", "split-brain"}},
		{"call-pri-lost-after-sb: the Primary loses", func() Peering {
			s, p := split(0, 3)
			in := base(s, p)
			in.SelfRole = RolePrimary
			in.Policies.AfterSB0Pri, in.Policies.AfterSB1Pri = "discard-zero-changes", "call-pri-lost-after-sb"
			return in
		}, StandAlone, false, ErrTargetButPrimary, "I shall become SyncTarget, but I am primary!", []string{"initial-split-brain", "pri-lost-after-sb"}},
		{"call-pri-lost-after-sb: the Secondary loses", func() Peering {
			s, p := split(0, 3)
			in := base(s, p)
			in.PeerRole = RolePrimary
			in.Policies.AfterSB0Pri, in.Policies.AfterSB1Pri = "discard-zero-changes", "call-pri-lost-after-sb"
			return in
		}, WFBitMapT, false, nil, "1 primaries, automatically solved. Sync from peer node", []string{"initial-split-brain"}},
		{"call-pri-lost-after-sb with two Primaries", func() Peering {
			s, p := split(1, 9)
			in := base(s, p)
			in.SelfRole, in.PeerRole = RolePrimary, RolePrimary
			in.Policies.AfterSB0Pri, in.Policies.AfterSB2Pri = "discard-least-changes", "call-pri-lost-after-sb"
			return in
		}, StandAlone, false, ErrTargetButPrimary, "2 primaries, automatically solved", []string{"initial-split-brain", "pri-lost-after-sb"}},
		{"source but inconsistent", func() Peering {
			in := base(gen(u(C, A, B, 0)), gen(u(A, 0, B, 0)))
			in.SelfDisk, in.PeerDisk = Inconsistent, Inconsistent
			return in
		}, StandAlone, false, ErrSourceInconsistent, "I shall become SyncSource, but I am inconsistent!", nil},
		{"target but Primary", func() Peering {
			in := base(gen(u(A|1, 0, B, 0)), gen(u(C, A, B, 0)))
			in.SelfRole = RolePrimary
			return in
		}, StandAlone, false, ErrTargetButPrimary, "I shall become SyncTarget, but I am primary!", nil},
		{"no resync but bits set", func() Peering {
			s := gen(u(A, 0, B, 0))
			s.Bits = 7
			return base(s, gen(u(A, 0, B, 0)))
		}, Connected, false, nil, "No resync, but 7 bits in bitmap!", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := Decide(tc.in())
			if !errors.Is(err, tc.err) || h.Conn != tc.conn || h.FullSync != tc.full {
				t.Fatalf("conn %s full %v err %v; want %s %v %v\n%s", h.Conn, h.FullSync, err, tc.conn, tc.full, tc.err, strings.Join(h.Log, "\n"))
			}
			if !slices.ContainsFunc(h.Log, func(l string) bool { return strings.Contains(l, tc.log) }) {
				t.Errorf("log lacks %q:\n%s", tc.log, strings.Join(h.Log, "\n"))
			}
			if !slices.Equal(h.Handlers, tc.handlers) {
				t.Errorf("handlers %v, want %v", h.Handlers, tc.handlers)
			}
			if h.Log[0] != "drbd_sync_handshake:" || !strings.HasPrefix(h.Log[1], "self ") || !strings.HasPrefix(h.Log[2], "peer ") {
				t.Errorf("log does not start with the handshake dump:\n%s", strings.Join(h.Log, "\n"))
			}
		})
	}
}
