#!/usr/bin/env python3
"""Summarise the fio JSON of scripts/bench.sh into BENCHMARKS.md.

Usage: bench_report.py OUTDIR BENCHMARKS.md

Replaces the text between the markers of the "NBD front end" section (or
appends the section) with medians over rounds, ratios against nbdkit, the
1 ms latency scaling table, the machine and the commands; likewise the
"Resource write path" section (ratios against `nbdmirror serve`, activity-log
transactions per 1,000 writes), the bitmap and metadata section, the peer
transport section and the "Replication" section (fio alone / protocol A /
protocol C, replication lag, resync against rsync), each only when its part
ran.
"""
import datetime
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys

START = "<!-- bench:nbd:start -->"
END = "<!-- bench:nbd:end -->"
META_START = "<!-- bench:meta:start -->"
META_END = "<!-- bench:meta:end -->"
TR_START = "<!-- bench:transport:start -->"
TR_END = "<!-- bench:transport:end -->"
RES_START = "<!-- bench:resource:start -->"
RES_END = "<!-- bench:resource:end -->"
REP_START = "<!-- bench:replication:start -->"
REP_END = "<!-- bench:replication:end -->"


def load(outdir, sub="json"):
    """fio results of OUTDIR/SUB by (server, rw, bs, qd), one entry per
    round; "al" is the activity-log transactions during the job where a .al
    file (counters.al before and after) sits next to the JSON."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(outdir, sub, "*.json"))):
        server, rw, bs, qd, _round = os.path.basename(path)[: -len(".json")].split(".")
        with open(path) as f:
            job = json.load(f)["jobs"][0]
        d = job["write"] if job["write"]["io_bytes"] else job["read"]
        run = {
            "iops": d["iops"],
            "mibs": d["bw"] / 1024,
            "p99_us": d["clat_ns"]["percentile"]["99.000000"] / 1000,
            "mean_us": d["clat_ns"]["mean"] / 1000,
            "ios": d["total_ios"],
        }
        al = path[: -len(".json")] + ".al"
        if os.path.exists(al):
            with open(al) as f:
                before, after = (int(x) for x in f.read().split())
            run["al"] = after - before
        cpu = cpu_seconds(path[: -len(".json")] + ".cpu")
        if cpu:
            run["cpu_us"] = cpu[0] * 1e6 / max(1, d["total_ios"])
            run["busy"] = cpu[1]
        runs.setdefault((server, rw, bs, qd), []).append(run)
    return runs


def cpu_seconds(path):
    """(busy CPU seconds, busy share of the machine) between the two
    `busy total` lines (clock ticks) of PATH, or None."""
    try:
        with open(path) as f:
            (b0, t0), (b1, t1) = (map(int, line.split()) for line in f.read().splitlines()[:2])
    except (OSError, ValueError):
        return None
    if t1 <= t0:
        return None
    return (b1 - b0) / os.sysconf("SC_CLK_TCK"), (b1 - b0) / (t1 - t0)


def durable_writer(rdir, runs):
    """The paragraph on what durable 4 KiB writes cost this machine without
    nbdmirror, and the ceiling that puts on protocol A; [] without data."""
    def per_write(name):
        path = os.path.join(rdir, name + ".json")
        cpu = cpu_seconds(os.path.join(rdir, name + ".cpu"))
        if not os.path.exists(path) or not cpu:
            return None
        d = read_json(path)["jobs"][0]["write"]
        return d["iops"], cpu[0] * 1e6 / max(1, d["total_ios"])

    alone = runs.get(("alone", "randwrite", "4k", "qd32"))
    proto_a = runs.get(("protoA", "randwrite", "4k", "qd32"))
    proto_c = runs.get(("protoC", "randwrite", "4k", "qd32"))
    dw = per_write("durable-writer")
    if not dw or not alone or not proto_a or not proto_c or not all("cpu_us" in x for x in alone + proto_a + proto_c):
        return []
    iops, dw_us = dw
    a_us, p_us, c_us = med(alone, "cpu_us"), med(proto_a, "cpu_us"), med(proto_c, "cpu_us")
    lines = [
        "",
        f"What the Secondary's durability costs here, without nbdmirror: fio writing 4 KiB blocks at "
        f"random into a 1 GiB file made like the disks with `fdatasync` after every 256 (about the group "
        f"commit the Secondary reaches under this load), one thread, {iops:,.0f} writes/s, took "
        f"{dw_us:,.1f} µs of machine CPU per write (page-cache copy, writeback): what a protocol C "
        f"Secondary does with the 4 KiB writes it acks. The whole *alone* path took {a_us:,.1f} µs per "
        f"write (fio, the NBD exchange, the Primary's own buffered write). A Secondary that writes every "
        f"block so and makes it durable adds at least the first to the second, before any network or "
        f"replication cost: on these 2 CPUs protocol C at 4 KiB is bounded by about {a_us:,.1f} ÷ "
        f"({a_us:,.1f} + {dw_us:,.1f}) = {a_us / (a_us + dw_us):.2f}× alone by CPU (and by its round "
        f"trips, below); it measured {c_us:,.1f} µs per write. A protocol A Secondary hands its 4 KiB "
        f"writes to the disk around the page cache without waiting for them (AIO), which costs it less: "
        f"protocol A measured {p_us:,.1f} µs per write, {p_us - a_us:,.1f} µs beyond *alone* for the "
        f"link (TCP both ways, framing and checksums, the Secondary's receive), the Secondary's writes "
        f"and the replication bookkeeping.",
    ]
    sparse = per_write("durable-writer-sparse")
    s_alone = runs.get(("sparse-alone", "randwrite", "4k", "qd32"))
    if sparse and s_alone and all("cpu_us" in x for x in s_alone):
        sa_us = med(s_alone, "cpu_us")
        lines[-1] += (f" On a sparse file the same writer took {sparse[1]:,.1f} µs per write "
                      f"({sparse[0]:,.0f} writes/s; ext4's delayed allocation places every block as "
                      f"it is written back), against {sa_us:,.1f} µs per write for *alone* there: a "
                      f"bound of {sa_us / (sa_us + sparse[1]):.2f}× for protocol C in the sparse disk files rows.")
    big = per_write("durable-writer-1M")
    alone1 = runs.get(("alone", "write", "1M", "qd8"))
    rep1 = [(label, runs.get((cfg, "write", "1M", "qd8"))) for cfg, label in (("protoA", "protocol A"),
                                                                              ("protoC", "protocol C"))]
    if big and alone1 and all("cpu_us" in x for x in alone1):
        a1 = med(alone1, "cpu_us")
        measured = "; ".join(f"{label} {med(r, 'cpu_us'):,.1f} µs per MiB at {med(r, 'mibs'):,.0f} MiB/s"
                             for label, r in rep1 if r and all("cpu_us" in x for x in r))
        lines += ["", f"At 1 MiB the Secondary writes around the page cache (`O_DIRECT`, several writes at "
                  f"once); the same kind of writer (1 MiB blocks in sequence, `O_DIRECT`, 8 in flight, "
                  f"`fdatasync` after every 8) made {big[0]:,.0f} MiB/s durable, with the machine to itself, at {big[1]:,.1f} µs of CPU "
                  f"per MiB; *alone* took {a1:,.1f} µs per MiB at {med(alone1, 'mibs'):,.0f} MiB/s without "
                  f"touching the disk. A Secondary that makes every MiB durable bounds the 1 MiB jobs twice: "
                  f"by CPU at about {a1:,.1f} ÷ ({a1:,.1f} + {big[1]:,.1f}) = {a1 / (a1 + big[1]):.2f}× alone "
                  f"before any network cost, and by the disk at {big[0]:,.0f} ÷ {med(alone1, 'mibs'):,.0f} = "
                  f"{big[0] / med(alone1, 'mibs'):.2f}× alone. Measured: {measured}."]
    return lines


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - a missing tool just reads "unknown"
        return "unknown"


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"- Date: {datetime.date.today().isoformat()}",
        f"- CPU: {os.cpu_count()} × {model}; kernel {platform.release()}",
        f"- {version(['go', 'version'])}; {version(['fio', '--version'])}",
        f"- {version(['qemu-nbd', '--version'])}; {version(['nbdkit', '--version'])}; "
        f"{version(['nbd-server', '-V'])}",
        "- Shared, noisy machine: compare ratios within one run, not absolute numbers across runs.",
    ]


def section(outdir):
    runs = load(outdir)
    rounds = max((len(v) for v in runs.values()), default=0)
    lines = [START, "## NBD front end (`nbdmirror serve`)", ""]
    lines += machine()
    lines += [
        "",
        f"fio's nbd engine over TCP on 127.0.0.1, one connection, a fresh sparse 1 GiB file per server, "
        f"servers alternating with the order rotated each round; medians of {rounds} rounds "
        "(`make bench`, `scripts/bench.sh`). Ratios are nbdmirror ÷ nbdkit in the same run "
        "(target: IOPS ≥ 1.0×, p99 ≤ 1.2×).",
        "",
        "| job | server | IOPS | MiB/s | mean lat µs | p99 lat µs | IOPS × nbdkit | p99 × nbdkit | rounds (IOPS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    jobs = [("randwrite", "4k", "qd32", "4 KiB random write, iodepth 32"),
            ("randread", "4k", "qd32", "4 KiB random read, iodepth 32"),
            ("write", "1M", "qd8", "1 MiB sequential write, iodepth 8")]
    verdicts = []
    for rw, bs, qd, title in jobs:
        base = runs.get(("nbdkit", rw, bs, qd))
        for server in ("nbdmirror", "nbdkit", "qemu-nbd", "nbd-server"):
            r = runs.get((server, rw, bs, qd))
            if not r:
                continue
            ratio = p99r = ""
            if base:
                ratio = f"{med(r, 'iops') / med(base, 'iops'):.2f}×"
                p99r = f"{med(r, 'p99_us') / med(base, 'p99_us'):.2f}×"
            if server == "nbdmirror" and base:
                ok = med(r, "iops") >= med(base, "iops") and med(r, "p99_us") <= 1.2 * med(base, "p99_us")
                verdicts.append(f"{title}: {ratio} IOPS, {p99r} p99 — {'meets' if ok else 'MISSES'} the target")
            each = " / ".join(f"{x['iops']:,.0f}" for x in r)
            lines.append(
                f"| {title} | {server} | {med(r, 'iops'):,.0f} | {med(r, 'mibs'):,.0f} | "
                f"{med(r, 'mean_us'):,.0f} | {med(r, 'p99_us'):,.0f} | {ratio} | {p99r} | {each} |"
            )
    lines += ["", "Verdict:", ""] + [f"- {v}" for v in verdicts]
    lines += [
        "",
        "### With 1 ms of backend latency",
        "",
        "4 KiB random writes where every backend call first sleeps 1 ms (`internal/benchserve`, the "
        "same server with a delaying backend wrapper), next to nbdkit's delay filter "
        "(`rdelay=1ms wdelay=1ms`, 16 threads per connection). A replicated backend waits like "
        "this, so IOPS must grow with iodepth (target ≥ 20,000 at iodepth 32).",
        "",
        "| iodepth | nbdmirror IOPS | p99 µs | nbdkit + delay IOPS | p99 µs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for qd in ("qd1", "qd8", "qd32", "qd128"):
        a = runs.get(("nbdmirror-delay", "randwrite", "4k", qd))
        b = runs.get(("nbdkit-delay", "randwrite", "4k", qd))
        if not a:
            continue
        cell = lambda r, k: f"{med(r, k):,.0f}" if r else "–"  # noqa: E731
        lines.append(f"| {qd[2:]} | {cell(a, 'iops')} | {cell(a, 'p99_us')} | {cell(b, 'iops')} | {cell(b, 'p99_us')} |")
    gobench = os.path.join(outdir, "gobench.txt")
    if os.path.exists(gobench):
        with open(gobench) as f:
            bench = [l.rstrip() for l in f if l.startswith("Benchmark")]
        lines += ["", "### Go micro-benchmarks (`go test -bench . ./nbd/`)", "", "```"] + bench + ["```"]
    lines += ["", END]
    return "\n".join(lines)


def gobench(path):
    """Benchmark lines of a go test -bench output: name -> list of (value, unit)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.startswith("Benchmark"):
                continue
            fields = line.split()
            name = re.sub(r"-\d+$", "", fields[0])
            out[name] = [(fields[i], fields[i + 1]) for i in range(2, len(fields) - 1, 2)]
    return out


