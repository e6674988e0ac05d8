package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func twoExports(t *testing.T) *Exports {
	cat := &Exports{Default: "a"}
	for _, e := range []*Export{
		{Name: "a", Description: "first disk", Backend: newMem(1 << 20), MultiConn: true},
		{Name: "b", Backend: newMem(2 << 20), ReadOnly: true},
	} {
		if err := cat.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	return cat
}

// refusingCatalog refuses one name with a reason, as the daemon does for a
// resource that is Secondary.
type refusingCatalog struct{ *Exports }

func (r refusingCatalog) Lookup(name string) (*Export, error) {
	if name == "secondary" {
		return nil, fmt.Errorf("%w: resource secondary is Secondary; promote it first", ErrUnknownExport)
	}
	return r.Exports.Lookup(name)
}

func TestNegotiation_List(t *testing.T) {
	_, path := startServer(t, twoExports(t), nil)
	c := dial(t, path)
	c.greet(clientFlagFixedNewstyle)
	c.option(optList, nil)
	var names []string
	for {
		r := c.optReply()
		if r.opt != optList {
			t.Fatalf("reply for option %d", r.opt)
		}
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.payload[0:4])
		names = append(names, string(r.payload[4:4+n])+"|"+string(r.payload[4+n:]))
	}
	if got, want := strings.Join(names, ","), "a|first disk,b|"; got != want {
		t.Errorf("LIST gave %q, want one reply per export %q", got, want)
	}
	// LIST with data is invalid but the connection stays usable.
	c.option(optList, []byte{1, 2, 3})
	if r := c.optReply(); r.typ != repErrInvalid {
		t.Errorf("LIST with data: reply %#x, want ERR_INVALID", r.typ)
	}
	if size, _ := c.goExport("b"); size != 2<<20 {
		t.Errorf("size %d after LIST", size)
	}
}

func TestNegotiation_InfoAndGo(t *testing.T) {
	cat := refusingCatalog{twoExports(t)}
	_, path := startServer(t, cat, nil)
	tests := []struct {
		name, export string
		reqs         []uint16
		wantType     uint32
		wantSize     uint64
		wantFlags    uint16
		wantName     string
		wantDesc     string
	}{
		{name: "default export", export: "", reqs: []uint16{infoName}, wantType: repAck, wantSize: 1 << 20,
			wantFlags: FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn,
			wantName:  "a"},
		{name: "name and description", export: "a", reqs: []uint16{infoDescription, infoName, 999}, wantType: repAck,
			wantSize: 1 << 20, wantFlags: FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn,
			wantName: "a", wantDesc: "first disk"},
		{name: "read-only", export: "b", wantType: repAck, wantSize: 2 << 20,
			wantFlags: FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes},
		{name: "unknown", export: "nope", wantType: repErrUnknown},
		{name: "refused with reason", export: "secondary", wantType: repErrUnknown},
	}
	for _, opt := range []uint32{optInfo, optGo} {
		for _, tc := range tests {
			t.Run(fmt.Sprintf("opt%d/%s", opt, tc.name), func(t *testing.T) {
				c := dial(t, path)
				c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
				c.option(opt, infoRequest(tc.export, tc.reqs...))
				var size uint64
				var flags uint16
				var name, desc string
				var block []uint32
				for {
					r := c.optReply()
					if r.opt != opt {
						t.Fatalf("reply for option %d", r.opt)
					}
					if r.typ != repInfo {
						if r.typ != tc.wantType {
							t.Fatalf("final reply %#x (%s), want %#x", r.typ, r.payload, tc.wantType)
						}
						if tc.export == "secondary" && !strings.Contains(string(r.payload), "promote it first") {
							t.Errorf("refusal message %q does not carry the reason", r.payload)
						}
						break
					}
					switch typ := binary.BigEndian.Uint16(r.payload); typ {
					case infoExport:
						size, flags = binary.BigEndian.Uint64(r.payload[2:]), binary.BigEndian.Uint16(r.payload[10:])
					case infoBlockSize:
						block = []uint32{binary.BigEndian.Uint32(r.payload[2:]), binary.BigEndian.Uint32(r.payload[6:]),
							binary.BigEndian.Uint32(r.payload[10:])}
					case infoName:
						name = string(r.payload[2:])
					case infoDescription:
						desc = string(r.payload[2:])
					default:
						t.Fatalf("unexpected info type %d", typ)
					}
				}
				if tc.wantType != repAck {
					// The connection stays in negotiation: a later GO works.
					if size, _ := c.goExport("a"); size != 1<<20 {
						t.Errorf("GO after refusal: size %d", size)
					}
					return
				}
				if size != tc.wantSize || flags != tc.wantFlags || name != tc.wantName || desc != tc.wantDesc {
					t.Errorf("got size %d flags %#x name %q desc %q; want %d %#x %q %q",
						size, flags, name, desc, tc.wantSize, tc.wantFlags, tc.wantName, tc.wantDesc)
				}
				if fmt.Sprint(block) != "[1 4096 33554432]" {
					t.Errorf("block sizes %v, want [1 4096 33554432]", block)
				}
				if opt == optInfo {
					// INFO leaves the client in negotiation.
					c.option(optAbort, nil)
					if r := c.optReply(); r.typ != repAck {
						t.Errorf("ABORT reply %#x", r.typ)
					}
					c.expectClosed()
					return
				}
				// After GO the transmission phase works.
				if errno, _ := c.do(Request{Type: CmdRead, Cookie: 7, Length: 512}, nil); errno != 0 {
					t.Errorf("read after GO: %v", errno)
				}
			})
		}
	}
}

