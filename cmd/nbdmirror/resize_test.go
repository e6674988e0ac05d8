package main

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  string
	}{
		{"10G", 10 << 30, ""},
		{"48m", 48 << 20, ""},
		{"8s", 4096, ""},
		{"1T", 1 << 40, ""},
		{"4K", 4096, ""},
		{"4096", 0, "has no unit"},
		{"1s", 0, "not a multiple of 4 KiB"},
		{"-1G", 0, "positive whole number"},
		{"G", 0, "positive whole number"},
		{"99999999999T", 0, "positive whole number"},
		{"", 0, "empty"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseSize(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseSize(%q) = %d, %v; want an error saying %q", tc.in, got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
		})
	}
}

// TestResizeUsage: bad resize flags are refused before the daemon is asked.
func TestResizeUsage(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"resize", "--size", "10", "r0"}, "nbdmirror resize: --size \"10\" has no unit"},
		{[]string{"resize", "--allow-shrink", "r0"}, "nbdmirror resize: --allow-shrink needs --size"},
		{[]string{"resize"}, "nbdmirror resize: expected one resource name or all"},
	} {
		code, _, errOut := runMain(t, append([]string{"--run-dir", dir}, tc.args...)...)
		if code != ExitUsage || !strings.HasPrefix(errOut, tc.want) || strings.Count(errOut, "\n") != 1 {
			t.Errorf("%v: exit %d, %q; want %d and %q", tc.args, code, errOut, ExitUsage, tc.want)
		}
	}
}
