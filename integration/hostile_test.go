//go:build integration

package integration

import (
	binenc "encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// procRSS returns a process's resident set size in bytes.
func procRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// procFDs counts a process's open file descriptors.
func procFDs(t *testing.T, pid int) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// TestServe_HostileClients: `nbdmirror serve` as a real process, with its
// limits from the command line, under 1,000 connections stalled in
// negotiation and 8 clients flooding 1 MiB reads without reading a reply.
// Its RSS stays within what --nbd-max-in-flight allows (the flooders ask
// for 8 × 64 MiB), nbdinfo and qemu-io are served meanwhile, and once the
// hostile clients leave the process holds no more descriptors than before.
func TestServe_HostileClients(t *testing.T) {
	need(t, "nbdinfo", "qemu-io")
	img := sparseFile(t, t.TempDir(), "disk.img", 64*mib)
	p, uri := serve(t, img, "disk", "--nbd-max-conns", "1100", "--nbd-max-in-flight", "32M")
	pid := p.cmd.Process.Pid
	sock := uri[strings.Index(uri, "socket=")+len("socket="):]
	run(t, time.Minute, "nbdinfo", uri) // warm up: the first client's buffers
	baseRSS, baseFDs := procRSS(t, pid), procFDs(t, pid)

	var hostile []net.Conn
	defer func() {
		for _, c := range hostile {
			c.Close()
		}
	}()
	for range 1000 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		hostile = append(hostile, c)
		c.SetReadDeadline(time.Now().Add(time.Minute))
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatalf("greeting: %v", err)
		}
	}
	const flooders, reqLen = 8, 1 << 20
	var wg sync.WaitGroup
	var mu sync.Mutex
	sent := 0
	for f := range flooders {
		rc := dialNBD(t, sock, "disk")
		hostile = append(hostile, rc.c)
		wg.Go(func() {
			for i := range 1024 { // 1 GiB of reads asked for
				msg := binenc.BigEndian.AppendUint32(nil, 0x25609513)
				msg = binenc.BigEndian.AppendUint16(msg, 0)
				msg = binenc.BigEndian.AppendUint16(msg, 0) // READ
				msg = binenc.BigEndian.AppendUint64(msg, uint64(i))
				msg = binenc.BigEndian.AppendUint64(msg, uint64(f*reqLen))
				msg = binenc.BigEndian.AppendUint32(msg, reqLen)
				if _, err := rc.c.Write(msg); err != nil {
					return
				}
				mu.Lock()
				sent++
				mu.Unlock()
			}
		})
	}
	// The flooders are held back: what they sent stops growing (once
	// they have begun: more than the server's 32 MiB of them).
	settled := func() int {
		for prev := -1; ; {
			time.Sleep(500 * time.Millisecond)
			mu.Lock()
			n := sent
			mu.Unlock()
			if n == prev && n > 32 {
				return n
			}
			prev = n
		}
	}()
	rss, fds := procRSS(t, pid), procFDs(t, pid)
	t.Logf("1000 stalled + %d flooding clients (%d requests of 1 MiB written): RSS %d -> %d MiB, %d -> %d descriptors",
		flooders, settled, baseRSS>>20, rss>>20, baseFDs, fds)
	if settled >= flooders*1024 {
		t.Errorf("all %d flood requests were taken in: nothing held them back", settled)
	}
	// 32 MiB in flight + 256 KiB per connection + 1,000 connections, under
	// the race detector (which multiplies the heap); the flooders alone ask
	// for 8 × 64 MiB.
	if rss-baseRSS > 400<<20 {
		t.Errorf("RSS grew by %d MiB under the hostile clients, want under 400", (rss-baseRSS)>>20)
	}
	if fds < baseFDs+1000 {
		t.Errorf("%d descriptors with 1,008 clients connected (%d before)", fds, baseFDs)
	}
	start := time.Now()
	run(t, 30*time.Second, "nbdinfo", "--size", uri)
	run(t, 30*time.Second, "qemu-io", "-f", "raw", "-c", "write -P 0x61 32m 64k", "-c", "read -P 0x61 32m 64k", uri)
	took := time.Since(start)
	t.Logf("nbdinfo and qemu-io beside the hostile clients: %v", took.Round(time.Millisecond))
	if took > 20*time.Second {
		t.Errorf("well-behaved clients took %v beside the hostile ones", took)
	}

	for _, c := range hostile {
		c.Close()
	}
	hostile = nil
	wg.Wait()
	eventually(t, 20*time.Second, "descriptors back to before", func() (bool, string) {
		n := procFDs(t, pid)
		return n <= baseFDs, fmt.Sprintf("%d descriptors, %d before", n, baseFDs)
	})
	run(t, 30*time.Second, "nbdinfo", uri)
}