func TestNegotiation_UnsupportedOptionsSkipped(t *testing.T) {
	_, path := startServer(t, twoExports(t), nil)
	c := dial(t, path)
	c.greet(clientFlagFixedNewstyle)
	for _, opt := range []uint32{optStartTLS, optStructuredReply, optListMetaContext, optSetMetaContext,
		optExtendedHeaders, optPeekExport, 999, 0xffffffff} {
		// A payload that looks like an option header: the server must
		// skip it by its length, not parse it.
		payload, _ := Request{}.AppendBinary(binary.BigEndian.AppendUint64(nil, magicIHaveOpt))
		c.option(opt, payload)
		if r := c.optReply(); r.opt != opt || r.typ != repErrUnsup {
			t.Errorf("option %d: reply %d/%#x, want ERR_UNSUP", opt, r.opt, r.typ)
		}
	}
	if size, _ := c.goExport("a"); size != 1<<20 {
		t.Errorf("GO after unsupported options: size %d", size)
	}
}

func TestNegotiation_ExportName(t *testing.T) {
	_, path := startServer(t, twoExports(t), nil)
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			c := dial(t, path)
			flags := clientFlagFixedNewstyle
			if noZeroes {
				flags |= clientFlagNoZeroes
			}
			c.greet(flags)
			c.option(optExportName, []byte("b"))
			b := c.read(10)
			if size := binary.BigEndian.Uint64(b[0:8]); size != 2<<20 {
				t.Errorf("size %d", size)
			}
			if f := binary.BigEndian.Uint16(b[8:10]); f&FlagReadOnly == 0 || f&FlagHasFlags == 0 {
				t.Errorf("flags %#x", f)
			}
			if !noZeroes && !bytes.Equal(c.read(exportNameZero), make([]byte, exportNameZero)) {
				t.Error("padding is not 124 zero bytes")
			}
			if errno, _ := c.do(Request{Type: CmdWrite, Cookie: 1, Length: 1}, []byte{1}); errno != EPERM {
				t.Errorf("write on read-only export: %v", errno)
			}
		})
	}
	t.Run("legacy client without fixed newstyle", func(t *testing.T) {
		c := dial(t, path)
		c.greet(0)
		c.option(optExportName, []byte("a"))
		c.read(10 + exportNameZero)
		if errno, _ := c.do(Request{Type: CmdRead, Cookie: 1, Length: 1}, nil); errno != 0 {
			t.Errorf("read: %v", errno)
		}
	})
}

