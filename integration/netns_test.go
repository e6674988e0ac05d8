//go:build integration

package integration

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// hosts is two network namespaces joined by a veth pair: "host" A at
// 10.77.x.1 and B at 10.77.x.2. Faults are injected with nft and tc inside
// B or A. Everything is removed when the test ends.
type hosts struct {
	t        *testing.T
	nsA, nsB string
	devA     string
	ipA, ipB string
}

func newHosts(t *testing.T) *hosts {
	t.Helper()
	needRoot(t)
	need(t, "ip", "nft", "tc", "ss")
	var b [3]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	subnet := 1 + int(b[0])%250
	h := &hosts{t: t, nsA: "nbmA" + id, nsB: "nbmB" + id, devA: "vA" + id, ipA: fmt.Sprintf("10.77.%d.1", subnet),
		ipB: fmt.Sprintf("10.77.%d.2", subnet)}
	devB := "vB" + id
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", h.nsA).Run()
		exec.Command("ip", "netns", "del", h.nsB).Run()
	})
	for _, cmd := range [][]string{
		{"ip", "netns", "add", h.nsA},
		{"ip", "netns", "add", h.nsB},
		{"ip", "link", "add", h.devA, "type", "veth", "peer", "name", devB},
		{"ip", "link", "set", h.devA, "netns", h.nsA},
		{"ip", "link", "set", devB, "netns", h.nsB},
		{"ip", "-n", h.nsA, "addr", "add", h.ipA + "/24", "dev", h.devA},
		{"ip", "-n", h.nsB, "addr", "add", h.ipB + "/24", "dev", devB},
		{"ip", "-n", h.nsA, "link", "set", "lo", "up"},
		{"ip", "-n", h.nsB, "link", "set", "lo", "up"},
		{"ip", "-n", h.nsA, "link", "set", h.devA, "up"},
		{"ip", "-n", h.nsB, "link", "set", devB, "up"},
	} {
		run(t, time.Minute, cmd[0], cmd[1:]...)
	}
	return h
}

// in runs a command inside a namespace.
func (h *hosts) in(ns string, args ...string) string {
	h.t.Helper()
	return run(h.t, time.Minute, "ip", append([]string{"netns", "exec", ns}, args...)...)
}

// nft loads an nft ruleset (table inet chaos) into a namespace.
func (h *hosts) nft(ns, rules string) {
	h.t.Helper()
	h.in(ns, "nft", "add table inet chaos")
	for _, r := range strings.Split(strings.TrimSpace(rules), "\n") {
		h.in(ns, "nft", strings.TrimSpace(r))
	}
}

// heal removes the nft table from a namespace.
func (h *hosts) heal(ns string) {
	h.t.Helper()
	h.in(ns, "nft", "delete table inet chaos")
}
