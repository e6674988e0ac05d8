package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"testing"
	"time"
)

// BenchmarkSession measures one session's throughput over TCP on loopback,
// plain (checksummed) and sealed (AES-256-GCM), for 4 KiB and 1 MiB
// messages on the data stream.
func BenchmarkSession(b *testing.B) {
	for _, mode := range []string{"plain", "sealed"} {
		for _, size := range []int{4 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("%s/%dKiB", mode, size>>10), func(b *testing.B) {
				secret := ""
				if mode == "sealed" {
					secret = "bench"
				}
				ca, cb := configs(secret)
				ca.PingInterval, cb.PingInterval = time.Second, time.Second
				addr := listen(b)
				cb.ListenAddr, ca.PeerAddr = addr, addr
				tb := start(b, cb)
				ta := start(b, ca)
				sa, sb := sessions(b, ta, tb)
				msg := make([]byte, size)
				rand.Read(msg)
				done := make(chan error, 1)
				b.SetBytes(int64(size))
				b.ResetTimer()
				go func() {
					for range b.N {
						if _, err := sb.Recv(Data); err != nil {
							done <- err
							return
						}
					}
					done <- nil
				}()
				for range b.N {
					if err := sa.Send(Data, typeTest, msg); err != nil {
						b.Fatal(err)
					}
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}

// BenchmarkCompression measures per-frame compression of 1 MiB payloads:
// throughput and the ratio of payload to wire bytes.
func BenchmarkCompression(b *testing.B) {
	// Log lines with varying fields: compressible the way real text is.
	r := mrand.New(mrand.NewPCG(1, 2))
	var buf bytes.Buffer
	paths := []string{"/index.html", "/api/v1/orders", "/static/app.js", "/login", "/api/v1/users/search"}
	for buf.Len() < 1<<20 {
		fmt.Fprintf(&buf, "2026-11-22T01:%02d:%02d.%06dZ INFO request id=%016x path=%s status=%d bytes=%d ms=%d\n",
			r.IntN(60), r.IntN(60), r.IntN(1e6), r.Uint64(), paths[r.IntN(len(paths))], []int{200, 200, 200, 304, 404}[r.IntN(5)],
			r.IntN(100000), r.IntN(900))
	}
	text := buf.Bytes()[:1<<20]
	random := make([]byte, 1<<20)
	rand.Read(random)
	c, _ := newCodecs()
	for _, comp := range []struct {
		name string
		c    Compression
	}{{"s2", CompressS2}, {"zstd", CompressZstd}} {
		for _, data := range []struct {
			name string
			p    []byte
		}{{"compressible", text}, {"incompressible", random}} {
			b.Run(comp.name+"/"+data.name, func(b *testing.B) {
				w, _ := newSealer(nil, [4]byte{}, VersionMax)
				var out []byte
				b.SetBytes(int64(len(data.p)))
				for b.Loop() {
					out, _ = appendFrame(out[:0], w, c, comp.c, typeTest, data.p)
				}
				b.ReportMetric(float64(len(data.p))/float64(len(out)), "ratio")
			})
		}
	}
}

// BenchmarkLimiterAccuracy sends resync-sized chunks through a session at
// resync-rate 1M for 10 seconds and reports the rate achieved.
func BenchmarkLimiterAccuracy(b *testing.B) {
	ca, cb := configs("")
	l, err := NewLink(ca, cb)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	sa, sb := sessions(b, l.A, l.B)
	go func() {
		for {
			if _, err := sb.Recv(Data); err != nil {
				return
			}
		}
	}()
	const rate, runFor = 1 << 20, 10 * time.Second
	for b.Loop() {
		lim := NewLimiter(rate)
		chunk := make([]byte, 64<<10)
		start := time.Now()
		var sent int64
		for time.Since(start) < runFor {
			if err := lim.Wait(context.Background(), len(chunk)); err != nil {
				b.Fatal(err)
			}
			if err := sa.Send(Data, typeTest, chunk); err != nil {
				b.Fatal(err)
			}
			sent += int64(len(chunk))
		}
		got := float64(sent) / time.Since(start).Seconds()
		b.ReportMetric(got/(1<<20), "MiB/s")
		b.ReportMetric(100*(got-rate)/rate, "error%")
	}
}

// BenchmarkChecksumParts: the checksum of a 1 MiB write sent as its
// 31-byte message header and the data where it lies (outBatch), by
// protocol version: version 2 streams both through XXH3's buffer, version
// 3 hashes the data in place.
func BenchmarkChecksumParts(b *testing.B) {
	data := make([]byte, 1<<20)
	rand.Read(data)
	head := make([]byte, 31)
	hdr := header(typeTest, 0, uint32(len(head)+len(data)))
	for v := uint16(VersionMin); v <= VersionMax; v++ {
		b.Run(fmt.Sprintf("version %d", v), func(b *testing.B) {
			s, _ := newSealer(nil, [4]byte{}, v)
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				s.checksum(hdr, head, data)
			}
		})
	}
}
