#!/usr/bin/env bash
# make bench: the NBD front end (`nbdmirror serve`) against qemu-nbd, nbdkit
# (file plugin) and nbd-server on the same 1 GiB file, with fio's nbd engine
# over TCP on loopback, servers alternating; then the front end with 1 ms of
# latency injected into its backend at several iodepths (nbdkit's delay
# filter alongside); then the Go micro-benchmarks. Medians over ROUNDS replace
# the "NBD front end" section of BENCHMARKS.md; raw fio JSON stays in $OUT.
#
# Each server gets the same fresh sparse 1 GiB file (truncate), as in
# reference/nbd.md §5. A file written in full beforehand is not used: while
# the kernel writes back a freshly dirtied 1 GiB file, 4 KiB overwrites
# through any server crawl at ~30k IOPS, which measures the page cache, not
# the server.
#
# ROUNDS (default 3) and RUNTIME (seconds per fio job, default 10) tune it;
# BENCH selects the parts (default "nbd meta transport"): nbd is the fio
# comparison, meta the bitmap and metadata benchmarks, transport the peer
# link's throughput, compression and rate limiter.
set -euo pipefail
cd "$(dirname "$0")/.."

parts=${BENCH:-nbd meta transport}
rounds=${ROUNDS:-3}
runtime=${RUNTIME:-10}
out=${OUT:-$(mktemp -d /tmp/nbdmirror-bench.XXXXXX)}
img=$out/disk.img
bin=$PWD/bin/nbdmirror
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
	case $name in
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

# fio_job SERVER ROUND PORT RW BS IODEPTH
fio_job() {
	local server=$1 round=$2 port=$3 rw=$4 bs=$5 qd=$6
	fio --name="$rw" --ioengine=nbd --uri="nbd://127.0.0.1:$port/test" --rw="$rw" --bs="$bs" \
		--iodepth="$qd" --size=1G --runtime="$runtime" --time_based --randseed=4242 \
		--output-format=json --output="$out/json/$server.$rw.$bs.qd$qd.r$round.json" >/dev/null
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

for part in $parts; do
	"run_$part"
done
python3 scripts/bench_report.py "$out" BENCHMARKS.md
echo "bench: BENCHMARKS.md updated; raw data in $out"
