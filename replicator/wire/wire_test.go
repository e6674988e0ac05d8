package wire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"flag"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/nbdmirror/nbdmirror/transport"
)

var update = flag.Bool("update", false, "rewrite the fuzz seed corpus in testdata/fuzz/FuzzDecode")

type sample struct {
	name string
	m    Message
}

// samples returns valid messages: the first of each type is its seed in
// testdata/fuzz/FuzzDecode.
func samples() []sample {
	data := bytes.Repeat([]byte("0123456789abcdef"), 32) // 512 bytes
	block := bytes.Repeat([]byte{0xa5}, 4096)
	digest := bytes.Repeat([]byte{0x5a}, 32)
	return []sample{
		{"params", Params{DiskSize: 1 << 40, Size: 1 << 39, Protocol: 'C', AfterSB0: 1, AfterSB1: 2, AfterSB2: 7,
			Flags: ParamDiscardMyData | ParamCsums, CsumsAlg: "sha256", VerifyAlg: "sha256", MaxEpoch: 2048}},
		{"params-min", Params{Protocol: 'A', MaxEpoch: 1}},
		{"params-max", Params{DiskSize: math.MaxUint64, Size: math.MaxUint64, Protocol: 'A', AfterSB0: 7, AfterSB1: 7,
			AfterSB2: 7, Flags: ParamCsums, CsumsAlg: strings.Repeat("~", MaxName), VerifyAlg: " !az09~", MaxEpoch: 20000}},
		{"state", State{Role: RolePrimary, Disk: 8, Flags: StateUserPause}},
		{"state-zero", State{}},
		{"state-secondary", State{Role: RoleSecondary, Disk: 4}},
		{"uuids", UUIDs{Current: 0x1111, Bitmap: 0x2222, History: [2]uint64{0x3333, 0x4444}, BitsSet: 12345,
			Flags: UUIDDiscardMyData | UUIDCrashedPrimary | UUIDInconsistent | UUIDSkipInitialSync}},
		{"uuids-zero", UUIDs{}},
		{"bitmap", Bitmap{Start: 100, Count: 1000, Runs: []uint64{10, 1, 200, 300, 489}}},
		{"bitmap-last", Bitmap{Start: 0, Count: 1 << 32, Last: true, Runs: []uint64{0, 1 << 32}}},
		{"bitmap-clear", Bitmap{Start: 5, Count: 7, Last: true, Runs: []uint64{7}}},
		{"bitmap-empty", Bitmap{Start: math.MaxUint64, Last: true}},
		{"bitmap-top", Bitmap{Start: math.MaxUint64 - 3, Count: 3, Runs: []uint64{1, 2}}},
		{"syncuuid", SyncUUID{UUID: 0xdeadbeefcafe}},
		{"write", Write{Seq: 7, Epoch: 3, Offset: 4096, Length: 512, Kind: WriteData, Flags: WriteFUA | WriteAckWanted, Data: data}},
		{"write-trim", Write{Seq: 8, Epoch: 3, Offset: 1 << 30, Length: MaxData, Kind: WriteTrim}},
		{"write-zeroes", Write{Seq: 9, Epoch: 4, Offset: math.MaxUint64 - 1023, Length: 512, Kind: WriteZeroes, Flags: WriteFUA}},
		{"write-top", Write{Seq: 10, Offset: math.MaxUint64 - 8191, Length: 4096, Data: block}},
		{"barrier", Barrier{Epoch: 3, Writes: 2}},
		{"barrier-flush", Barrier{Epoch: 4, Writes: 0, Flags: BarrierFlush}},
		{"barrier-ack", BarrierAck{Epoch: 3, Writes: 2}},
		{"write-ack", WriteAck{Seq: 7, Status: AckOK}},
		{"write-ack-failed", WriteAck{Seq: math.MaxUint64, Status: AckFailed}},
		{"resync-request", ResyncRequest{ID: 1, Offset: 8192, Length: 4096, Digests: digest}},
		{"resync-request-batch", ResyncRequest{ID: 6, Offset: 0, Length: MaxCsumsBlocks * 4096, Digests: bytes.Repeat([]byte{7}, MaxCsumsBlocks*MaxDigest)}},
		{"resync-request-plain", ResyncRequest{ID: 2, Offset: 0, Length: MaxData}},
		{"resync-request-max", ResyncRequest{ID: 3, Offset: math.MaxUint64 - 8191, Length: 4096, Digests: bytes.Repeat([]byte{1}, MaxDigest)}},
		{"resync-reply", ResyncReply{ID: 1, Offset: 8192, Length: 4096, Status: ReplyData, Data: block}},
		{"resync-reply-insync", ResyncReply{ID: 1, Offset: 8192, Length: 4096, Status: ReplyInSync}},
		{"resync-reply-error", ResyncReply{ID: 1, Offset: 8192, Length: 8192, Status: ReplyError}},
		{"resync-reply-partial", ResyncReply{ID: 1, Offset: 0, Length: 9 * 4096, Status: ReplyPartial, Present: []byte{0x81, 0x01}, Data: bytes.Repeat(block, 3)}},
		{"resync-ack", ResyncAck{ID: 1, Offset: 8192, Length: 4096, Status: AckOK}},
		{"resync-ack-failed", ResyncAck{ID: 1, Offset: 8192, Length: 4096, Status: AckFailed}},
		{"verify-request", VerifyRequest{ID: 4, Offset: 4096, Length: 4096, Digest: digest}},
		{"verify-request-min", VerifyRequest{ID: 5, Offset: 0, Length: MaxData, Digest: []byte{0}}},
		{"verify-reply", VerifyReply{ID: 4, Offset: 4096, Length: 4096, Status: VerifyDiffers}},
		{"verify-reply-equal", VerifyReply{ID: 4, Offset: 4096, Length: 4096, Status: VerifyEqual}},
		{"verify-reply-error", VerifyReply{ID: 4, Offset: 4096, Length: 4096, Status: VerifyError}},
		{"out-of-sync", OutOfSync{Offset: 1 << 20, Length: 65536}},
		{"command", Command{Code: CmdResyncDone, Arg: 42}},
		{"command-invalidate", Command{Code: CmdInvalidate}},
		{"command-verify-done", Command{Code: CmdVerifyDone, Arg: math.MaxUint64}},
		{"command-ahead", Command{Code: CmdAhead}},
		{"sizes", Sizes{Kind: SizesSet, Flags: SizesAssumeClean, Disk: 2 << 30, Size: 1<<30 + 4096}},
		{"sizes-query", Sizes{Kind: SizesQuery, Disk: 1 << 30, Size: 1 << 30}},
		{"sizes-reply", Sizes{Kind: SizesReply, Disk: MaxSize, Size: 0}},
		{"sizes-done-failed", Sizes{Kind: SizesDone, Status: SizesFailed, Disk: 4096, Size: 8192}},
		{"sizes-done-marked", Sizes{Kind: SizesDone, Status: SizesMarked, Size: 1 << 30}},
		{"read-request", ReadRequest{ID: 1, Offset: 12345, Length: 3}},
		{"read-request-max", ReadRequest{ID: math.MaxUint64, Offset: math.MaxUint64 - MaxData, Length: MaxData}},
		{"read-reply", ReadReply{ID: 1, Offset: 512, Length: 512, Status: ReadOK, Data: data}},
		{"read-reply-error", ReadReply{ID: 2, Offset: 1, Length: 7, Status: ReadError}},
	}
}

