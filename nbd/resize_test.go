package nbd

import (
	"bytes"
	"testing"
)

// TestExportResize: a backend whose size changes (an online resize): a
// client that connects afterwards is told the new size; a client connected
// before keeps the size it was told, but its requests are checked against
// the size now: after a grow it may use the new area, after a shrink a
// write past the new end fails with ENOSPC and a read with EINVAL, and the
// backend never sees a request past its end.
func TestExportResize(t *testing.T) {
	be := newMem(1 << 20)
	_, path := startServer(t, oneExport(t, &Export{Name: "r0", Backend: be}), nil)
	before := dial(t, path)
	before.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if size, _ := before.goExport("r0"); size != 1<<20 {
		t.Fatalf("size at negotiation %d, want %d", size, 1<<20)
	}

	be.mu.Lock()
	be.data = append(be.data, make([]byte, 1<<20)...)
	be.mu.Unlock()
	after := dial(t, path)
	after.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if size, _ := after.goExport("r0"); size != 2<<20 {
		t.Fatalf("size at negotiation after the grow %d, want %d", size, 2<<20)
	}
	data := bytes.Repeat([]byte{0x5a}, 4096)
	if e, _ := before.do(Request{Type: CmdWrite, Cookie: 1, Offset: 1<<20 + 8192, Length: 4096}, data); e != 0 {
		t.Fatalf("write into the grown area from a client connected before: errno %d", e)
	}
	if e, got := after.do(Request{Type: CmdRead, Cookie: 2, Offset: 1<<20 + 8192, Length: 4096}, nil); e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: errno %d", e)
	}

	be.mu.Lock()
	be.data = be.data[:512<<10]
	be.mu.Unlock()
	if e, _ := before.do(Request{Type: CmdWrite, Cookie: 3, Offset: 512 << 10, Length: 4096}, data); e != ENOSPC {
		t.Fatalf("write past the new end: errno %d, want ENOSPC", e)
	}
	if e, _ := after.do(Request{Type: CmdRead, Cookie: 4, Offset: 1 << 20, Length: 4096}, nil); e != EINVAL {
		t.Fatalf("read past the new end: errno %d, want EINVAL", e)
	}
	if e, _ := before.do(Request{Type: CmdWrite, Cookie: 5, Offset: 0, Length: 4096}, data); e != 0 {
		t.Fatalf("write inside the new size: errno %d", e)
	}
	if n := be.outside.Load(); n != 0 {
		t.Fatalf("the backend saw %d requests past its end", n)
	}
}
