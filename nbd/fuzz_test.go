package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// Fuzz targets for every decoder of client bytes. Their seed corpora live in
// testdata/fuzz/<name>; the negotiation and transmission seeds include byte
// streams captured from nbdinfo, qemu-io and fio sessions.

// FuzzRequest decodes and judges arbitrary request headers: no panic, and an
// accepted header re-encodes to the same bytes.
func FuzzRequest(f *testing.F) {
	for _, r := range []Request{
		{Type: CmdRead, Length: 4096},
		{Type: CmdWrite, Flags: CmdFlagFUA, Cookie: 1, Offset: 1 << 20, Length: 512},
		{Type: CmdWriteZeroes, Flags: CmdFlagNoHole, Length: 1 << 30},
		{Type: CmdFlush},
		{Type: 99, Offset: ^uint64(0), Length: ^uint32(0)},
	} {
		b, _ := r.AppendBinary(nil)
		f.Add(b)
	}
	exp := &Export{Name: "f", Backend: newMem(1 << 20)}
	ro := &Export{Name: "f", Backend: newMem(1 << 20), ReadOnly: true, MinBlockSize: 512}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < requestSize {
			return
		}
		hdr := (*[requestSize]byte)(b[:requestSize])
		r, err := decodeRequest(hdr)
		if err != nil {
			return
		}
		out, _ := r.AppendBinary(nil)
		if !bytes.Equal(out, b[:requestSize]) {
			t.Fatalf("re-encoded % x, want % x", out, b[:requestSize])
		}
		for _, e := range []*Export{exp, ro} {
			v := validate(&r, e, uint64(e.Backend.Size()))
			if v.errno == 0 && r.Type != CmdDisc {
				// Accepted: it must lie inside the export.
				if r.Offset+uint64(r.Length) > uint64(e.Backend.Size()) || r.Offset+uint64(r.Length) < r.Offset {
					t.Fatalf("accepted out-of-range request %+v", r)
				}
				if (r.Type == CmdRead || r.Type == CmdWrite) && r.Length > e.maxPayload() {
					t.Fatalf("accepted oversized request %+v", r)
				}
			}
		}
	})
}

// FuzzNegotiation runs option haggling over arbitrary client bytes: no
// panic, no hang, and never more than maxInfoLen bytes held for an option.
func FuzzNegotiation(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	opt := func(b []byte, o uint32, p []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
		return append(b, p...)
	}
	f.Add(opt(flags, optGo, infoRequest("a", infoBlockSize, infoName)))
	f.Add(opt(opt(flags, optList, nil), optInfo, infoRequest("b", infoDescription)))
	f.Add(opt(opt(flags, optStructuredReply, nil), optExportName, []byte("a")))
	f.Add(opt(flags, optAbort, nil))
	f.Add(opt(append([]byte(nil), 0, 0, 0, 0), optExportName, []byte("b")))
	cat := &Exports{Default: "a"}
	cat.Add(&Export{Name: "a", Backend: newMem(4096)})
	cat.Add(&Export{Name: "b", Description: "d", Backend: newMem(8192), ReadOnly: true})
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, in []byte) {
		rw := &rwBuffer{in: bytes.NewReader(in)}
		n := &negotiation{rw: rw, catalog: cat, log: log}
		exp, err := n.run()
		if err == nil && exp == nil {
			t.Fatal("negotiation ended with neither an export nor an error")
		}
		if cap(n.payload) > maxInfoLen {
			t.Fatalf("held a %d-byte option payload", cap(n.payload))
		}
	})
}

// FuzzTransmission feeds arbitrary bytes to a connection in the
// transmission phase over a memory backend: no panic, no hang, no write
// outside the export, and the connection always ends.
func FuzzTransmission(f *testing.F) {
	req := func(b []byte, r Request, payload []byte) []byte {
		b, _ = r.AppendBinary(b)
		return append(b, payload...)
	}
	f.Add(req(req(nil, Request{Type: CmdWrite, Length: 4}, []byte("abcd")), Request{Type: CmdRead, Length: 4}, nil))
	f.Add(req(req(nil, Request{Type: CmdFlush}, nil), Request{Type: CmdDisc}, nil))
	f.Add(req(nil, Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole | CmdFlagFUA, Offset: 100, Length: 1000}, nil))
	f.Add(req(nil, Request{Type: CmdWrite, Offset: 65530, Length: 100}, make([]byte, 100)))
	f.Add(req(nil, Request{Type: CmdTrim, Offset: 0, Length: 65536}, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		be := newMem(64 << 10)
		srv := &Server{Catalog: &Exports{}, Logger: slog.New(slog.DiscardHandler), MaxInFlight: 4, MaxInFlightBytes: 1 << 20}
		srv.init()
		exp := &Export{Name: "f", Backend: be}
		nc := &fakeConn{in: bytes.NewReader(in)}
		c := srv.newConn(nc, exp)
		done := make(chan struct{})
		go func() { c.serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not end")
		}
		if n := be.outside.Load(); n != 0 {
			t.Fatalf("%d backend calls outside the export", n)
		}
	})
}

// fakeConn is a net.Conn that reads fixed bytes and discards what it is sent.
type fakeConn struct {
	in *bytes.Reader
}

func (c *fakeConn) Read(p []byte) (int, error) {
	if c.in.Len() == 0 {
		return 0, io.EOF
	}
	return c.in.Read(p)
}
func (c *fakeConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *fakeConn) Close() error                     { return nil }
func (c *fakeConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fakeConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fakeConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }
