#!/usr/bin/env bash
# make bench: the NBD front end (`nbdmirror serve`) against qemu-nbd, nbdkit
# (file plugin) and nbd-server on the same 1 GiB file, with fio's nbd engine
# over TCP on loopback, servers alternating; then the front end with 1 ms of
# latency injected into its backend at several iodepths (nbdkit's delay
# filter alongside); then the Go micro-benchmarks; and a resource of the node
# daemon against the front end; and two-node replication (fio alone /
# protocol A / protocol C, replication lag, resync against rsync). Medians
# over ROUNDS replace the "NBD front end", "Resource write path" and
# "Replication" sections of BENCHMARKS.md; raw fio JSON stays in $OUT.
#
# Each server gets the same fresh sparse 1 GiB file (truncate), as in
# reference/nbd.md §5. A file written in full beforehand is not used: while
# the kernel writes back a freshly dirtied 1 GiB file, 4 KiB overwrites
# through any server crawl at ~30k IOPS, which measures the page cache, not
# the server.
#
# ROUNDS (default 3; 5 for the replication part's fio jobs) and RUNTIME
# (seconds per fio job, default 10) tune it;
# BENCH selects the parts (default "nbd meta transport resource
# replication"): nbd is the fio comparison, meta the bitmap and metadata
# benchmarks, transport the peer link's throughput, compression and rate
# limiter, resource the write path of a resource in `nbdmirror daemon`
# (activity log and bitmap marking, no peer) against `nbdmirror serve` on the
# same file with the same fio jobs, replication two daemons in two network
# namespaces (root; see run_replication; about 15 minutes at the defaults).
set -euo pipefail
cd "$(dirname "$0")/.."

parts=${BENCH:-nbd meta transport resource replication}
rounds=${ROUNDS:-3}
# The replication part's fio jobs, whose targets are ratios that the
# machine's load moves by a few per cent from run to run: medians of 5.
fio_rounds=${ROUNDS:-5}
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
cleanup() { stop_server; rep_cleanup; rm -f "$img"; }
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

# ---------------------------------------------------------------------------
# replication: two nodes, alpha and beta, each a daemon in its own network
# namespace (joined by a veth pair, 10.x addresses), each with its own 1 GiB
# disk file with internal metadata; fio and the admin verbs run in the
# script's namespace and reach alpha's export and the control sockets over
# their Unix sockets, so the NBD path is the same for every configuration.
#  1. fio 4 KiB random write iodepth 32 and 1 MiB sequential write iodepth 8
#     on alpha alone (StandAlone, Primary --force: the resource path of the
#     resource part), then connected with protocol A and with protocol C
#     (the initial sync skipped with new-current-uuid --clear-bitmap), and
#     with protocol A and disk-flushes no (informational); fresh disks
#     (written in full with O_DIRECT: allocated, not in the page cache) and
#     daemons for every configuration and round, the order rotated each
#     round; informational, 4 KiB alone, A and C on fresh sparse disks.
#  2. Replication lag: a 10 s 4 KiB random-write burst with protocol A, then
#     the time from fio's exit until alpha's pe is 0 and beta's dw has its
#     final value (both polled every 10 ms through the control sockets).
#  3. Resync of 1 % of the 4 KiB blocks, changed through alpha's export while
#     beta is disconnected, on disks filled with the same random data: a
#     bitmap resync (connect), a csums resync (csums-alg sha256; invalidate
#     on beta, then connect) and rsync --inplace --no-whole-file of alpha's
#     disk file onto a copy of beta's taken before the change.
rdir=$out/replication
rep_ns_a= rep_ns_b= rep_dev_a= rep_ip_a= rep_ip_b=
declare -A rep_pid=()
rep_conf= rep_label= rep_py=