def meta_section(outdir):
    bm = gobench(os.path.join(outdir, "bitmap.txt"))
    md = gobench(os.path.join(outdir, "metadisk.txt"))
    if not bm and not md:
        return None
    lines = [META_START, "## Bitmap and metadata", ""] + machine()
    lines += [
        "",
        "`go test -bench . ./bitmap/` and `go test -bench ALTransactions ./metadisk/` (`make bench`).",
        "",
        "### Bitmap of a 1 TiB device (2^28 blocks, 32 MiB)",
        "",
        "| operation | time | throughput | allocations |",
        "|---|---:|---:|---:|",
    ]
    titles = {
        "BenchmarkBitmap1TiB_SetRandom4K": "set one random block (a 4 KiB write)",
        "BenchmarkBitmap1TiB_Set1MiB": "set 256 blocks (a 1 MiB write)",
        "BenchmarkBitmap1TiB_NextRun": "walk every dirty run, 1 % dirty (plan a resync)",
        "BenchmarkBitmap1TiB_Or": "OR-merge two bitmaps (connect)",
        "BenchmarkPage_EncodeDecode": "encode + verify + load one 4 KiB page",
        "BenchmarkActivityLog_Hit": "activity-log check of a write to a logged extent",
    }
    for name, title in titles.items():
        v = dict((u, x) for x, u in bm.get(name, []))
        if not v:
            continue
        ns = float(v.get("ns/op", "0"))
        t = f"{ns / 1e6:,.1f} ms" if ns > 1e5 else f"{ns:,.0f} ns"
        mbs = f"{float(v['MB/s']):,.0f} MB/s" if "MB/s" in v else "–"
        lines.append(f"| {title} | {t} | {mbs} | {v.get('allocs/op', '–')} |")
    lines += [
        "",
        "### Activity-log transactions per 1,000 random 4 KiB writes",
        "",
        "On a real file with fdatasync, after every extent of the working set was touched once; "
        "al-extents is the default 1,237 (target: < 1 when the working set fits).",
        "",
        "| working set | AL transactions / 1,000 writes | bitmap pages written / 1,000 writes | mean time per write |",
        "|---|---:|---:|---:|",
    ]
    for name, title in (("BenchmarkALTransactions/fits", "1,000 extents (4 GB): fits"),
                        ("BenchmarkALTransactions/exceeds", "4,000 extents (16 GB): does not fit")):
        v = dict((u, x) for x, u in md.get(name, []))
        if v:
            lines.append(f"| {title} | {float(v['tx/1000writes']):.1f} | {float(v['pages/1000writes']):.1f} | "
                         f"{float(v['ns/op']) / 1000:,.1f} µs |")
    lines += ["", META_END]
    return "\n".join(lines)