// normalize makes empty slices nil, as Decode returns them.
func normalize(m Message) Message {
	orNil := func(b []byte) []byte {
		if len(b) == 0 {
			return nil
		}
		return b
	}
	switch v := m.(type) {
	case Write:
		v.Data = orNil(v.Data)
		return v
	case ResyncRequest:
		v.Digests = orNil(v.Digests)
		return v
	case ResyncReply:
		v.Data = orNil(v.Data)
		v.Present = orNil(v.Present)
		return v
	case VerifyRequest:
		v.Digest = orNil(v.Digest)
		return v
	case Bitmap:
		if len(v.Runs) == 0 {
			v.Runs = nil
		}
		return v
	}
	return m
}

func TestTypes(t *testing.T) {
	ts := Types()
	if len(ts) != 19 {
		t.Fatalf("Types() has %d types, want 19", len(ts))
	}
	covered := map[transport.Type]bool{}
	for _, s := range samples() {
		covered[s.m.Type()] = true
	}
	for i, ty := range ts {
		if ty != transport.FirstAppType+transport.Type(i) {
			t.Errorf("Types()[%d] = %d, want %d", i, ty, transport.FirstAppType+transport.Type(i))
		}
		if !covered[ty] {
			t.Errorf("type %d has no sample", ty)
		}
	}
	for _, s := range samples() {
		if got, want := Name(s.m.Type()), reflect.TypeOf(s.m).Name(); got != want {
			t.Errorf("Name(%d) = %q, want %q", s.m.Type(), got, want)
		}
	}
	if got := Name(typeEnd); got != "type 35" {
		t.Errorf("Name(35) = %q, want \"type 35\"", got)
	}
	if TypeCommand != 31 || TypeWrite != 21 || TypeSizes != 32 || TypeReadRequest != 33 || TypeReadReply != 34 {
		t.Errorf("types renumbered: Write %d, Command %d, Sizes %d, ReadRequest %d, ReadReply %d", TypeWrite, TypeCommand,
			TypeSizes, TypeReadRequest, TypeReadReply)
	}
}