# rep_cleanup (from the EXIT trap): the daemons by PID, the namespaces
# (which takes the veth pair with them), the disk images.
rep_cleanup() {
	local n
	for n in "${!rep_pid[@]}"; do rep_stop "$n"; done
	[[ -z $rep_ns_a ]] || ip netns del "$rep_ns_a" 2>/dev/null || true
	[[ -z $rep_ns_b ]] || ip netns del "$rep_ns_b" 2>/dev/null || true
	rep_ns_a= rep_ns_b=
	rm -f "$rdir"/*.img
}

# rep_hosts: two namespaces joined by veth, with unique names and a random
# 10.79.N.0/24.
rep_hosts() {
	local id sub
	id=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
	sub=$((16#${id:0:2} % 250 + 1))
	rep_ns_a=nbmbenchA$id rep_ns_b=nbmbenchB$id rep_dev_a=vbA$id
	rep_ip_a=10.79.$sub.1 rep_ip_b=10.79.$sub.2
	ip netns add "$rep_ns_a"
	ip netns add "$rep_ns_b"
	ip link add "$rep_dev_a" type veth peer name "vbB$id"
	ip link set "$rep_dev_a" netns "$rep_ns_a"
	ip link set "vbB$id" netns "$rep_ns_b"
	ip -n "$rep_ns_a" addr add "$rep_ip_a/24" dev "$rep_dev_a"
	ip -n "$rep_ns_b" addr add "$rep_ip_b/24" dev "vbB$id"
	for ns in "$rep_ns_a" "$rep_ns_b"; do ip -n "$ns" link set lo up; done
	ip -n "$rep_ns_a" link set "$rep_dev_a" up
	ip -n "$rep_ns_b" link set "vbB$id" up
}

# rep_write_conf NAME OPTIONS: r0 on alpha.img and beta.img in $rdir.
rep_write_conf() {
	printf 'resource r0 {\n  %s\n  on alpha { disk %s; meta-disk internal; address %s:7789; }\n  on beta  { disk %s; meta-disk internal; address %s:7789; }\n}\n' \
		"$2" "$rdir/alpha.img" "$rep_ip_a" "$rdir/beta.img" "$rep_ip_b" >"$rdir/$1.conf"
}

# nbdr NODE VERB…: nbdmirror for NODE with the configuration in use
nbdr() {
	local node=$1
	shift
	"$bin" --config "$rep_conf" --node "$node" --run-dir "$rdir/$node/run" --log-level warn "$@"
}

# rep_ctl …: the helper written by rep_helper (control-socket polling,
# the lag measurement, the 1 % change through libnbd, the random base image)
rep_ctl() { "$rep_py" "$rdir/ctl.py" "$@"; }

# rep_start NODE: the node's daemon inside its namespace, started directly
# (so $! is its PID: `ip netns exec` execs it), logging to NODE.log.
rep_start() {
	local node=$1 ns=$rep_ns_a
	[[ $node == beta ]] && ns=$rep_ns_b
	rm -rf "$rdir/$node/run"
	mkdir -p "$rdir/$node/run"
	echo "--- $rep_label" >>"$rdir/$node.log"
	NOTIFY_SOCKET= ip netns exec "$ns" "$bin" --config "$rep_conf" --node "$node" --run-dir "$rdir/$node/run" \
		--log-level info daemon 2>>"$rdir/$node.log" &
	rep_pid[$node]=$!
	for _ in $(seq 200); do
		[[ -S $rdir/$node/run/control.sock ]] && nbdr "$node" status r0 >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	echo "bench: the $node daemon did not start (see $rdir/$node.log)" >&2
	return 1
}

# rep_running PID: the process runs (a child that exited stays a zombie
# until it is waited for, and kill -0 still reaches a zombie)
rep_running() {
	local st
	st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $st && $st != Z ]]
}

# rep_stop NODE: SIGTERM (a clean stop), SIGKILL after 20 s, by PID.
rep_stop() {
	local p=${rep_pid[$1]:-}
	unset "rep_pid[$1]"
	[[ -n $p ]] || return 0
	kill "$p" 2>/dev/null || true
	for _ in $(seq 400); do rep_running "$p" || break; sleep 0.05; done
	if rep_running "$p"; then
		echo "bench: the $1 daemon (PID $p) ignored SIGTERM for 20 s: SIGKILL" >&2
		kill -9 "$p" 2>/dev/null || true
	fi
	wait "$p" 2>/dev/null || true
}

# rep_disks allocated|sparse|COPY: both disks a 1 GiB file written in full
# with O_DIRECT (allocated: every block on the filesystem, none of it in the
# page cache or being written back, like the partition or logical volume a
# DRBD backing device is), a fresh sparse 1 GiB file, or a copy of the file
# COPY; then create-md on both.
rep_disks() {
	local n
	for n in alpha beta; do
		rm -f "$rdir/$n.img"
		if [[ $1 == allocated ]]; then
			rep_allocated "$rdir/$n.img"
		elif [[ $1 == sparse ]]; then
			truncate -s 1G "$rdir/$n.img"
		else
			cp "$1" "$rdir/$n.img"
		fi
		nbdr "$n" create-md r0 >/dev/null
	done
}

# rep_alone: alpha alone, StandAlone and Primary (beta's daemon not running).
rep_alone() {
	rep_start alpha
	nbdr alpha up r0 >/dev/null
	nbdr alpha disconnect r0 >/dev/null
	nbdr alpha primary --force r0 >/dev/null
}

# rep_pair: both daemons, connected, the initial sync skipped with
# new-current-uuid --clear-bitmap on alpha, alpha Primary.
rep_pair() {
	rep_start alpha
	rep_start beta
	nbdr alpha up r0 >/dev/null
	nbdr beta up r0 >/dev/null
	nbdr alpha wait-connect --timeout 60s r0 >/dev/null
	nbdr beta wait-connect --timeout 60s r0 >/dev/null
	nbdr alpha new-current-uuid --clear-bitmap r0 >/dev/null
	rep_ctl wait "$rdir/alpha/run" Connected UpToDate UpToDate 60 >/dev/null
	rep_ctl wait "$rdir/beta/run" Connected UpToDate UpToDate 60 >/dev/null
	nbdr alpha primary r0 >/dev/null
}

rep_down() {
	rep_stop alpha
	rep_stop beta
}

rep_uri() { echo "nbd+unix:///r0?socket=$rdir/alpha/run/nbd.sock"; }

# rep_fio CONFIG ROUND RW BS IODEPTH: the fio job over alpha's Unix socket,
# over the first 1000 MiB (the data area is 1023 MiB), JSON to json/.
rep_fio() {
	local out="$rdir/json/$1.$3.$4.qd$5.r$2"
	cpu_busy >"$out.cpu"
	fio --name="$3" --ioengine=nbd --uri="$(rep_uri)" --rw="$3" --bs="$4" --iodepth="$5" --size=1000M \
		--runtime="$runtime" --time_based --randseed=4242 --output-format=json \
		--output="$out.json" >/dev/null
	cpu_busy >>"$out.cpu"
}

# cpu_busy: the machine's busy and total CPU time so far, in clock ticks
# (the first line of /proc/stat: user, nice, system, irq and softirq are
# busy; idle, iowait and time stolen by the hypervisor are not)
cpu_busy() {
	awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $2 + $3 + $4 + $7 + $8, t; exit }' /proc/stat
}

# rep_allocated FILE: FILE, 1 GiB, written in full with O_DIRECT and made
# durable: allocated, and nothing of it in the page cache.
rep_allocated() {
	dd if=/dev/zero of="$1" bs=1M count=1024 oflag=direct conv=fsync status=none
}

# rep_durable_writer allocated|sparse [1M]: the cost of making writes
# durable on this machine without nbdmirror: fio, one thread, on a 1 GiB
# file made as rep_disks makes the disks, RUNTIME seconds, with the
# machine's CPU time around it. 4 KiB blocks at random with fdatasync after
# every 256 writes (about the group commit the Secondary reaches under
# 4 KiB protocol A load), through the page cache as the Secondary writes
# them; or with 1M, 1 MiB blocks in sequence with O_DIRECT, 8 in flight,
# and fdatasync after every 8 (8 MiB, about what the Secondary flushes at
# once under the 1 MiB jobs; it writes them around the page cache, in
# parallel).
rep_durable_writer() {
	local out="$rdir/durable-writer" job=(--rw=randwrite --bs=4k --fdatasync=256 --ioengine=psync)
	[[ $1 == allocated ]] || out="$out-$1"
	if [[ ${2:-} == 1M ]]; then
		out="$out-1M" job=(--rw=write --bs=1M --fdatasync=8 --direct=1 --ioengine=libaio --iodepth=8)
	fi
	rm -f "$rdir/dw.img"
	if [[ $1 == allocated ]]; then rep_allocated "$rdir/dw.img"; else truncate -s 1G "$rdir/dw.img"; fi
	cpu_busy >"$out.cpu"
	fio --name=durable --filename="$rdir/dw.img" "${job[@]}" \
		--size=1000M --runtime="$runtime" --time_based --randseed=4242 --output-format=json \
		--output="$out.json" >/dev/null
	cpu_busy >>"$out.cpu"
	rm -f "$rdir/dw.img"
}

# rep_veth: bytes sent and received on alpha's end of the veth pair
rep_veth() {
	ip netns exec "$rep_ns_a" cat "/sys/class/net/$rep_dev_a/statistics/tx_bytes" \
		"/sys/class/net/$rep_dev_a/statistics/rx_bytes" | tr '\n' ' '
}

# rep_warm FILE…: write back what is dirty, then read the files through the
# page cache, so every timed resync or rsync starts with both files cached
# and nothing waiting for writeback.
rep_warm() {
	sync
	cat "$@" >/dev/null
}

# rep_resync METHOD ROUND: METHOD bitmap (beta connects after the change) or
# csums (csums-alg sha256; beta invalidates itself, then connects). The
# disks start as copies of base.img; 1 % of the data area's 4 KiB blocks is
# changed through alpha's export while beta is disconnected. The time runs
# from `connect` until beta is Connected and UpToDate (polled every 10 ms;
# wait-connect and wait-sync run in between, and where wait-sync returned
# is recorded). Bytes: alpha's and beta's ns (KiB, the daemons' protocol
# messages) and alpha's veth counters (packets, both directions). For
# bitmap, rsync of the same files follows with the daemons stopped.
rep_resync() {
	local method=$1 r=$2 changed t0 t1 t2 ns_a0 ns_b0 ns_a1 ns_b1 veth0 veth1 state size same=no
	local res=$rdir/resync.$method.r$r
	rep_label="resync $method, round $r"
	echo "bench: round $r/$rounds: $rep_label"
	rep_conf=$rdir/protoA.conf
	[[ $method == csums ]] && rep_conf=$rdir/csums.conf
	rep_disks "$rdir/base.img"
	rep_pair
	size=$(rep_ctl get "$rdir/alpha/run" size_bytes)
	nbdr beta disconnect r0 >/dev/null
	rep_ctl wait "$rdir/alpha/run" WFConnection - - 60 >/dev/null
	[[ $method == bitmap ]] && cp "$rdir/beta.img" "$rdir/rsync-dst.img"
	changed=$(rep_ctl change "$(rep_uri)" 7 0.01)
	echo "$changed $(rep_ctl get "$rdir/alpha/run" out_of_sync_bytes)" >"$res.changed"
	[[ $method == csums ]] && nbdr beta invalidate r0 >/dev/null
	rep_warm "$rdir/alpha.img" "$rdir/beta.img"
	ns_a0=$(rep_ctl get "$rdir/alpha/run" counters.ns)
	ns_b0=$(rep_ctl get "$rdir/beta/run" counters.ns)
	veth0=$(rep_veth)
	t0=$EPOCHREALTIME
	nbdr beta connect r0 >/dev/null
	nbdr beta wait-connect --timeout 60s r0 >/dev/null
	nbdr beta wait-sync --timeout 600s r0 >/dev/null
	t1=$EPOCHREALTIME
	state=$(rep_ctl get "$rdir/beta/run" cstate disk)
	rep_ctl wait "$rdir/beta/run" Connected UpToDate UpToDate 600 >/dev/null
	t2=$EPOCHREALTIME
	rep_ctl wait "$rdir/alpha/run" Connected UpToDate UpToDate 60 >/dev/null
	sleep 0.5 # the last acks and the UUIDs after the end
	ns_a1=$(rep_ctl get "$rdir/alpha/run" counters.ns)
	ns_b1=$(rep_ctl get "$rdir/beta/run" counters.ns)
	veth1=$(rep_veth)
	rep_down
	cmp -s -n "$size" "$rdir/alpha.img" "$rdir/beta.img" && same=yes
	printf '{"t0": %s, "t_waitsync": %s, "t_uptodate": %s, "state_at_waitsync": "%s", "ns_alpha_kib": %s, "ns_beta_kib": %s, "veth_before": "%s", "veth_after": "%s", "size": %s, "identical": "%s"}\n' \
		"$t0" "$t1" "$t2" "$state" "$((ns_a1 - ns_a0))" "$((ns_b1 - ns_b0))" "$veth0" "$veth1" "$size" "$same" >"$res.json"
	# beta's own account of the resync (time, equal-checksum and sent bytes)
	grep 'resync done on the SyncTarget side' "$rdir/beta.log" | tail -1 >"$res.log" || true
	[[ $same == yes ]] || echo "bench: WARNING: after the $method resync the disks differ" >&2
	[[ $method == bitmap ]] || return 0

	echo "bench: round $r/$rounds: rsync --inplace --no-whole-file, round $r"
	rep_warm "$rdir/alpha.img" "$rdir/rsync-dst.img"
	t0=$EPOCHREALTIME
	rsync --inplace --no-whole-file --ignore-times --stats "$rdir/alpha.img" "$rdir/rsync-dst.img" >"$rdir/rsync.r$r.stats"
	t1=$EPOCHREALTIME
	sync "$rdir/rsync-dst.img"
	t2=$EPOCHREALTIME
	same=no
	cmp -s "$rdir/alpha.img" "$rdir/rsync-dst.img" && same=yes
	printf '{"t0": %s, "t_rsync": %s, "t_fsync": %s, "identical": "%s"}\n' "$t0" "$t1" "$t2" "$same" >"$rdir/rsync.r$r.json"
	[[ $same == yes ]] || echo "bench: WARNING: after rsync the files differ" >&2
}

# rep_helper: the Python helper rep_ctl runs. It speaks HTTP to the
# daemons' control sockets (GET /v1/status) instead of starting the CLI,
# so a poll costs about a millisecond.
rep_helper() {
	cat >"$rdir/ctl.py" <<'PY'
import http.client, json, os, random, socket, subprocess, sys, time

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s

class Node:
    def __init__(self, run):
        self.path, self.c = os.path.join(run, "control.sock"), None

    def status(self):
        for attempt in (0, 1):
            try:
                if self.c is None:
                    self.c = UnixHTTP(self.path)
                self.c.request("GET", "/v1/status?res=r0&format=json")
                return json.loads(self.c.getresponse().read())[0]
            except (OSError, http.client.HTTPException):
                self.c = None
                if attempt:
                    raise

def field(st, key):
    for k in key.split("."):
        st = st[k]
    return st

def cmd_get(run, *keys):
    st = Node(run).status()
    print(" ".join(str(field(st, k)) for k in keys))

def cmd_wait(run, cstate, disk, peer_disk, timeout):
    n, want = Node(run), (cstate, disk, peer_disk)
    start = time.monotonic()
    while True:
        st = n.status()
        got = (st["cstate"], st["disk"], st["peer_disk"])
        if all(w in ("-", g) for w, g in zip(want, got)):
            print(f"{time.monotonic() - start:.3f}")
            return
        if time.monotonic() - start > float(timeout):
            sys.exit(f"bench: {run}: still {got} after {timeout} s, want {want}")
        time.sleep(0.01)

def cmd_idle(run, timeout):
    n, start = Node(run), time.monotonic()
    while n.status()["counters"]["pe"]:
        if time.monotonic() - start > float(timeout):
            sys.exit(f"bench: {run}: writes still unacknowledged after {timeout} s")
        time.sleep(0.01)

def cmd_lag(arun, brun, out, *fio):
    """Runs fio, then polls alpha's pe and beta's dw every 10 ms until pe is
    0 and dw has not changed for 1 s. The lag is the time from fio's exit
    to the first sample with pe 0 and dw at its final value."""
    a, b = Node(arun), Node(brun)
    a0, b0 = a.status()["counters"], b.status()["counters"]
    subprocess.run(list(fio), check=True)
    t_end = time.monotonic()
    samples, nxt = [], t_end
    while True:
        sa, sb = a.status()["counters"], b.status()["counters"]
        t = time.monotonic() - t_end
        samples.append((t, sa["pe"], sb["dw"], sa["dw"]))
        last = samples[-1]
        quiet = [s for s in samples if s[0] >= t - 1.0]
        if last[1] == 0 and samples[0][0] < t - 1.0 and all(s[1] == 0 and s[2] == last[2] for s in quiet):
            break
        if t > 120:
            break
        nxt += 0.01
        time.sleep(max(0.0, nxt - time.monotonic()))
    final = samples[-1][2]
    done = next((s for s in samples if s[1] == 0 and s[2] == final), None)
    if done is not None and any(s[1] != 0 for s in samples if s[0] > done[0]):
        done = None
    first = samples[0]
    res = {
        "lag_s": done[0] if done and samples[-1][1] == 0 else None,
        "first_poll_s": first[0],
        "pe_at_end": first[1],
        "behind_kib_at_end": first[3] - first[2],
        "alpha_dw_kib": samples[-1][3] - a0["dw"],
        "beta_dw_kib": final - b0["dw"],
        "polls": len(samples),
        "poll_interval_ms": 1000 * samples[-1][0] / max(1, len(samples) - 1),
    }
    with open(out, "w") as f:
        json.dump(res, f)

def cmd_change(uri, seed, fraction):
    """Writes new random data to fraction of the export's 4 KiB blocks,
    chosen at random with seed, one NBD write each, then a flush."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // 4096
    rng = random.Random(int(seed))
    chosen = sorted(rng.sample(range(blocks), round(blocks * float(fraction))))
    for blk in chosen:
        h.pwrite(rng.randbytes(4096), blk * 4096)
    h.flush()
    h.shutdown()
    print(len(chosen))

def cmd_gen(path, size, seed):
    """size bytes of seeded random data."""
    rng = random.Random(int(seed))
    with open(path, "wb") as f:
        for _ in range(int(size) >> 20):
            f.write(rng.randbytes(1 << 20))

if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
PY
}

run_replication() {
	local start=$SECONDS configs r i c
	if [[ $(id -u) != 0 ]]; then
		echo "bench: replication needs root (network namespaces): skipped" >&2
		return 0
	fi
	mkdir -p "$rdir/json" "$rdir/alpha" "$rdir/beta"
	: >"$rdir/alpha.log"
	: >"$rdir/beta.log"
	rep_py=
	for p in python3 /usr/bin/python3; do
		if "$p" -c 'import nbd; nbd.NBD' 2>/dev/null; then rep_py=$p; break; fi
	done
	[[ -n $rep_py ]] || { echo "bench: no python3 with libnbd (python3-libnbd)" >&2; return 1; }
	rep_helper
	rep_hosts
	cat /proc/loadavg >"$rdir/loadavg.start"
	rep_write_conf protoA 'net { protocol A; } disk { c-plan-ahead 0; resync-rate 4G; }'
	rep_write_conf protoC 'net { protocol C; } disk { c-plan-ahead 0; resync-rate 4G; }'
	rep_write_conf protoAnf 'net { protocol A; } disk { c-plan-ahead 0; resync-rate 4G; disk-flushes no; }'
	rep_write_conf protoCnf 'net { protocol C; } disk { c-plan-ahead 0; resync-rate 4G; disk-flushes no; }'
	# the ceiling of a peer that acks barriers only once the data is durable:
	# what this machine's disk takes, made durable, in MB/s
	dd if=/dev/zero of="$rdir/dd.img" bs=1M count=1024 conv=fdatasync 2>&1 |
		sed -n 's/.* s, \([0-9.]*\) \([MG]\)B\/s$/\1 \2/p' >"$rdir/durable-rate.txt"
	rm -f "$rdir/dd.img"
	rep_durable_writer allocated
	rep_durable_writer sparse
	rep_durable_writer allocated 1M
	rep_write_conf csums 'net { protocol A; csums-alg sha256; } disk { c-plan-ahead 0; resync-rate 4G; }'

	# 1. fio: alone, protocol A, protocol C; then, informational, where
	# protocol C's time goes at 4 KiB: without the Secondary's flushes
	# (protoCnf), and with fio keeping 128 writes in flight (protoC128,
	# the protoC configuration); and alone, A and C at 4 KiB on sparse
	# disk files (sparse-*), where ext4 allocates the blocks as they are
	# written back
	configs=(alone protoA protoC protoAnf protoCnf protoC128 sparse-alone sparse-protoA sparse-protoC)
	for ((r = 1; r <= fio_rounds; r++)); do
		for ((i = 0; i < ${#configs[@]}; i++)); do
			c=${configs[$(((i + r - 1) % ${#configs[@]}))]}
			rep_label="fio $c, round $r"
			echo "bench: round $r/$fio_rounds: $rep_label"
			case $c in
			alone | sparse-alone) rep_conf=$rdir/protoA.conf ;;
			protoC128) rep_conf=$rdir/protoC.conf ;;
			*) rep_conf=$rdir/${c#sparse-}.conf ;;
			esac
			if [[ $c == sparse-* ]]; then rep_disks sparse; else rep_disks allocated; fi
			if [[ $c == *alone ]]; then rep_alone; else rep_pair; fi
			case $c in
			protoC128) rep_fio "$c" "$r" randwrite 4k 128 ;;
			protoCnf | sparse-*) rep_fio "$c" "$r" randwrite 4k 32 ;;
			*)
				rep_fio "$c" "$r" randwrite 4k 32
				[[ $c == alone ]] || rep_ctl idle "$rdir/alpha/run" 120
				rep_fio "$c" "$r" write 1M 8
				;;
			esac
			rep_down
		done
	done

	# 2. replication lag after a 10 s burst, protocol A
	rep_conf=$rdir/protoA.conf
	for ((r = 1; r <= rounds; r++)); do
		rep_label="lag, round $r"
		echo "bench: round $r/$rounds: replication lag after a 10 s burst (protocol A)"
		rep_disks allocated
		rep_pair
		rep_ctl lag "$rdir/alpha/run" "$rdir/beta/run" "$rdir/lag.r$r.json" \
			fio --name=burst --ioengine=nbd --uri="$(rep_uri)" --rw=randwrite --bs=4k --iodepth=32 --size=1000M \
			--runtime=10 --time_based --randseed=4242 --output-format=json --output="$rdir/lag.r$r.fio.json"
		rep_down
	done

	# 3. resync of 1 % changed blocks: bitmap, csums, rsync
	echo "bench: a 1 GiB file of random data for the resync runs"
	rep_ctl gen "$rdir/base.img" $((1 << 30)) 1
	for ((r = 1; r <= rounds; r++)); do
		if ((r % 2)); then
			rep_resync bitmap "$r"
			rep_resync csums "$r"
		else
			rep_resync csums "$r"
			rep_resync bitmap "$r"
		fi
	done
	cat /proc/loadavg >"$rdir/loadavg.end"
	rep_cleanup
	"$bin" --version >"$rdir/version.txt"
	# sed reads to the end: head would make rsync die of SIGPIPE (pipefail)
	rsync --version | sed -n 1p >"$rdir/rsync-version.txt"
	echo "$((SECONDS - start))" >"$rdir/seconds.txt"
	echo "bench: replication part done in $((SECONDS - start)) s"
}

for part in $parts; do
	"run_$part"
done
python3 scripts/bench_report.py "$out" BENCHMARKS.md
echo "bench: BENCHMARKS.md updated; raw data in $out"
