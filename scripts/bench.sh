#!/usr/bin/env bash
# make bench: the NBD front end (`nbdmirror serve`) against qemu-nbd, nbdkit
# (file plugin) and nbd-server on the same 1 GiB file, with fio's nbd engine
# over TCP on loopback, servers alternating; then the front end with 1 ms of
# latency injected into its backend at several iodepths (nbdkit's delay
# filter alongside); then the Go micro-benchmarks; and a resource of the node
# daemon against the front end. Medians over ROUNDS replace the "NBD front
# end" and "Resource write path" sections of BENCHMARKS.md; raw fio JSON
# stays in $OUT.
#
# Each server gets the same fresh sparse 1 GiB file (truncate), as in
# reference/nbd.md §5. A file written in full beforehand is not used: while
# the kernel writes back a freshly dirtied 1 GiB file, 4 KiB overwrites
# through any server crawl at ~30k IOPS, which measures the page cache, not
# the server.
#
# ROUNDS (default 3) and RUNTIME (seconds per fio job, default 10) tune it;
# BENCH selects the parts (default "nbd meta transport resource"): nbd is
# the fio comparison, meta the bitmap and metadata benchmarks, transport the
# peer link's throughput, compression and rate limiter, resource the write
# path of a resource in `nbdmirror daemon` (activity log and bitmap marking,
# no peer) against `nbdmirror serve` on the same file with the same fio jobs.
set -euo pipefail
cd "$(dirname "$0")/.."

parts=${BENCH:-nbd meta transport resource}
rounds=${ROUNDS:-3}
runtime=${RUNTIME:-10}
out=${OUT:-$(mktemp -d /tmp/nbdmirror-bench.XXXXXX)}
img=$out/disk.img
bin=$PWD/bin/nbdmirror
# what fio_job asks for: the export (start_server sets it), the size of the
# working set and where the fio JSON goes (run_resource changes the last two)
export_name=test
size=1G
jobdir=json
mkdir -p "$out/json"
go build -o "$out/benchserve" ./internal/benchserve

pid=
stop_server() {
	[[ -n $pid ]] || return 0
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	# nbd-server daemonises: wait for its PID to go away
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	pid=
}
cleanup() { stop_server; rm -f "$img"; }
trap cleanup EXIT

wait_port() {
	for _ in $(seq 200); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.05
	done
	echo "bench: nothing listens on port $1" >&2
	return 1
}

# start_server NAME PORT: a fresh sparse 1 GiB file, then the server on it.
# $pid is the server's own PID (nbd-server's from its PID file, since it
# daemonises); it is stopped by that PID.
start_server() {
	local name=$1 port=$2
	rm -f "$img"
	truncate -s 1G "$img"
	export_name=test
	case $name in
	resource) start_resource 1237 "$port"; return ;;
	resource-al61) start_resource 61 "$port"; return ;;
	nbdmirror) "$bin" --log-level warn serve --file "$img" --export test --listen "127.0.0.1:$port" & ;;
	nbdmirror-delay) "$out/benchserve" --file "$img" --listen "127.0.0.1:$port" --delay 1ms 2>/dev/null & ;;
	qemu-nbd) qemu-nbd -f raw -b 127.0.0.1 -p "$port" -t -e 0 -x test "$img" & ;;
	nbdkit) nbdkit --foreground --ipaddr 127.0.0.1 --port "$port" file "$img" & ;;
	nbdkit-delay) nbdkit --foreground --ipaddr 127.0.0.1 --port "$port" --filter=delay file "$img" rdelay=1ms wdelay=1ms & ;;
	nbd-server)
		printf '[generic]\n    listenaddr = 127.0.0.1\n    port = %s\n[test]\n    exportname = %s\n    flush = true\n    fua = true\n    trim = true\n' \
			"$port" "$img" >"$out/nbd-server.conf"
		rm -f "$out/nbd-server.pid"
		nbd-server -C "$out/nbd-server.conf" -p "$out/nbd-server.pid"
		for _ in $(seq 100); do [[ -s $out/nbd-server.pid ]] && break; sleep 0.05; done
		pid=$(cat "$out/nbd-server.pid")
		wait_port "$port"
		return ;;
	esac
	pid=$!
	wait_port "$port"
}

# nbdm VERB…: nbdmirror on the resource of start_resource (the daemon is
# started without it: $! must be the daemon's PID, not a subshell's)
nbdm_flags=(--config "$out/resource.conf" --node alpha --run-dir "$out/run" --log-level warn)
nbdm() { "$bin" "${nbdm_flags[@]}" "$@"; }

# start_resource AL-EXTENTS PORT: resource r0 on $img with internal metadata
# (create-md), the node daemon with it up and its NBD server on PORT, then
# primary --force: the export r0 exists only while Primary. Without a peer
# every write goes through the activity log and marks the bitmap.
start_resource() {
	local al=$1 port=$2
	export_name=r0
	printf 'resource r0 {\n  disk { al-extents %s; }\n  disk %s;\n  meta-disk internal;\n  on alpha { address 127.0.0.1:17789; }\n  on beta { address 127.0.0.2:17789; }\n}\n' \
		"$al" "$img" >"$out/resource.conf"
	nbdm create-md r0 >/dev/null
	rm -rf "$out/run"
	"$bin" "${nbdm_flags[@]}" daemon --nbd-listen "127.0.0.1:$port" --up r0 2>>"$out/daemon.log" &
	pid=$!
	wait_port "$port"
	# --up attaches after the control socket listens: retry until it has
	for _ in $(seq 100); do
		nbdm primary --force r0 2>>"$out/daemon.log" && return 0
		sleep 0.05
	done
	echo "bench: resource r0 did not become Primary (see $out/daemon.log)" >&2
	return 1
}