// TestBulkHeader: the payload of a Write or a ResyncReply is its header
// followed by its bulk data.
func TestBulkHeader(t *testing.T) {
	seen := map[transport.Type]int{}
	for _, s := range samples() {
		b, ok := s.m.(BulkMessage)
		if !ok {
			continue
		}
		seen[b.Type()]++
		if got := append(b.AppendHeader(nil), b.Bulk()...); !bytes.Equal(got, Encode(b)) {
			t.Errorf("%s: header and data differ from the payload", s.name)
		}
	}
	if seen[TypeWrite] == 0 || seen[TypeResyncReply] == 0 {
		t.Fatalf("samples of bulk messages by type: %v; want Writes and ResyncReplies", seen)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, s := range samples() {
		t.Run(s.name, func(t *testing.T) {
			if err := s.m.(validator).Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			p := Encode(s.m)
			got, err := Decode(s.m.Type(), p)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if want := normalize(s.m); !reflect.DeepEqual(got, want) {
				t.Fatalf("Decode(Encode(m)) = %#v, want %#v", got, want)
			}
			if got.Type() != s.m.Type() {
				t.Fatalf("decoded type %d, want %d", got.Type(), s.m.Type())
			}
			prefix := []byte("prefix")
			if out := s.m.Append(prefix); !bytes.Equal(out[:6], prefix) || !bytes.Equal(out[6:], p) {
				t.Fatalf("Append to a prefix gives %x", out)
			}
		})
	}
}

// TestEncoding pins the bytes of a few payloads.
func TestEncoding(t *testing.T) {
	tests := []struct {
		name string
		m    Message
		hex  string
	}{
		{"params", Params{DiskSize: 0x0102, Size: 0x0304, Protocol: 'C', AfterSB0: 1, AfterSB1: 2, AfterSB2: 3,
			Flags: ParamCsums, CsumsAlg: "md5", MaxEpoch: 2048},
			"01" + "0000000000000102" + "0000000000000304" + "43" + "010203" + "00000002" + "00000800" +
				"03" + "6d6435" + "00"},
		{"state", State{Role: RoleSecondary, Disk: 8, Flags: StateUserPause}, "01020801"},
		{"bitmap", Bitmap{Start: 1, Count: 300, Last: true, Runs: []uint64{0, 300}},
			"01" + "01" + "0000000000000001" + "000000000000012c" + "00" + "ac02"},
		{"write", Write{Seq: 1, Epoch: 2, Offset: 512, Length: 512, Kind: WriteTrim, Flags: WriteAckWanted},
			"01" + "0000000000000001" + "0000000000000002" + "0000000000000200" + "00000200" + "01" + "02"},
		{"write-ack", WriteAck{Seq: 5, Status: AckFailed}, "01" + "0000000000000005" + "01"},
		{"resync-request", ResyncRequest{ID: 9, Offset: 4096, Length: 8192, Digests: []byte{0xab, 0xcd}},
			"01" + "0000000000000009" + "0000000000001000" + "00002000" + "0002abcd"},
		{"verify-reply", VerifyReply{ID: 9, Offset: 4096, Length: 4096, Status: VerifyError},
			"01" + "0000000000000009" + "0000000000001000" + "00001000" + "02"},
		{"out-of-sync", OutOfSync{Offset: 4096, Length: 4096}, "01" + "0000000000001000" + "00001000"},
		{"command", Command{Code: CmdVerifyStart, Arg: 7}, "01" + "03" + "0000000000000007"},
		{"sizes", Sizes{Kind: SizesSet, Flags: SizesAssumeClean, Disk: 0x2000, Size: 0x1000},
			"01" + "03" + "01" + "00" + "0000000000002000" + "0000000000001000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := hex.EncodeToString(Encode(tt.m)); got != tt.hex {
				t.Fatalf("Encode = %s\nwant     %s", got, tt.hex)
			}
		})
	}
}

// TestDecodeAliases checks that data and digests point into the payload,
// capped at their length.
func TestDecodeAliases(t *testing.T) {
	p := Encode(Write{Offset: 0, Length: 512, Data: make([]byte, 512)})
	m, err := Decode(TypeWrite, p)
	if err != nil {
		t.Fatal(err)
	}
	w := m.(Write)
	if &w.Data[0] != &p[writeHeader] || cap(w.Data) != 512 {
		t.Errorf("Write.Data does not alias the payload (cap %d)", cap(w.Data))
	}
	p = Encode(VerifyRequest{Offset: 0, Length: 4096, Digest: []byte{1, 2, 3}})
	m, err = Decode(TypeVerifyRequest, append(p, 0xff)[:len(p)])
	if err != nil {
		t.Fatal(err)
	}
	if v := m.(VerifyRequest); &v.Digest[0] != &p[rangeHeader+1] || cap(v.Digest) != 3 {
		t.Errorf("VerifyRequest.Digest does not alias the payload (cap %d)", cap(v.Digest))
	}
}

// bad is a malformed payload of a type, and a part of the error text.
type bad struct {
	name string
	typ  transport.Type
	p    []byte
	want string
}