def transport_section(outdir):
    tr = gobench(os.path.join(outdir, "transport.txt"))
    if not tr:
        return None
    val = lambda name, unit: dict((u, x) for x, u in tr.get(name, [])).get(unit)  # noqa: E731
    lines = [TR_START, "## Peer transport", ""] + machine()
    lines += [
        "",
        "`go test -bench 'Session|Compression|LimiterAccuracy' ./transport/` (`make bench`): one session over TCP "
        "on loopback, sender and receiver in one process on the same 2 CPUs.",
        "",
        "### Session throughput (data stream)",
        "",
        "| message | plain (xxhash64) | sealed (AES-256-GCM) | sealed ÷ plain |",
        "|---|---:|---:|---:|",
    ]
    for size in ("4KiB", "1024KiB"):
        p, s = val(f"BenchmarkSession/plain/{size}", "MB/s"), val(f"BenchmarkSession/sealed/{size}", "MB/s")
        if p and s:
            lines.append(f"| {size.replace('1024KiB', '1 MiB').replace('4KiB', '4 KiB')} | {float(p):,.0f} MB/s | "
                         f"{float(s):,.0f} MB/s | {float(s) / float(p):.2f} |")
    lines += ["", "Targets: sealed ≥ 0.7 × plain at 1 MiB, and ≥ 1 GB/s.", "",
              "### Compression of 1 MiB frames", "",
              "| method | payload | throughput | payload ÷ wire |", "|---|---|---:|---:|"]
    for comp in ("s2", "zstd"):
        for data in ("compressible", "incompressible"):
            name = f"BenchmarkCompression/{comp}/{data}"
            mbs, ratio = val(name, "MB/s"), val(name, "ratio")
            if mbs:
                what = "text log lines" if data == "compressible" else "random bytes (sent uncompressed)"
                lines.append(f"| {comp} | {what} | {float(mbs):,.0f} MB/s | {float(ratio):,.2f} |")
    got, err = val("BenchmarkLimiterAccuracy", "MiB/s"), val("BenchmarkLimiterAccuracy", "error%")
    if got:
        lines += ["", "### Resync rate limiter", "",
                  f"64 KiB chunks through a session for 10 s with the limiter at 1 MiB/s: "
                  f"**{float(got):.3f} MiB/s, {float(err):+.2f} %** (target ±5 %)."]
    lines += ["", TR_END]
    return "\n".join(lines)