// TestNegotiation_Disconnects covers the inputs that must end the
// connection cleanly: with an error reply first where the protocol has one.
func TestNegotiation_Disconnects(t *testing.T) {
	long := strings.Repeat("x", maxStringLen+1)
	tests := []struct {
		name  string
		flags uint32
		send  func(c *client)
		reply uint32 // expected error reply before the close, 0 for none
	}{
		{name: "unknown client flags", flags: 1 << 5, send: func(*client) {}},
		{name: "bad option magic", flags: clientFlagFixedNewstyle, send: func(c *client) {
			c.write(bytes.Repeat([]byte{0xaa}, optHeaderSize))
		}},
		{name: "option longer than 32 MiB", flags: clientFlagFixedNewstyle, send: func(c *client) {
			b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
			b = binary.BigEndian.AppendUint32(b, optGo)
			c.write(binary.BigEndian.AppendUint32(b, maxOptionLen+1))
		}},
		{name: "unknown option longer than 32 MiB", flags: clientFlagFixedNewstyle, send: func(c *client) {
			b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
			b = binary.BigEndian.AppendUint32(b, 12345)
			c.write(binary.BigEndian.AppendUint32(b, 0xffffffff))
		}},
		{name: "export name over 4096 bytes in GO", flags: clientFlagFixedNewstyle, reply: repErrTooBig,
			send: func(c *client) { c.option(optGo, infoRequest(long)) }},
		{name: "name length past the option", flags: clientFlagFixedNewstyle, reply: repErrInvalid,
			send: func(c *client) {
				p := infoRequest("a")
				binary.BigEndian.PutUint32(p[0:4], 100)
				c.option(optInfo, p)
			}},
		{name: "info count disagrees with length", flags: clientFlagFixedNewstyle, reply: repErrInvalid,
			send: func(c *client) { c.option(optGo, append(infoRequest("a", infoName), 0)) }},
		{name: "info payload too short", flags: clientFlagFixedNewstyle, reply: repErrInvalid,
			send: func(c *client) { c.option(optGo, []byte{0, 0, 0}) }},
		{name: "info longer than any valid request", flags: clientFlagFixedNewstyle, reply: repErrInvalid,
			send: func(c *client) {
				b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
				b = binary.BigEndian.AppendUint32(b, optInfo)
				c.write(binary.BigEndian.AppendUint32(b, maxInfoLen+1))
			}},
		{name: "EXPORT_NAME over 4096 bytes", flags: clientFlagFixedNewstyle, send: func(c *client) {
			c.option(optExportName, []byte(long))
		}},
		{name: "EXPORT_NAME unknown", flags: clientFlagFixedNewstyle, send: func(c *client) {
			c.option(optExportName, []byte("nope"))
		}},
		{name: "non-fixed client sends GO", flags: 0, send: func(c *client) { c.option(optGo, infoRequest("a")) }},
		{name: "truncated option then EOF", flags: clientFlagFixedNewstyle, send: func(c *client) {
			c.write(binary.BigEndian.AppendUint64(nil, magicIHaveOpt)[:5])
			c.nc.(interface{ CloseWrite() error }).CloseWrite()
		}},
		{name: "abort", flags: clientFlagFixedNewstyle, reply: repAck, send: func(c *client) {
			c.option(optAbort, []byte("ignored"))
		}},
	}
	_, path := startServer(t, twoExports(t), nil)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, path)
			c.greet(tc.flags)
			tc.send(c)
			if tc.reply != 0 {
				if r := c.optReply(); r.typ != tc.reply {
					t.Fatalf("reply %#x (%s), want %#x", r.typ, r.payload, tc.reply)
				}
			}
			c.expectClosed()
		})
	}
}

func TestNegotiation_StallDisconnected(t *testing.T) {
	_, path := startServer(t, twoExports(t), func(s *Server) { s.HandshakeTimeout = 200 * time.Millisecond })
	for _, stall := range []string{"before flags", "mid option"} {
		t.Run(stall, func(t *testing.T) {
			c := dial(t, path)
			c.read(greetingSize)
			if stall == "mid option" {
				c.write(binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle))
				c.write(binary.BigEndian.AppendUint64(nil, magicIHaveOpt))
			}
			start := time.Now()
			c.expectClosed()
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("stalled client closed after %v", d)
			}
		})
	}
}

// rwBuffer feeds fixed input to negotiate and collects its output.
type rwBuffer struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (b *rwBuffer) Read(p []byte) (int, error)  { return b.in.Read(p) }
func (b *rwBuffer) Write(p []byte) (int, error) { return b.out.Write(p) }

func TestNegotiate_InMemory(t *testing.T) {
	var in bytes.Buffer
	in.Write(binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes))
	in.Write(binary.BigEndian.AppendUint64(nil, magicIHaveOpt))
	in.Write(binary.BigEndian.AppendUint32(nil, optGo))
	p := infoRequest("a")
	in.Write(binary.BigEndian.AppendUint32(nil, uint32(len(p))))
	in.Write(p)
	rw := &rwBuffer{in: bytes.NewReader(in.Bytes())}
	exp, err := negotiate(rw, twoExports(t), testLogger(t), nil)
	if err != nil || exp.Name != "a" {
		t.Fatalf("negotiate: %v, %v", exp, err)
	}
	// greeting + INFO_EXPORT (20+12) + INFO_BLOCK_SIZE (20+14) + ACK (20)
	if got, want := rw.out.Len(), greetingSize+32+34+20; got != want {
		t.Errorf("wrote %d bytes, want %d", got, want)
	}
	if rw.in.Len() != 0 {
		t.Errorf("%d bytes left unread", rw.in.Len())
	}
	_, err = negotiate(&rwBuffer{in: bytes.NewReader(nil)}, twoExports(t), testLogger(t), nil)
	if err == nil || errors.Is(err, errAborted) {
		t.Errorf("negotiate on empty input: %v", err)
	}
}
