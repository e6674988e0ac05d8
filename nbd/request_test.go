package nbd

import (
	"bytes"
	"encoding/hex"
	"testing"
)

func TestRequest_Binary(t *testing.T) {
	r := Request{Flags: CmdFlagFUA, Type: CmdWrite, Cookie: 0x0102030405060708, Offset: 0x1000, Length: 512}
	b, err := r.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	const want = "25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00000200"
	if got := hex.EncodeToString(b); got != want {
		t.Fatalf("encoded %s, want %s", got, want)
	}
	var hdr [requestSize]byte
	copy(hdr[:], b)
	got, err := decodeRequest(&hdr)
	if err != nil || got != r {
		t.Fatalf("decode: %+v, %v", got, err)
	}
	hdr[0] ^= 1
	if _, err := decodeRequest(&hdr); err != ErrBadMagic {
		t.Fatalf("bad magic: %v", err)
	}
}

func TestValidate(t *testing.T) {
	const size = 1 << 20
	rw := &Export{Name: "rw", Backend: newMem(size)}
	ro := &Export{Name: "ro", Backend: newMem(size), ReadOnly: true}
	aligned := &Export{Name: "al", Backend: newMem(size), MinBlockSize: 512}
	small := &Export{Name: "small", Backend: newMem(size), MaxPayload: 4096}
	tests := []struct {
		name string
		exp  *Export
		req  Request
		want verdict
	}{
		{"read", rw, Request{Type: CmdRead, Offset: 0, Length: 4096}, verdict{}},
		{"read to the end", rw, Request{Type: CmdRead, Offset: size - 1, Length: 1}, verdict{}},
		{"zero-length read at the end", rw, Request{Type: CmdRead, Offset: size}, verdict{}},
		{"read straddling the end", rw, Request{Type: CmdRead, Offset: size - 1, Length: 2}, verdict{errno: EINVAL}},
		{"read past the end", rw, Request{Type: CmdRead, Offset: size + 1}, verdict{errno: EINVAL}},
		{"read with overflowing offset", rw, Request{Type: CmdRead, Offset: ^uint64(0) - 10, Length: 512}, verdict{errno: EINVAL}},
		{"read over the max payload", rw, Request{Type: CmdRead, Length: DefaultMaxPayload + 1}, verdict{errno: EINVAL}},
		{"read with FUA", rw, Request{Type: CmdRead, Flags: CmdFlagFUA, Length: 1}, verdict{}},
		{"read with NO_HOLE", rw, Request{Type: CmdRead, Flags: CmdFlagNoHole, Length: 1}, verdict{errno: EINVAL}},
		{"read with DF (not advertised)", rw, Request{Type: CmdRead, Flags: CmdFlagDF, Length: 1}, verdict{errno: EINVAL}},
		{"read with unknown flag", rw, Request{Type: CmdRead, Flags: 0x8000, Length: 1}, verdict{errno: EINVAL}},
		{"write past the end", rw, Request{Type: CmdWrite, Offset: size - 1, Length: 2}, verdict{errno: ENOSPC}},
		{"write with overflowing offset", rw, Request{Type: CmdWrite, Offset: ^uint64(0), Length: 1}, verdict{errno: ENOSPC}},
		{"write over the max payload", rw, Request{Type: CmdWrite, Length: DefaultMaxPayload + 1}, verdict{errno: EINVAL}},
		{"write too big to drain", rw, Request{Type: CmdWrite, Length: maxDrain + 1}, verdict{errno: EINVAL, drop: true}},
		{"write FUA", rw, Request{Type: CmdWrite, Flags: CmdFlagFUA, Length: 1}, verdict{}},
		{"write NO_HOLE", rw, Request{Type: CmdWrite, Flags: CmdFlagNoHole, Length: 1}, verdict{errno: EINVAL}},
		{"write read-only", ro, Request{Type: CmdWrite, Length: 1}, verdict{errno: EPERM}},
		{"read read-only", ro, Request{Type: CmdRead, Length: 1}, verdict{}},
		{"trim read-only", ro, Request{Type: CmdTrim, Length: 1}, verdict{errno: EPERM}},
		{"zeroes read-only", ro, Request{Type: CmdWriteZeroes, Length: 1}, verdict{errno: EPERM}},
		{"flush read-only", ro, Request{Type: CmdFlush}, verdict{}},
		{"flush", rw, Request{Type: CmdFlush, Flags: CmdFlagFUA}, verdict{}},
		{"flush with offset", rw, Request{Type: CmdFlush, Offset: 1}, verdict{errno: EINVAL}},
		{"flush with length", rw, Request{Type: CmdFlush, Length: 1}, verdict{errno: EINVAL}},
		{"trim whole disk", rw, Request{Type: CmdTrim, Length: size}, verdict{}},
		{"trim past the end", rw, Request{Type: CmdTrim, Offset: 1, Length: size}, verdict{errno: EINVAL}},
		{"trim longer than max payload", small, Request{Type: CmdTrim, Length: size}, verdict{}},
		{"zeroes longer than max payload", small, Request{Type: CmdWriteZeroes, Length: size}, verdict{}},
		{"read over a small max payload", small, Request{Type: CmdRead, Length: 4097}, verdict{errno: EINVAL}},
		{"write over a small max payload", small, Request{Type: CmdWrite, Length: 4097}, verdict{errno: EINVAL}},
		{"zeroes NO_HOLE FUA", rw, Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole | CmdFlagFUA, Length: size}, verdict{}},
		{"zeroes past the end", rw, Request{Type: CmdWriteZeroes, Offset: size, Length: 1}, verdict{errno: ENOSPC}},
		{"zeroes FAST_ZERO (not advertised)", rw, Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Length: 1}, verdict{errno: EINVAL}},
		{"cache (not advertised)", rw, Request{Type: CmdCache, Length: 1}, verdict{errno: EINVAL}},
		{"block status (not negotiated)", rw, Request{Type: CmdBlockStatus, Length: 1}, verdict{errno: EINVAL}},
		{"unknown command", rw, Request{Type: 77, Length: 4096}, verdict{errno: EINVAL}},
		{"disc", rw, Request{Type: CmdDisc}, verdict{}},
		{"aligned read", aligned, Request{Type: CmdRead, Offset: 512, Length: 1024}, verdict{}},
		{"misaligned offset", aligned, Request{Type: CmdRead, Offset: 1, Length: 512}, verdict{errno: EINVAL}},
		{"misaligned length", aligned, Request{Type: CmdWrite, Offset: 0, Length: 100}, verdict{errno: EINVAL}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := tc.req
			if got := validate(&req, tc.exp, size); got != tc.want {
				t.Errorf("validate(%+v) = %+v, want %+v", tc.req, got, tc.want)
			}
		})
	}
}

func TestExport_Validate(t *testing.T) {
	be := newMem(4096)
	tests := []struct {
		exp Export
		ok  bool
	}{
		{Export{Name: "ok", Backend: be}, true},
		{Export{Name: "nobackend"}, false},
		{Export{Name: string(bytes.Repeat([]byte{'x'}, maxStringLen+1)), Backend: be}, false},
		{Export{Name: "min3", Backend: be, MinBlockSize: 3}, false},
		{Export{Name: "min128k", Backend: be, MinBlockSize: 128 << 10}, false},
		{Export{Name: "pref256", Backend: be, PreferredBlockSize: 256}, false},
		{Export{Name: "max-small", Backend: be, MaxPayload: 1024}, false},
		{Export{Name: "max-huge", Backend: be, MaxPayload: 1 << 30}, false},
		{Export{Name: "min4k", Backend: be, MinBlockSize: 4096, MaxPayload: 1 << 20}, true},
	}
	for _, tc := range tests {
		if err := tc.exp.validate(); (err == nil) != tc.ok {
			t.Errorf("%s: validate() = %v, want ok=%v", tc.exp.Name, err, tc.ok)
		}
	}
}