# al_count: the resource's activity-log transactions so far (counters.al of
# status --json)
al_count() {
	nbdm status --json r0 | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["counters"]["al"])'
}

# fio_job SERVER ROUND PORT RW BS IODEPTH
fio_job() {
	local server=$1 round=$2 port=$3 rw=$4 bs=$5 qd=$6
	fio --name="$rw" --ioengine=nbd --uri="nbd://127.0.0.1:$port/$export_name" --rw="$rw" --bs="$bs" \
		--iodepth="$qd" --size="$size" --runtime="$runtime" --time_based --randseed=4242 \
		--output-format=json --output="$out/$jobdir/$server.$rw.$bs.qd$qd.r$round.json" >/dev/null
}

# resource_job SERVER ROUND PORT RW BS IODEPTH: fio_job; on a resource the
# activity-log transactions before and after the job go to a .al file next
# to the JSON.
resource_job() {
	local before
	if [[ $1 == nbdmirror ]]; then
		fio_job "$@"
		return
	fi
	before=$(al_count)
	fio_job "$@"
	echo "$before $(al_count)" >"$out/$jobdir/$1.$4.$5.qd$6.r$2.al"
}

run_nbd() {
	servers=(nbdmirror nbdkit qemu-nbd nbd-server)
	port=10850
	for ((r = 1; r <= rounds; r++)); do
		for ((i = 0; i < ${#servers[@]}; i++)); do
			# rotate the order each round so no server always runs first
			s=${servers[$(((i + r - 1) % ${#servers[@]}))]}
			port=$((port + 1))
			echo "bench: round $r/$rounds: $s"
			start_server "$s" "$port"
			fio_job "$s" "$r" "$port" randwrite 4k 32
			fio_job "$s" "$r" "$port" randread 4k 32
			fio_job "$s" "$r" "$port" write 1M 8
			stop_server
		done
	done

	for ((r = 1; r <= rounds; r++)); do
		for s in nbdmirror-delay nbdkit-delay; do
			port=$((port + 1))
			echo "bench: round $r/$rounds: $s (1 ms backend latency)"
			start_server "$s" "$port"
			for qd in 1 8 32 128; do
				fio_job "$s" "$r" "$port" randwrite 4k "$qd"
			done
			stop_server
		done
	done
	echo "bench: Go micro-benchmarks of the NBD server"
	go test -run '^$' -bench . -benchmem -count 1 ./nbd/ | tee "$out/gobench.txt"
}

run_meta() {
	echo "bench: bitmap and metadata"
	go test -run '^$' -bench . -benchmem -count 1 ./bitmap/ | tee "$out/bitmap.txt"
	go test -run '^$' -bench ALTransactions -benchtime 20000x -count 1 ./metadisk/ | tee "$out/metadisk.txt"
}

run_transport() {
	echo "bench: peer transport"
	go test -run '^$' -bench 'Session|Compression' -benchtime 3s -count 1 ./transport/ | tee "$out/transport.txt"
	go test -run '^$' -bench 'LimiterAccuracy' -benchtime 1x -count 1 ./transport/ | tee -a "$out/transport.txt"
}

# The resource path against the plain front end, side by side: the same
# fresh sparse 1 GiB file and the same fio jobs as run_nbd, over the first
# 1000 MiB (internal metadata leaves 1023 MiB of data). resource has
# al-extents 1237 (4.8 GiB: the working set fits, so after the first touch
# of each extent no write waits for the activity log); resource-al61 runs
# the 4 KiB random writes only, with al-extents 61 (244 MiB, a quarter of
# the working set), to show what activity-log transactions cost.
run_resource() {
	local size=1000M jobdir=resource
	mkdir -p "$out/resource"
	servers=(nbdmirror resource resource-al61)
	port=10950
	for ((r = 1; r <= rounds; r++)); do
		for ((i = 0; i < ${#servers[@]}; i++)); do
			s=${servers[$(((i + r - 1) % ${#servers[@]}))]}
			port=$((port + 1))
			echo "bench: round $r/$rounds: $s (resource path)"
			start_server "$s" "$port"
			resource_job "$s" "$r" "$port" randwrite 4k 32
			if [[ $s != resource-al61 ]]; then
				resource_job "$s" "$r" "$port" randread 4k 32
				resource_job "$s" "$r" "$port" write 1M 8
			fi
			stop_server
		done
	done
	"$bin" --version >"$out/resource/version.txt"
}

for part in $parts; do
	"run_$part"
done
python3 scripts/bench_report.py "$out" BENCHMARKS.md
echo "bench: BENCHMARKS.md updated; raw data in $out"