// malformedCases derives bad payloads from every sample (each truncation,
// a trailing byte, other versions) and adds a table of bad fields.
func malformedCases() []bad {
	var cases []bad
	for _, s := range samples() {
		p := Encode(s.m)
		for n := range len(p) {
			cases = append(cases, bad{s.name + "/truncated-" + strconv.Itoa(n), s.m.Type(), p[:n:n], ""})
		}
		cases = append(cases, bad{s.name + "/trailing", s.m.Type(), append(bytes.Clone(p), 0), ""})
		for _, v := range []byte{0, 2, 0xff} {
			q := bytes.Clone(p)
			q[0] = v
			cases = append(cases, bad{s.name + "/version-" + strconv.Itoa(int(v)), s.m.Type(), q, "version"})
		}
	}
	enc := func(name string, m Message, want string) bad {
		return bad{name, m.Type(), Encode(m), want}
	}
	good := Params{Protocol: 'C', MaxEpoch: 100}
	params := func(f func(*Params)) Params {
		m := good
		f(&m)
		return m
	}
	header := Encode(Bitmap{Start: 0, Count: 5})
	header = header[:bitmapHeader]
	runs := func(flags byte, rest ...byte) []byte {
		q := bytes.Clone(header)
		q[1] = flags
		return append(q, rest...)
	}
	data := make([]byte, 512)
	cases = append(cases,
		bad{"unknown-type-0", 0, []byte{1}, "unknown message type 0"},
		bad{"unknown-type-9", 9, []byte{1}, "unknown message type 9"},
		bad{"unknown-type-15", 15, []byte{1}, "unknown message type 15"},
		bad{"unknown-type-35", 35, []byte{1}, "unknown message type 35"},
		bad{"unknown-type-max", math.MaxUint16, nil, "unknown message type"},

		enc("read-request-length-0", ReadRequest{ID: 1, Offset: 0, Length: 0}, "ReadRequest: length 0"),
		enc("read-request-long", ReadRequest{ID: 1, Length: MaxData + 1}, "ReadRequest: length 33554433 above"),
		enc("read-request-overflow", ReadRequest{ID: 1, Offset: math.MaxUint64 - 1, Length: 2}, "ReadRequest: offset 18446744073709551614 + length 2 overflows"),
		enc("read-reply-status", ReadReply{ID: 1, Length: 1, Status: 2}, "ReadReply: status 2 unknown"),
		enc("read-reply-short", ReadReply{ID: 1, Length: 512, Status: ReadOK, Data: data[:511]}, "ReadReply: data of 511 bytes for length 512"),
		enc("read-reply-error-data", ReadReply{ID: 1, Length: 512, Status: ReadError, Data: data}, "ReadReply: data of 512 bytes with status 1"),
		enc("params-protocol-D", params(func(m *Params) { m.Protocol = 'D' }), "Params: protocol 'D'"),
		enc("params-protocol-0", params(func(m *Params) { m.Protocol = 0 }), "Params: protocol"),
		enc("params-after-sb-0pri", params(func(m *Params) { m.AfterSB0 = 8 }), "after-sb-0pri 8"),
		enc("params-after-sb-1pri", params(func(m *Params) { m.AfterSB1 = 0xff }), "after-sb-1pri 255"),
		enc("params-after-sb-2pri", params(func(m *Params) { m.AfterSB2 = 8 }), "after-sb-2pri 8"),
		enc("params-flags", params(func(m *Params) { m.Flags = 1 << 2 }), "Params: reserved flags 0x4"),
		enc("params-flags-high", params(func(m *Params) { m.Flags = 1<<31 | ParamCsums }), "reserved flags 0x80000000"),
		enc("params-max-epoch-0", params(func(m *Params) { m.MaxEpoch = 0 }), "max-epoch-size 0"),
		enc("params-max-epoch-20001", params(func(m *Params) { m.MaxEpoch = 20001 }), "max-epoch-size 20001"),
		enc("params-csums-long", params(func(m *Params) { m.CsumsAlg = strings.Repeat("a", MaxName+1) }), "csums-alg of 65 bytes"),
		enc("params-csums-longest", params(func(m *Params) { m.CsumsAlg = strings.Repeat("a", 255) }), "csums-alg of 255 bytes"),
		enc("params-csums-newline", params(func(m *Params) { m.CsumsAlg = "sha\n256" }), "csums-alg has byte 0xa"),
		enc("params-verify-del", params(func(m *Params) { m.VerifyAlg = "\x7f" }), "verify-alg has byte 0x7f"),
		enc("params-verify-utf8", params(func(m *Params) { m.VerifyAlg = "sha\u00e9" }), "verify-alg has byte 0xc3"),

		enc("state-role", State{Role: 3}, "State: role 3"),
		enc("state-disk", State{Disk: 9}, "State: disk 9"),
		enc("state-flags", State{Flags: 2}, "State: reserved flags 0x2"),

		enc("uuids-flags", UUIDs{Flags: 16}, "UUIDs: reserved flags 0x10"),
		enc("uuids-flags-high", UUIDs{Flags: 1<<63 | UUIDInconsistent}, "UUIDs: reserved flags 0x8000000000000000"),

		enc("bitmap-count-over", Bitmap{Count: 1<<32 + 1, Runs: []uint64{1<<32 + 1}}, "count 4294967297 above"),
		enc("bitmap-overflow", Bitmap{Start: math.MaxUint64, Count: 1, Runs: []uint64{1}}, "overflows"),
		enc("bitmap-overflow-big", Bitmap{Start: math.MaxUint64 - 5, Count: 1 << 32, Runs: []uint64{1 << 32}}, "overflows"),
		enc("bitmap-empty-not-last", Bitmap{Start: 3}, "count 0 in a chunk that is not the last"),
		enc("bitmap-empty-with-run", Bitmap{Last: true, Runs: []uint64{0}}, "1 runs for count 0"),
		enc("bitmap-no-runs", Bitmap{Count: 5}, "runs sum to 0, count 5"),
		enc("bitmap-short", Bitmap{Count: 5, Runs: []uint64{1, 3}}, "runs sum to 4, count 5"),
		enc("bitmap-long", Bitmap{Count: 5, Runs: []uint64{1, 5}}, "runs sum past count 5 at run 1"),
		enc("bitmap-huge-run", Bitmap{Count: 5, Runs: []uint64{1, math.MaxUint64}}, "runs sum past count 5"),
		enc("bitmap-zero-run", Bitmap{Count: 5, Runs: []uint64{1, 0, 4}}, "run 1 is 0"),
		enc("bitmap-zero-tail", Bitmap{Count: 5, Runs: []uint64{0, 5, 0}}, "run 2 is 0"),
		bad{"bitmap-flags", TypeBitmap, runs(2, 5), "Bitmap: reserved flags 0x2"},
		bad{"bitmap-varint-long", TypeBitmap, runs(0, 0x85, 0x00), "run 0 not minimally encoded"},
		bad{"bitmap-varint-long-zero", TypeBitmap, runs(0, 0x80, 0x00, 5), "run 0 not minimally encoded"},
		bad{"bitmap-varint-cut", TypeBitmap, runs(0, 5, 0x80), "payload ends inside run 1"},
		bad{"bitmap-varint-overflow", TypeBitmap,
			runs(0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02), "run 0 overflows"},

		enc("write-offset", Write{Offset: 511, Length: 512, Data: data}, "Write: offset 511 not a multiple of 512"),
		enc("write-length-0", Write{Kind: WriteTrim}, "Write: length 0"),
		enc("write-length-odd", Write{Length: 1000, Kind: WriteTrim}, "length 1000 not a multiple of 512"),
		enc("write-length-over", Write{Length: 40000000, Kind: WriteTrim}, "wire: Write: length 40000000 above the 32 MiB maximum: malformed message"),
		enc("write-length-over-by-one", Write{Length: MaxData + 512, Kind: WriteZeroes}, "above the 32 MiB maximum"),
		enc("write-overflow", Write{Offset: math.MaxUint64 &^ 511, Length: 1024, Kind: WriteTrim}, "overflows"),
		enc("write-kind", Write{Length: 512, Kind: 3}, "Write: kind 3 unknown"),
		enc("write-flags", Write{Length: 512, Kind: WriteTrim, Flags: 4}, "Write: reserved flags 0x4"),
		enc("write-data-short", Write{Length: 1024, Data: data}, "data of 512 bytes for length 1024"),
		enc("write-data-none", Write{Length: 512}, "data of 0 bytes for length 512"),
		enc("write-data-long", Write{Length: 512, Data: append(bytes.Clone(data), data...)}, "data of 1024 bytes for length 512"),
		enc("write-trim-data", Write{Length: 512, Kind: WriteTrim, Data: data}, "data of 512 bytes in a trim"),
		enc("write-zeroes-data", Write{Length: 512, Kind: WriteZeroes, Data: []byte{0}}, "data of 1 bytes in a trim"),

		enc("barrier-flags", Barrier{Epoch: 1, Flags: 2}, "Barrier: reserved flags 0x2"),
		enc("write-ack-status", WriteAck{Status: 2}, "WriteAck: status 2 unknown"),

		enc("resync-request-offset", ResyncRequest{Offset: 512, Length: 4096}, "ResyncRequest: offset 512 not a multiple of 4096"),
		enc("resync-request-length", ResyncRequest{Length: 512}, "length 512 not a multiple of 4096"),
		enc("resync-request-length-0", ResyncRequest{}, "ResyncRequest: length 0"),
		enc("resync-request-length-over", ResyncRequest{Length: MaxData + 4096}, "above the 32 MiB maximum"),
		enc("resync-request-overflow", ResyncRequest{Offset: math.MaxUint64 &^ 4095, Length: 8192}, "overflows"),
		enc("resync-request-digest", ResyncRequest{Length: 4096, Digests: make([]byte, MaxDigest+1)}, "digests of 65 bytes for 1 blocks"),
		enc("resync-request-digests-uneven", ResyncRequest{Length: 8192, Digests: make([]byte, 3)}, "digests of 3 bytes for 2 blocks"),
		enc("resync-request-digests-blocks", ResyncRequest{Length: (MaxCsumsBlocks + 1) * 4096, Digests: make([]byte, MaxCsumsBlocks+1)}, "digests for 257 blocks"),

		enc("resync-reply-status", ResyncReply{Length: 4096, Status: 4}, "ResyncReply: status 4 unknown"),
		enc("resync-reply-partial-none", ResyncReply{Length: 4096, Status: ReplyPartial, Present: []byte{0}}, "data of 0 bytes for 0 blocks marked"),
		enc("resync-reply-partial-past", ResyncReply{Length: 4096, Status: ReplyPartial, Present: []byte{3}, Data: make([]byte, 8192)}, "marks blocks past the range"),
		enc("resync-reply-partial-data", ResyncReply{Length: 8192, Status: ReplyPartial, Present: []byte{3}, Data: make([]byte, 4096)}, "data of 4096 bytes for 2 blocks marked"),
		enc("resync-reply-offset", ResyncReply{Offset: 100, Length: 4096, Status: ReplyInSync}, "offset 100 not a multiple"),
		enc("resync-reply-length-0", ResyncReply{Status: ReplyError}, "length 0"),
		enc("resync-reply-overflow", ResyncReply{Offset: math.MaxUint64 &^ 4095, Length: 4096, Status: ReplyInSync}, "overflows"),
		enc("resync-reply-data-short", ResyncReply{Length: 4096, Data: data}, "data of 512 bytes for length 4096"),
		enc("resync-reply-insync-data", ResyncReply{Length: 4096, Status: ReplyInSync, Data: data}, "data of 512 bytes with status 1"),
		enc("resync-reply-error-data", ResyncReply{Length: 4096, Status: ReplyError, Data: data}, "data of 512 bytes with status 2"),

		enc("resync-ack-status", ResyncAck{Length: 4096, Status: 2}, "ResyncAck: status 2 unknown"),
		enc("resync-ack-length-0", ResyncAck{}, "ResyncAck: length 0"),
		enc("resync-ack-overflow", ResyncAck{Offset: math.MaxUint64 &^ 4095, Length: 4096}, "overflows"),
		enc("resync-ack-length-over", ResyncAck{Length: math.MaxUint32 &^ 4095}, "above the 32 MiB maximum"),

		enc("verify-request-no-digest", VerifyRequest{Length: 4096}, "VerifyRequest: digest of 0 bytes, want 1 to 64"),
		enc("verify-request-digest", VerifyRequest{Length: 4096, Digest: make([]byte, 255)}, "digest of 255 bytes"),
		enc("verify-request-offset", VerifyRequest{Offset: 1, Length: 4096, Digest: []byte{1}}, "offset 1 not a multiple"),
		enc("verify-request-overflow", VerifyRequest{Offset: math.MaxUint64 &^ 4095, Length: 4096, Digest: []byte{1}}, "overflows"),

		enc("verify-reply-status", VerifyReply{Length: 4096, Status: 3}, "VerifyReply: status 3 unknown"),
		enc("verify-reply-length", VerifyReply{Length: 100}, "length 100 not a multiple"),

		enc("out-of-sync-length-0", OutOfSync{}, "OutOfSync: length 0"),
		enc("out-of-sync-offset", OutOfSync{Offset: 512, Length: 4096}, "offset 512 not a multiple"),
		enc("out-of-sync-length-over", OutOfSync{Length: MaxData + 4096}, "above the 32 MiB maximum"),
		enc("out-of-sync-overflow", OutOfSync{Offset: math.MaxUint64 &^ 4095, Length: 4096}, "offset 18446744073709547520 + length 4096 overflows"),

		enc("command-0", Command{}, "Command: code 0 unknown"),
		enc("command-9", Command{Code: 9}, "Command: code 9 unknown"),
		enc("command-255", Command{Code: 255, Arg: 1}, "Command: code 255 unknown"),
		enc("sizes-kind-0", Sizes{Kind: 0}, "Sizes: kind 0 unknown"),
		enc("sizes-kind-5", Sizes{Kind: 5}, "Sizes: kind 5 unknown"),
		enc("sizes-reserved-flag", Sizes{Kind: SizesSet, Flags: 2, Size: 4096}, "Sizes: reserved flags 0x2 set"),
		enc("sizes-flag-on-query", Sizes{Kind: SizesQuery, Flags: SizesAssumeClean}, "Sizes: flags 0x1 on kind 1"),
		enc("sizes-status-3", Sizes{Kind: SizesDone, Status: 3}, "Sizes: status 3 on kind 4"),
		enc("sizes-status-on-set", Sizes{Kind: SizesSet, Status: 1, Size: 4096}, "Sizes: status 1 on kind 3"),
		enc("sizes-disk-misaligned", Sizes{Kind: SizesReply, Disk: 4097}, "Sizes: disk size 4097 not a multiple of 4096"),
		enc("sizes-size-misaligned", Sizes{Kind: SizesSet, Size: 512}, "Sizes: size 512 not a multiple of 4096"),
		enc("sizes-set-zero", Sizes{Kind: SizesSet}, "Sizes: resize to 0 bytes"),
		enc("sizes-disk-over", Sizes{Kind: SizesReply, Disk: MaxSize + 4096}, "Sizes: disk size 72057594037932032 above the maximum"),
		enc("sizes-size-over", Sizes{Kind: SizesSet, Size: math.MaxUint64 &^ 4095}, "Sizes: size 18446744073709547520 above the maximum"),
	)
	return cases
}

