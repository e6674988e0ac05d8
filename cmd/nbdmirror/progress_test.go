package main

import (
	"testing"

	"github.com/nbdmirror/nbdmirror/replicator"
)

func TestProgressLine(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    replicator.ResyncJSON
		want string
	}{
		{"starting", replicator.ResyncJSON{Percent: 0, RemainingBytes: 64 << 20, TotalBytes: 64 << 20},
			"r0 SyncTarget [>....................] 0.0% 64.0 MiB left at 0.0 MiB/s, finish ∞"},
		{"halfway", replicator.ResyncJSON{Percent: 50, RemainingBytes: 32 << 20, TotalBytes: 64 << 20,
			SpeedBytesPerSecond: 8 << 20, ETASeconds: 4},
			"r0 SyncTarget [==========>..........] 50.0% 32.0 MiB left at 8.0 MiB/s, finish 0:00:04"},
		{"long", replicator.ResyncJSON{Percent: 99.9, RemainingBytes: 1 << 20, TotalBytes: 1 << 40,
			SpeedBytesPerSecond: 1, ETASeconds: 3*3600 + 61},
			"r0 SyncTarget [===================>.] 99.9% 1.0 MiB left at 0.0 MiB/s, finish 3:01:01"},
		{"done", replicator.ResyncJSON{Percent: 100, SpeedBytesPerSecond: 1},
			"r0 SyncTarget [====================>] 100.0% 0.0 MiB left at 0.0 MiB/s, finish 0:00:00"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.r
			got := progressLine(replicator.StatusJSON{Name: "r0", CState: "SyncTarget", Resync: &r})
			if got != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}
