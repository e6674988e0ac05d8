#!/usr/bin/env python3
"""Summarise the fio JSON of scripts/bench.sh into BENCHMARKS.md.

Usage: bench_report.py OUTDIR BENCHMARKS.md

Replaces the text between the markers of the "NBD front end" section (or
appends the section) with medians over rounds, ratios against nbdkit, the
1 ms latency scaling table, the machine and the commands.
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


def load(outdir):
    runs = {}
    for path in glob.glob(os.path.join(outdir, "json", "*.json")):
        server, rw, bs, qd, _round = os.path.basename(path)[: -len(".json")].split(".")
        with open(path) as f:
            job = json.load(f)["jobs"][0]
        d = job["write"] if job["write"]["io_bytes"] else job["read"]
        runs.setdefault((server, rw, bs, qd), []).append(
            {
                "iops": d["iops"],
                "mibs": d["bw"] / 1024,
                "p99_us": d["clat_ns"]["percentile"]["99.000000"] / 1000,
                "mean_us": d["clat_ns"]["mean"] / 1000,
            }
        )
    return runs


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


def main():
    outdir, md = sys.argv[1], sys.argv[2]
    text = open(md).read() if os.path.exists(md) else "# Benchmarks\n"
    new = section(outdir)
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    with open(md, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