def resource_section(outdir):
    runs = load(outdir, "resource")
    if not runs:
        return None
    rounds = max(len(v) for v in runs.values())
    lines = [RES_START, "## Resource write path (`nbdmirror daemon`, no peer)", ""] + machine()
    vfile = os.path.join(outdir, "resource", "version.txt")
    if os.path.exists(vfile):
        with open(vfile) as f:
            lines.append(f"- {f.read().strip()}")
    lines += [
        "",
        "A resource served by the node daemon (`nbdmirror daemon --up r0`, then `primary --force r0`: "
        "internal metadata, md-flushes on, no peer, so every write is covered by the activity log and "
        "marks the bitmap) next to `nbdmirror serve`, each on a fresh sparse 1 GiB file (`create-md` "
        "first for the resource), fio's nbd engine over TCP on 127.0.0.1, one connection, the same jobs "
        "as the NBD front end over the first 1000 MiB (the resource's data area is 1,023 MiB); servers "
        f"alternating with the order rotated each round, medians of {rounds} rounds "
        "(`BENCH=resource make bench`). Ratios are resource ÷ serve in the same run (targets: IOPS ≥ 0.9× "
        "for 4 KiB random writes with the working set inside the activity log, ≥ 0.95× for 1 MiB "
        "sequential writes). With al-extents 61 (244 MiB) the 4 KiB random writes range over 4× the "
        "activity log, so writes keep waiting for activity-log transactions (informational); AL "
        "transactions per 1,000 writes are counters.al of `nbdmirror status --json` before and after the "
        "job, over fio's writes.",
        "",
        "| job | server | IOPS | MiB/s | mean lat µs | p99 lat µs | IOPS × serve | p99 × serve "
        "| AL tx / 1,000 writes | rounds (IOPS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    jobs = [("randwrite", "4k", "qd32", "4 KiB random write, iodepth 32", 0.9),
            ("randread", "4k", "qd32", "4 KiB random read, iodepth 32", None),
            ("write", "1M", "qd8", "1 MiB sequential write, iodepth 8", 0.95)]
    servers = (("nbdmirror", "`nbdmirror serve`"), ("resource", "resource, al-extents 1237"),
               ("resource-al61", "resource, al-extents 61"))
    verdicts = []
    for rw, bs, qd, title, target in jobs:
        base = runs.get(("nbdmirror", rw, bs, qd))
        for server, label in servers:
            r = runs.get((server, rw, bs, qd))
            if not r:
                continue
            ratio = p99r = ""
            if base:
                ratio = f"{med(r, 'iops') / med(base, 'iops'):.2f}×"
                p99r = f"{med(r, 'p99_us') / med(base, 'p99_us'):.2f}×"
            al = [x for x in r if "al" in x]
            per1000 = "–"
            if al and len(al) == len(r):
                per1000 = f"{statistics.median(1000 * x['al'] / x['ios'] for x in al):,.2f}"
            if server != "nbdmirror" and base and rw != "randread":
                if server == "resource-al61":
                    verdicts.append(f"{title}, working set 4× al-extents 61: {ratio} IOPS, {p99r} p99, "
                                    f"{per1000} AL transactions per 1,000 writes (informational)")
                elif target:
                    ok = med(r, "iops") >= target * med(base, "iops")
                    verdicts.append(f"{title}: {ratio} IOPS, {p99r} p99 — "
                                    f"{'meets' if ok else 'MISSES'} the target (≥ {target}×)")
            each = " / ".join(f"{x['iops']:,.0f}" for x in r)
            lines.append(
                f"| {title} | {label} | {med(r, 'iops'):,.0f} | {med(r, 'mibs'):,.0f} | "
                f"{med(r, 'mean_us'):,.0f} | {med(r, 'p99_us'):,.0f} | {ratio} | {p99r} | {per1000} | {each} |"
            )
    lines += ["", "Verdict:", ""] + [f"- {v}" for v in verdicts]
    lines += ["", RES_END]
    return "\n".join(lines)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_text(path, default=""):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return f.read().strip()


