"""Edge cases through libnbd with strict mode off (run by integration tests).

Usage: python3 edges.py RW_URI RO_URI
Prints one JSON object: case name -> errno number (0 = success). Every case
is followed by a valid read on the same connection, recorded as
"<case>/usable", so a server that drops or desynchronises the connection
shows up as a non-zero value there.
"""
import json
import sys

sys.path.insert(0, "/usr/lib/python3/dist-packages")  # system libnbd bindings
import nbd  # noqa: E402

MiB = 1 << 20


def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def errnum(fn):
    try:
        fn()
        return 0
    except nbd.Error as e:
        return e.errnum or -1


def run(rw_uri, ro_uri):
    res = {}
    h = connect(rw_uri)
    size = h.get_size()

    def case(name, fn, conn=h):
        res[name] = errnum(fn)
        res[name + "/usable"] = errnum(lambda: conn.pread(512, 0))

    case("read straddling the end", lambda: h.pread(1024, size - 512))
    case("read past the end", lambda: h.pread(512, size + 4096))
    case("read at 2^63-512", lambda: h.pread(512, 2**63 - 512))
    case("write straddling the end", lambda: h.pwrite(b"x" * 1024, size - 512))
    case("trim past the end", lambda: h.trim(4096, size))
    case("zero past the end", lambda: h.zero(4096, size))
    case("unknown command flag", lambda: h.pread(512, 0, 0x8000))
    case("NO_HOLE on read", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
    case("FAST_ZERO not advertised", lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO))
    case("CACHE not advertised", lambda: h.cache(512, 0))
    case("33 MiB read", lambda: h.pread(33 * MiB, 0))
    case("33 MiB write", lambda: h.pwrite(bytes(33 * MiB), 0))
    case("zero-length read", lambda: h.pread(0, 0))
    case("FUA write", lambda: h.pwrite(b"a" * 4096, 0, nbd.CMD_FLAG_FUA))
    case("flush", lambda: h.flush())
    case("FUA trim", lambda: h.trim(4096, 8192, nbd.CMD_FLAG_FUA))

    # Write-zeroes (with and without NO_HOLE) and trim must read back as
    # zeroes; a failed check is recorded as errno -2.
    def zero_check(flags):
        h.pwrite(b"\xff" * 65536, MiB)
        h.zero(65536, MiB, flags)
        if h.pread(65536, MiB) != bytes(65536):
            raise nbd.Error("not zero", -2)

    case("write zeroes reads back zero", lambda: zero_check(0))
    case("write zeroes NO_HOLE reads back zero", lambda: zero_check(nbd.CMD_FLAG_NO_HOLE))

    # 64 queued reads on one connection all complete.
    def queued():
        bufs = [nbd.Buffer(4096) for _ in range(64)]
        cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
        pending = set(cookies)
        while pending:
            h.poll(-1)
            for c in list(pending):
                if h.aio_command_completed(c):
                    pending.discard(c)

    case("64 queued reads", queued)

    # A flush on connection 2 covers writes completed on connection 1
    # (CAN_MULTI_CONN), and connection 2 reads them.
    h2 = connect(rw_uri)
    res["multi-conn advertised"] = 0 if h2.can_multi_conn() else -3

    def multi():
        h.pwrite(b"M" * 8192, 2 * MiB)
        h2.flush()
        if h2.pread(8192, 2 * MiB) != b"M" * 8192:
            raise nbd.Error("connection 2 does not see connection 1's write", -2)

    case("flush covers other connections", multi, conn=h2)

    ro = connect(ro_uri)
    res["read-only advertised"] = 0 if ro.is_read_only() else -3
    case("read-only write", lambda: ro.pwrite(b"x" * 512, 0), conn=ro)
    case("read-only trim", lambda: ro.trim(512, 0), conn=ro)
    case("read-only zero", lambda: ro.zero(512, 0), conn=ro)
    case("read-only flush", lambda: ro.flush(), conn=ro)

    for c in (h, h2, ro):
        c.shutdown()
    return res


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2]), indent=1, sort_keys=True))