func TestMalformed(t *testing.T) {
	for _, c := range malformedCases() {
		t.Run(c.name, func(t *testing.T) {
			m, err := Decode(c.typ, c.p)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Decode = %#v, %v; want an error wrapping ErrMalformed", m, err)
			}
			if m != nil {
				t.Errorf("Decode returned %#v with its error", m)
			}
			if !strings.HasPrefix(err.Error(), "wire: ") || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

// TestMalformedNamesMessage checks that errors of a type name its message.
func TestMalformedNamesMessage(t *testing.T) {
	for _, s := range samples() {
		name := reflect.TypeOf(s.m).Name()
		_, err := Decode(s.m.Type(), nil)
		if err == nil || !strings.HasPrefix(err.Error(), "wire: "+name+": payload of 0 bytes ends inside version") {
			t.Errorf("%s: empty payload gives %v", name, err)
		}
	}
}

// TestDecodeAllocation bounds the bytes Decode allocates by a small
// multiple of the payload, for the payloads that allocate the most.
func TestDecodeAllocation(t *testing.T) {
	runs := bytes.Repeat([]byte{1}, 64<<10)
	tests := []struct {
		name string
		typ  transport.Type
		p    []byte
	}{
		{"bitmap", TypeBitmap, Bitmap{Count: 64 << 10, Last: true, Runs: bytesToRuns(runs)}.Append(nil)},
		{"bitmap-bad", TypeBitmap, append(Encode(Bitmap{Count: 5})[:bitmapHeader], runs...)},
		{"write", TypeWrite, Encode(Write{Length: MaxData, Data: make([]byte, MaxData)})},
		{"params", TypeParams, Encode(Params{Protocol: 'A', MaxEpoch: 1, CsumsAlg: strings.Repeat("x", 64), VerifyAlg: "y"})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const rounds = 20
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range rounds {
				Decode(tt.typ, tt.p)
			}
			runtime.ReadMemStats(&after)
			per := (after.TotalAlloc - before.TotalAlloc) / rounds
			if limit := uint64(8*len(tt.p) + 4096); tt.typ != TypeWrite && per > limit || tt.typ == TypeWrite && per > 4096 {
				t.Errorf("Decode of %d bytes allocates %d bytes", len(tt.p), per)
			}
		})
	}
}

func bytesToRuns(b []byte) []uint64 {
	r := make([]uint64, len(b))
	for i, v := range b {
		r[i] = uint64(v)
	}
	return r
}

// TestSeedCorpus checks that testdata/fuzz/FuzzDecode holds the first
// sample of each type, as encoded now; -update rewrites it.
func TestSeedCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	seen := map[transport.Type]bool{}
	for _, s := range samples() {
		if seen[s.m.Type()] {
			continue
		}
		seen[s.m.Type()] = true
		want := corpusFile(uint16(s.m.Type()), Encode(s.m))
		path := filepath.Join(dir, s.name)
		if *update {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (go test -run TestSeedCorpus -update creates it)", err)
		}
		if string(got) != want {
			t.Errorf("%s differs from the encoder's output (go test -run TestSeedCorpus -update rewrites it)", path)
		}
	}
}

func TestBitmapEach(t *testing.T) {
	b := Bitmap{Start: 100, Count: 12, Runs: []uint64{0, 2, 3, 5, 2}}
	var got [][2]uint64
	b.Each(func(s, n uint64) { got = append(got, [2]uint64{s, n}) })
	if want := [][2]uint64{{100, 2}, {105, 5}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Each gives %v, want %v", got, want)
	}
	Bitmap{Start: 5, Count: 5, Runs: []uint64{5}}.Each(func(s, n uint64) { t.Errorf("Each calls f(%d, %d) on a clear chunk", s, n) })
}

// boolBitmap is a test bitmap of len(set) blocks from start.
type boolBitmap struct {
	start uint64
	set   []bool
}

// next returns the maximal set run at or after from.
func (b boolBitmap) next(from uint64) (uint64, uint64, bool) {
	for i := from - b.start; i < uint64(len(b.set)); i++ {
		if b.set[i] {
			j := i
			for j < uint64(len(b.set)) && b.set[j] {
				j++
			}
			return b.start + i, j - i, true
		}
	}
	return 0, 0, false
}

// nextSingle returns set runs one block long: next may split runs.
func (b boolBitmap) nextSingle(from uint64) (uint64, uint64, bool) {
	s, _, ok := b.next(from)
	return s, 1, ok
}

// nextWhole returns the whole run holding from, start included: next may
// return a run that starts before from.
func (b boolBitmap) nextWhole(from uint64) (uint64, uint64, bool) {
	s, n, ok := b.next(from)
	for ok && s > b.start && b.set[s-1-b.start] {
		s, n = s-1, n+1
	}
	return s, n, ok
}

// runs returns the maximal set runs.
func (b boolBitmap) runs() [][2]uint64 {
	var rs [][2]uint64
	for from := b.start; ; {
		s, n, ok := b.next(from)
		if !ok {
			return rs
		}
		rs = append(rs, [2]uint64{s, n})
		from = s + n
	}
}

// intervals returns a next function over sorted, disjoint set runs.
func intervals(iv [][2]uint64) func(uint64) (uint64, uint64, bool) {
	return func(from uint64) (uint64, uint64, bool) {
		for _, r := range iv {
			s, e := r[0], r[0]+r[1]
			if e <= from {
				continue
			}
			s = max(s, from)
			return s, e - s, true
		}
		return 0, 0, false
	}
}

// checkChunks checks that chunks cover [start, start+count) in order,
// each valid, within its payload bound and surviving a round trip, and
// returns their set runs, merged across chunks.
func checkChunks(t testing.TB, cs []Bitmap, start, count uint64, maxPayload int) [][2]uint64 {
	t.Helper()
	limit := max(maxPayload, minChunkPayload)
	pos := start
	var runs [][2]uint64
	for i, c := range cs {
		if c.Start != pos {
			t.Fatalf("chunk %d starts at %d, want %d", i, c.Start, pos)
		}
		if c.Last != (i == len(cs)-1) {
			t.Fatalf("chunk %d of %d has Last %v", i, len(cs), c.Last)
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		p := Encode(c)
		if len(p) > limit {
			t.Fatalf("chunk %d encodes to %d bytes, above %d", i, len(p), limit)
		}
		back, err := Decode(TypeBitmap, p)
		if err != nil {
			t.Fatalf("chunk %d: Decode: %v", i, err)
		}
		if !reflect.DeepEqual(back, normalize(c)) {
			t.Fatalf("chunk %d decodes to %+v, want %+v", i, back, c)
		}
		c.Each(func(s, n uint64) {
			if k := len(runs) - 1; k >= 0 && runs[k][0]+runs[k][1] == s {
				runs[k][1] += n
				return
			}
			runs = append(runs, [2]uint64{s, n})
		})
		pos += c.Count
	}
	if pos != start+count {
		t.Fatalf("chunks end at %d, want %d", pos, start+count)
	}
	return runs
}

func TestBitmapChunksRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for _, count := range []uint64{1, 2, 7, 64, 1000, 20000} {
		for _, maxRun := range []uint64{1, 3, 50, 5000} {
			for _, maxPayload := range []int{0, 64, 100, 1000, 64 << 10} {
				b := boolBitmap{start: rng.Uint64N(1 << 40), set: make([]bool, count)}
				for i, set := uint64(0), rng.IntN(2) == 0; i < count; set = !set {
					n := 1 + rng.Uint64N(maxRun)
					for ; n > 0 && i < count; n-- {
						b.set[i] = set
						i++
					}
				}
				name := strconv.FormatUint(count, 10) + "/" + strconv.FormatUint(maxRun, 10) + "/" + strconv.Itoa(maxPayload)
				t.Run(name, func(t *testing.T) {
					cs := BitmapChunks(b.start, count, maxPayload, b.next)
					if got, want := checkChunks(t, cs, b.start, count, maxPayload), b.runs(); !reflect.DeepEqual(got, want) {
						t.Fatalf("set runs %v, want %v", got, want)
					}
					others := []struct {
						name string
						next func(uint64) (uint64, uint64, bool)
					}{{"single-block", b.nextSingle}, {"whole", b.nextWhole}}
					for _, o := range others {
						if got := BitmapChunks(b.start, count, maxPayload, o.next); !reflect.DeepEqual(got, cs) {
							t.Fatalf("next returning %s runs gives other chunks:\n%+v\nwant\n%+v", o.name, got, cs)
						}
					}
				})
			}
		}
	}
}

func TestBitmapChunksEdges(t *testing.T) {
	none := func(uint64) (uint64, uint64, bool) { return 0, 0, false }
	tests := []struct {
		name         string
		start, count uint64
		next         func(uint64) (uint64, uint64, bool)
		want         []Bitmap
	}{
		{"empty", 7, 0, none, []Bitmap{{Start: 7, Last: true}}},
		{"all-clear", 3, 1000, none, []Bitmap{{Start: 3, Count: 1000, Last: true, Runs: []uint64{1000}}}},
		{"all-set", 3, 1000, intervals([][2]uint64{{0, 5000}}),
			[]Bitmap{{Start: 3, Count: 1000, Last: true, Runs: []uint64{0, 1000}}}},
		{"clipped", 100, 50, intervals([][2]uint64{{90, 20}, {140, 100}}),
			[]Bitmap{{Start: 100, Count: 50, Last: true, Runs: []uint64{0, 10, 30, 10}}}},
		{"starts-before-from", 100, 50, func(from uint64) (uint64, uint64, bool) { return 90, 20, from < 110 },
			[]Bitmap{{Start: 100, Count: 50, Last: true, Runs: []uint64{0, 10, 40}}}},
		{"past-the-end", 100, 50, intervals([][2]uint64{{150, 10}}),
			[]Bitmap{{Start: 100, Count: 50, Last: true, Runs: []uint64{50}}}},
		{"empty-run", 0, 10, func(uint64) (uint64, uint64, bool) { return 4, 0, true },
			[]Bitmap{{Start: 0, Count: 10, Last: true, Runs: []uint64{10}}}},
		{"cut-at-2^64", math.MaxUint64 - 10, 100, intervals([][2]uint64{{math.MaxUint64 - 2, 2}}),
			[]Bitmap{{Start: math.MaxUint64 - 10, Count: 10, Last: true, Runs: []uint64{8, 2}}}},
		{"huge-clear", 0, 3<<32 + 5, none, []Bitmap{
			{Start: 0, Count: 1 << 32, Runs: []uint64{1 << 32}},
			{Start: 1 << 32, Count: 1 << 32, Runs: []uint64{1 << 32}},
			{Start: 2 << 32, Count: 1 << 32, Runs: []uint64{1 << 32}},
			{Start: 3 << 32, Count: 5, Last: true, Runs: []uint64{5}},
		}},
		{"huge-set", 1, 2<<32 + 5, intervals([][2]uint64{{0, math.MaxUint64}}), []Bitmap{
			{Start: 1, Count: 1 << 32, Runs: []uint64{0, 1 << 32}},
			{Start: 1<<32 + 1, Count: 1 << 32, Runs: []uint64{0, 1 << 32}},
			{Start: 2<<32 + 1, Count: 5, Last: true, Runs: []uint64{0, 5}},
		}},
		{"huge-crossing", 0, 2<<32 + 5, intervals([][2]uint64{{1<<32 - 10, 20}, {2<<32 - 3, 3}, {2<<32 + 4, 1}}), []Bitmap{
			{Start: 0, Count: 1 << 32, Runs: []uint64{1<<32 - 10, 10}},
			{Start: 1 << 32, Count: 1 << 32, Runs: []uint64{0, 10, 1<<32 - 13, 3}},
			{Start: 2 << 32, Count: 5, Last: true, Runs: []uint64{4, 1}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs := BitmapChunks(tt.start, tt.count, 64<<10, tt.next)
			if !reflect.DeepEqual(cs, tt.want) {
				t.Fatalf("BitmapChunks = %+v\nwant %+v", cs, tt.want)
			}
			checkChunks(t, cs, tt.start, min(tt.count, math.MaxUint64-tt.start), 64<<10)
		})
	}
}

// TestBitmapChunksSmall checks chunk splitting at the payload bound: an
// alternating bitmap at the smallest bound, whose chunks must each hold
// as many runs as fit.
func TestBitmapChunksSmall(t *testing.T) {
	b := boolBitmap{start: 0, set: make([]bool, 1000)}
	for i := range b.set {
		b.set[i] = i%2 == 1
	}
	cs := BitmapChunks(0, 1000, 1, b.next)
	checkChunks(t, cs, 0, 1000, 1)
	for i, c := range cs[:len(cs)-1] {
		if n := len(Encode(c)); n < minChunkPayload-1 {
			t.Errorf("chunk %d of %d bytes: not full", i, n)
		}
	}
}