def rounds_of(pattern):
    """{round: path} of the files matching pattern (with {} for the round)."""
    out = {}
    name = re.compile(re.escape(os.path.basename(pattern)).replace(r"\{\}", r"(\d+)"))
    for path in glob.glob(pattern.format("*")):
        m = name.fullmatch(os.path.basename(path))
        if m:
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def mib(n):
    return f"{n / 2**20:,.1f} MiB"


def secs(t):
    return f"{t * 1000:,.0f} ms" if t < 10 else f"{t:,.1f} s"


def rsync_stat(text, name):
    m = re.search(rf"^{re.escape(name)}: ([\d,]+)", text, re.M)
    return int(m.group(1).replace(",", "")) if m else None


def log_field(line, key):
    m = re.search(rf"\b{key}=(\S+)", line)
    return float(m.group(1)) if m else None


def replication_section(outdir):
    rdir = os.path.join(outdir, "replication")
    runs = load(outdir, "replication/json")
    lags = rounds_of(os.path.join(rdir, "lag.r{}.json"))
    bitmap = rounds_of(os.path.join(rdir, "resync.bitmap.r{}.json"))
    if not runs and not lags and not bitmap:
        return None
    lines = [REP_START, "## Replication (two nodes)", ""] + machine()
    for name in ("version.txt", "rsync-version.txt"):
        v = read_text(os.path.join(rdir, name))
        if v:
            lines.append(f"- {' '.join(v.splitlines()[0].split())}")
    took = read_text(os.path.join(rdir, "seconds.txt"))
    load_start = read_text(os.path.join(rdir, "loadavg.start")).split()[:3]
    load_end = read_text(os.path.join(rdir, "loadavg.end")).split()[:3]
    if took:
        lines.append(f"- `BENCH=replication make bench` took {int(took) / 60:.1f} min; load average "
                     f"{' '.join(load_start)} before, {' '.join(load_end)} after")
    lines += [
        "",
        "alpha and beta are two node daemons (`nbdmirror daemon`, log level info), each in its own network "
        "namespace, joined by a veth pair with 10.x addresses; each has a 1 GiB disk file with internal "
        "metadata (a data area of 1,023 MiB). fio and the admin verbs run in the script's namespace and "
        "reach alpha's export and both control sockets through their Unix sockets, so the NBD path is the "
        "same in every configuration. Both nodes and fio share the machine's CPUs. Peer options: "
        "`c-plan-ahead 0; resync-rate 4G` (the limiter never limits), everything else default "
        "(al-extents 1237, max-epoch-size 2048, no link compression, no shared secret).",
    ]

    # 1. fio
    if runs:
        n = max(len(v) for v in runs.values())
        lines += [
            "",
            "### Write throughput: alone, protocol A, protocol C",
            "",
            "fio's nbd engine on `nbd+unix:///r0?socket=<alpha>/nbd.sock`, one connection, over the first "
            "1000 MiB, RUNTIME seconds per job. *alone*: only alpha's daemon, `up`, `disconnect` "
            "(StandAlone), `primary --force` — the resource path of the section above. *protocol A / C*: "
            "both daemons, `up`, `wait-connect`, `new-current-uuid --clear-bitmap` on alpha (skips the "
            "initial sync), `primary` on alpha. Every configuration and round gets fresh disks, "
            "`create-md` and new daemons; the configurations alternate with the order rotated each round; "
            "with a peer, the 1 MiB job starts once alpha's pe is back to 0. The disks are 1 GiB files "
            "written in full with O_DIRECT (`dd oflag=direct conv=fsync`): every block is allocated and "
            "none is in the page cache when the job starts, as with the partition or logical volume a "
            "DRBD backing device is. The *sparse disk files* rows (informational, ratios to alone on "
            "sparse files) start from `truncate` instead: ext4 then allocates each block when the "
            "Secondary's flushes write it back, which a block device never does. Medians of "
            f"{n} round{'s' if n != 1 else ''}. Targets (this 2-CPU machine runs both nodes and fio): protocol A ≥ 0.5 × alone, "
            "protocol C ≥ 0.35 × alone.",
            "",
            "*CPU per I/O* is the whole machine's busy CPU time during the job (user, system, irq; "
            "`/proc/stat`) divided by the I/Os done, with the machine's busy share in brackets: "
            "fio, both daemons and the kernel's work for them, on 2 CPUs.",
            "",
            "| job | configuration | IOPS | MiB/s | mean lat µs | p99 lat µs | CPU per I/O | IOPS ÷ alone "
            "| p99 ÷ alone | rounds (IOPS) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        verdicts = []
        for rw, bs, qd, title in (("randwrite", "4k", "qd32", "4 KiB random write, iodepth 32"),
                                  ("write", "1M", "qd8", "1 MiB sequential write, iodepth 8")):
            for cfg, label, target, cqd, against in (
                    ("alone", "alone (StandAlone)", None, qd, "alone"),
                    ("protoA", "protocol A", 0.5, qd, "alone"),
                    ("protoC", "protocol C", 0.35, qd, "alone"),
                    ("protoAnf", "protocol A, `disk-flushes no`", None, qd, "alone"),
                    ("protoCnf", "protocol C, `disk-flushes no`", None, qd, "alone"),
                    ("protoC128", "protocol C, iodepth 128", None, "qd128", "alone"),
                    ("sparse-alone", "alone, sparse disk files", None, qd, "sparse-alone"),
                    ("sparse-protoA", "protocol A, sparse disk files", None, qd, "sparse-alone"),
                    ("sparse-protoC", "protocol C, sparse disk files", None, qd, "sparse-alone")):
                r = runs.get((cfg, rw, bs, cqd))
                if not r:
                    continue
                base = runs.get((against, rw, bs, qd))
                ratio = p99r = ""
                if base and cqd == qd:  # another iodepth: no ratio to alone at this one
                    q = med(r, "iops") / med(base, "iops")
                    ratio, p99r = f"{q:.2f}×", f"{med(r, 'p99_us') / med(base, 'p99_us'):.2f}×"
                    if target:
                        verdicts.append(f"{title}, {label}: {ratio} alone ({med(r, 'iops'):,.0f} vs "
                                        f"{med(base, 'iops'):,.0f} IOPS), p99 {p99r} — "
                                        f"{'meets' if q >= target else 'MISSES'} the target (≥ {target}×)")
                each = " / ".join(f"{x['iops']:,.0f}" for x in r)
                cpu = ""
                if all("cpu_us" in x for x in r):
                    cpu = f"{med(r, 'cpu_us'):,.1f} µs ({med(r, 'busy'):.0%})"
                row = title if cqd == qd else f"{title.split(',')[0]}, iodepth {cqd[2:]}"
                lines.append(f"| {row} | {label} | {med(r, 'iops'):,.0f} | {med(r, 'mibs'):,.0f} | "
                             f"{med(r, 'mean_us'):,.0f} | {med(r, 'p99_us'):,.0f} | {cpu} | {ratio} | {p99r} | {each} |")
        durable = read_text(os.path.join(rdir, "durable-rate.txt")).split()
        if len(durable) == 2:
            rate = float(durable[0]) * (1000 if durable[1] == "G" else 1) * 1e6 / (1 << 20)
            lines += ["", f"The disk both nodes' files live on took {rate:,.0f} MiB/s made durable "
                      "in this run (`dd bs=1M count=1024 conv=fdatasync`; it varies a lot between runs "
                      "on this shared machine). *alone* never waits for that disk: its 10 s of writes "
                      "stay in the page cache. With a peer, a barrier ack means the epoch is on the "
                      "Secondary's stable storage, so the Secondary makes its writes durable while it "
                      "receives, on the same two CPUs: it writes them around the page cache (`O_DIRECT`; "
                      "below 64 KiB without waiting, with AIO), and its flushes only empty the disk's own "
                      "cache, except protocol C's writes below 64 KiB, which it writes through the page "
                      "cache (the Primary waits for their acks) and its flushes write back. *protocol A, "
                      "`disk-flushes no`* (barrier acks once the writes are done, not flushed; "
                      "informational, no target) shows the replication path without the flushes."]
        c128 = runs.get(("protoC128", "randwrite", "4k", "qd128"))
        cnf = runs.get(("protoCnf", "randwrite", "4k", "qd32"))
        c32 = runs.get(("protoC", "randwrite", "4k", "qd32"))
        if c128 and cnf and c32 and all("cpu_us" in x for x in c128 + c32):
            base32 = med(c32, "iops")
            lines += ["", f"Protocol C at 4 KiB and iodepth 32 kept the machine {med(c32, 'busy'):.0%} busy: a "
                      "write completes only once the Secondary's ack is back, so at most 32 round trips are "
                      "under way at a time, each crossing both daemons and the kernel's network path. "
                      "Informational rows, no target: the same configuration with 128 writes in flight did "
                      f"{med(c128, 'iops'):,.0f} IOPS ({med(c128, 'iops') / base32 - 1:+.0%}) at "
                      f"{med(c128, 'cpu_us'):,.1f} µs of CPU per write (at iodepth 32: {base32:,.0f} IOPS, "
                      f"{med(c32, 'cpu_us'):,.1f} µs); without the Secondary's flushes, at iodepth 32, "
                      f"{med(cnf, 'iops'):,.0f} IOPS ({med(cnf, 'iops') / base32 - 1:+.0%})."]
        lines += durable_writer(rdir, runs)
        lines += ["", "Verdict:", ""] + [f"- {v}" for v in verdicts]

    # 2. lag
    if lags:
        lines += [
            "",
            "### Replication lag after a burst (protocol A)",
            "",
            "fio 4 KiB random writes, iodepth 32, for 10 s on a freshly connected pair; then alpha's `pe` "
            "(writes awaiting a barrier ack) and beta's `dw` are read from the control sockets "
            "(`GET /v1/status`, about 1 ms a poll) every 10 ms until pe is 0 and dw has not changed for "
            "1 s. The lag is the time from fio's exit to the first poll with pe 0 and dw at its final "
            "value; beta's dw growth is checked against alpha's (every write arrived). Target: < 1 s.",
            "",
            "| round | IOPS during the burst | pe at fio's end | beta behind at fio's end | lag "
            "| beta dw = alpha dw |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        vals = []
        for rnd, path in lags.items():
            d = read_json(path)
            fio_path = path[: -len(".json")] + ".fio.json"
            iops = "–"
            if os.path.exists(fio_path):
                iops = f"{read_json(fio_path)['jobs'][0]['write']['iops']:,.0f}"
            lag = d["lag_s"]
            if lag is not None:
                vals.append(lag)
            same = "yes" if d["beta_dw_kib"] == d["alpha_dw_kib"] else \
                f"NO ({d['beta_dw_kib']:,} of {d['alpha_dw_kib']:,} KiB)"
            lines.append(f"| {rnd} | {iops} | {d['pe_at_end']:,} writes | {mib(d['behind_kib_at_end'] * 1024)} | "
                         f"{secs(lag) if lag is not None else 'not caught up in 120 s'} | {same} |")
        if vals and len(vals) == len(lags):
            m = statistics.median(vals)
            lines += ["", "Verdict:", "",
                      f"- median lag {secs(m)} — {'meets' if m < 1 else 'MISSES'} the target (< 1 s)"]
        else:
            lines += ["", "Verdict:", "", "- beta did not catch up in some round — MISSES the target (< 1 s)"]

    # 3. resync
    csums = rounds_of(os.path.join(rdir, "resync.csums.r{}.json"))
    rsyncs = rounds_of(os.path.join(rdir, "rsync.r{}.json"))
    if bitmap or csums or rsyncs:
        size = None
        rows = {}
        for method, paths in (("bitmap", bitmap), ("csums", csums)):
            for rnd, path in paths.items():
                d = read_json(path)
                size = d["size"]
                changed = read_text(path[: -len(".json")] + ".changed").split()
                logline = read_text(path[: -len(".json")] + ".log")
                vb, va = [int(x) for x in d["veth_before"].split()], [int(x) for x in d["veth_after"].split()]
                rows.setdefault(method, []).append({
                    "round": rnd,
                    "time": d["t_uptodate"] - d["t0"],
                    "waitsync": d["t_waitsync"] - d["t0"],
                    "state": d["state_at_waitsync"],
                    "sent": d["ns_alpha_kib"] * 1024,
                    "recv": d["ns_beta_kib"] * 1024,
                    "veth_tx": va[0] - vb[0],
                    "veth_rx": va[1] - vb[1],
                    "identical": d["identical"],
                    "blocks": int(changed[0]) if changed else None,
                    "marked": int(changed[1]) if len(changed) > 1 else None,
                    "equal": log_field(logline, "equal_checksum_bytes"),
                    "transferred": log_field(logline, "transferred_bytes"),
                    "daemon_s": log_field(logline, "seconds"),
                })
        for rnd, path in rsyncs.items():
            d = read_json(path)
            stats = read_text(os.path.join(rdir, f"rsync.r{rnd}.stats"))
            rows.setdefault("rsync", []).append({
                "round": rnd,
                "time": d["t_rsync"] - d["t0"],
                "fsync": d["t_fsync"] - d["t_rsync"],
                "sent": rsync_stat(stats, "Total bytes sent"),
                "recv": rsync_stat(stats, "Total bytes received"),
                "literal": rsync_stat(stats, "Literal data"),
                "matched": rsync_stat(stats, "Matched data"),
                "identical": d["identical"],
            })
        mdn = lambda method, key: statistics.median(x[key] for x in rows[method])  # noqa: E731
        first = (rows.get("bitmap") or rows.get("csums") or [{}])[0]
        blocks = first.get("blocks")
        lines += [
            "",
            "### Resync of 1 % of the blocks, against rsync",
            "",
            "Both disks start as copies of one 1 GiB file of seeded random data (`create-md` on each, "
            "`new-current-uuid --clear-bitmap`: in sync without a resync), alpha Primary. beta "
            "disconnects; then "
            + (f"{blocks:,} random 4 KiB blocks (1 % of the data area's, the same seeded choice every "
               f"time, {mib(blocks * 4096)})" if blocks else "1 % of the 4 KiB blocks")
            + " get new random data through alpha's export (libnbd, one NBD write each, then a flush). "
            "*bitmap*: beta `connect`s; the blocks marked in alpha's bitmap are resynced. *csums*: the "
            "same with `csums-alg sha256` in the configuration, and beta runs `invalidate` before "
            "`connect`: a full resync in which beta sends digests of what it requests and alpha sends data "
            "only where they differ (beta's log counts the bytes found equal). Time: from `connect` until beta is Connected and UpToDate (polled "
            "every 10 ms; `wait-connect` and `wait-sync` run in between). Bytes: `ns` of both daemons "
            "(their peer-protocol messages, before transport framing), and alpha's veth counters (IP "
            "packets both ways) as a cross-check. *rsync*: `rsync --inplace --no-whole-file "
            "--ignore-times --stats` of alpha's disk file (after the bitmap resync, daemons stopped) onto "
            "a copy of beta's taken right after it disconnected — the same two files, local, two "
            "processes on a pipe; bytes are its \"Total bytes sent/received\"; the time is the rsync "
            "command alone (the `sync FILE` after it, which makes its writes durable as a resync's "
            "are, is listed apart and not counted). Fairness: before every timed run, `sync`, then both "
            "files of the run are read through the page cache (`cat > /dev/null`): all three start "
            "with both files cached and nothing being written back, so none waits for the disk on "
            "reads; the page cache is not dropped. The disks are compared after every run (`cmp`).",
            "",
            "| method | time | sent (source → target) | received (target → source) | total bytes "
            "| total ÷ data area | time ÷ rsync | rounds (time) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        labels = {"bitmap": "bitmap resync", "csums": "csums resync (sha256, after invalidate)",
                  "rsync": "rsync --inplace --no-whole-file"}
        rs_time = mdn("rsync", "time") if rows.get("rsync") else None
        for method in ("bitmap", "csums", "rsync"):
            if not rows.get(method):
                continue
            t, sent, recv = mdn(method, "time"), mdn(method, "sent"), mdn(method, "recv")
            total = statistics.median(x["sent"] + x["recv"] for x in rows[method])
            denom = size if method != "rsync" or not size else 2**30
            share = f"{100 * total / denom:.2f} %" if denom else "–"
            tr = f"{t / rs_time:.2f}×" if rs_time else "–"
            each = " / ".join(secs(x["time"]) for x in rows[method])
            lines.append(f"| {labels[method]} | {secs(t)} | {mib(sent)} | {mib(recv)} | {mib(total)} | {share} | "
                         f"{tr} | {each} |")
        lines += ["", "Details (medians):", ""]
        for method in ("bitmap", "csums"):
            if not rows.get(method):
                continue
            r = rows[method]
            veth = statistics.median(x["veth_tx"] + x["veth_rx"] for x in r)
            early = [x for x in r if x["state"] != "Connected UpToDate"]
            d = (f"- {labels[method]}: alpha's veth carried {mib(veth)} (both ways); "
                 f"beta's log: {statistics.median(x['daemon_s'] or 0 for x in r):.3f} s from the sync UUID "
                 f"to the end, {mib(statistics.median(x['transferred'] or 0 for x in r))} of data received")
            if method == "csums":
                d += f", {mib(statistics.median(x['equal'] or 0 for x in r))} found equal by checksum"
            d += (f"; alpha marked {mib(statistics.median(x['marked'] or 0 for x in r))} before the connect; "
                  f"`wait-sync` returned after {secs(statistics.median(x['waitsync'] for x in r))}")
            if early:
                d += f" (in {len(early)} of {len(r)} rounds before beta was UpToDate: " \
                     + ", ".join(x["state"] for x in early) + ")"
            bad = [x["round"] for x in r if x["identical"] != "yes"]
            d += "; disks identical afterwards in every round" if not bad else \
                f"; DISKS DIFFER afterwards in rounds {bad}"
            lines.append(d)
        if rows.get("rsync"):
            r = rows["rsync"]
            bad = [x["round"] for x in r if x["identical"] != "yes"]
            lines.append(f"- rsync: literal data {mib(mdn('rsync', 'literal'))}, matched data "
                         f"{mib(mdn('rsync', 'matched'))}; the `sync FILE` after it took "
                         f"{secs(mdn('rsync', 'fsync'))}; "
                         + ("files identical afterwards in every round" if not bad else
                            f"FILES DIFFER afterwards in rounds {bad}"))
        verdicts = []
        if rs_time and rows.get("bitmap"):
            q = mdn("bitmap", "time") / rs_time
            verdicts.append(f"bitmap resync time ÷ rsync time: {q:.2f}× — "
                            f"{'meets' if q <= 0.2 else 'MISSES'} the target (≤ 0.2×)")
        if rs_time and rows.get("csums"):
            q = mdn("csums", "time") / rs_time
            verdicts.append(f"csums resync time ÷ rsync time: {q:.2f}× — "
                            f"{'meets' if q <= 1.0 else 'MISSES'} the target (≤ 1.0×)")
        if rows.get("csums") and size:
            total = statistics.median(x["sent"] + x["recv"] for x in rows["csums"])
            q = total / size
            verdicts.append(f"csums resync bytes on the wire ÷ data area: {100 * q:.2f} % — "
                            f"{'meets' if q <= 0.02 else 'MISSES'} the target (≤ 2 %)")
        lines += ["", "Verdict:", ""] + [f"- {v}" for v in verdicts]
    lines += ["", REP_END]
    return "\n".join(lines)


def replace(text, start, end, new):
    if start in text and end in text:
        return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    return text.rstrip("\n") + "\n\n" + new + "\n"


def main():
    outdir, md = sys.argv[1], sys.argv[2]
    text = open(md).read() if os.path.exists(md) else "# Benchmarks\n"
    if glob.glob(os.path.join(outdir, "json", "*.json")):
        text = replace(text, START, END, section(outdir))
    meta = meta_section(outdir)
    if meta:
        text = replace(text, META_START, META_END, meta)
    tr = transport_section(outdir)
    if tr:
        text = replace(text, TR_START, TR_END, tr)
    res = resource_section(outdir)
    if res:
        text = replace(text, RES_START, RES_END, res)
    rep = replication_section(outdir)
    if rep:
        text = replace(text, REP_START, REP_END, rep)
    with open(md, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
