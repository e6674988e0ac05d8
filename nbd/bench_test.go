package nbd

import (
	"fmt"
	"io"
	"log/slog"
	"testing"
)

func BenchmarkRequestDecodeValidate(b *testing.B) {
	exp := &Export{Name: "b", Backend: newMem(1 << 20)}
	raw, _ := Request{Type: CmdWrite, Flags: CmdFlagFUA, Cookie: 7, Offset: 4096, Length: 4096}.AppendBinary(nil)
	hdr := (*[requestSize]byte)(raw)
	b.ReportAllocs()
	for b.Loop() {
		r, err := decodeRequest(hdr)
		if err != nil || validate(&r, exp, 1<<20).errno != 0 {
			b.Fatal("rejected")
		}
	}
}

// BenchmarkTransmission pipelines requests over a Unix socket to a server
// with a memory backend, 32 in flight, and reads the replies: the cost of
// the server's request path without a disk.
func BenchmarkTransmission(b *testing.B) {
	for _, tc := range []struct {
		cmd  uint16
		size int
	}{{CmdWrite, 4096}, {CmdRead, 4096}, {CmdWrite, 1 << 20}, {CmdRead, 1 << 20}} {
		b.Run(fmt.Sprintf("%s/%d", cmdName(tc.cmd), tc.size), func(b *testing.B) {
			be := newMem(64 << 20)
			_, path := startServer(b, oneExport(b, &Export{Backend: be}), func(s *Server) {
				s.Logger = slog.New(slog.DiscardHandler)
			})
			c := open(b, path, "disk")
			const depth = 32
			slots := make(chan struct{}, depth)
			payload := make([]byte, tc.size)
			if tc.cmd != CmdWrite {
				payload = nil
			}
			b.SetBytes(int64(tc.size))
			b.ReportAllocs()
			b.ResetTimer()
			errc := make(chan error, 1)
			go func() {
				var buf []byte
				for i := range b.N {
					slots <- struct{}{}
					off := uint64(i%(64<<20/tc.size)) * uint64(tc.size)
					buf, _ = Request{Type: tc.cmd, Cookie: uint64(i), Offset: off, Length: uint32(tc.size)}.AppendBinary(buf[:0])
					buf = append(buf, payload...)
					if _, err := c.nc.Write(buf); err != nil {
						errc <- err
						return
					}
				}
				errc <- nil
			}()
			for range b.N {
				if errno, _ := c.reply(); errno != 0 {
					b.Fatal(errno)
				}
				if tc.cmd == CmdRead {
					if _, err := io.CopyN(io.Discard, c.br, int64(tc.size)); err != nil {
						b.Fatal(err)
					}
				}
				<-slots
			}
			if err := <-errc; err != nil {
				b.Fatal(err)
			}
		})
	}
}
