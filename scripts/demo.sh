#!/usr/bin/env bash
# make demo: two nodes, alpha and beta, replicating resource r0 on one
# machine (loopback addresses 127.0.0.1 and 127.0.0.2, one disk file, one
# run directory and one daemon each). Initial full sync, ext4 on alpha's
# export through a real NBD client (nbdfuse + a loop device), a disconnect
# and the resync that follows, a planned switchover to beta, and a final
# comparison of the two disks. Needs root (loop devices, mount). Prints each
# command it runs; leaves nothing running or mounted.
set -euo pipefail

[[ $(id -u) == 0 ]] || { echo "demo: needs root for the loop devices and mount (run 'sudo make demo')" >&2; exit 1; }
for t in nbdfuse fusermount3 losetup mkfs.ext4 ss; do
	command -v "$t" >/dev/null || { echo "demo: $t not found (run 'make deps')" >&2; exit 1; }
done

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
indent() { sed 's/^./    &/'; }
# run NODE CMD...: print a shell command as typed on NODE, then run it.
run() { local n=$1; shift; echo "$n# $*"; "$@"; }
# nbdm NODE ARGS...: nbdmirror as NODE, with this demo's configuration and NODE's run directory.
nbdm() { local n=$1; shift; "$bin" --config "$conf" --node "$n" --run-dir "$work/$n/run" "$@"; }
# on NODE ARGS...: print an nbdmirror command as typed on NODE, run it, indent its output.
on() { local n=$1; shift; echo "$n# nbdmirror $*"; nbdm "$n" "$@" 2>&1 | indent; }
# status NODE: the resource lines of NODE's /proc/drbd-style status file.
status() { echo "$1# cat $work/$1/run/status"; tail -n +3 "$work/$1/run/status" | indent; }
# watch_sync NODE: print NODE's status file every 0.5 s until NODE is Connected
# and UpToDate/UpToDate, then confirm with wait-sync. (wait-sync alone returns
# at once while the resync has not started yet, e.g. just after primary --force.)
watch_sync() {
	local i
	for ((i = 0; i < 600; i++)); do
		[[ $(nbdm "$1" cstate r0) == Connected && $(nbdm "$1" dstate r0) == UpToDate/UpToDate ]] && break
		status "$1"; sleep 0.5
	done
	status "$1"
	on "$1" wait-sync --timeout 10s r0
	((i < 600)) || { echo "demo: $1 is not in sync after 5 minutes" >&2; return 1; }
}

cd "$(dirname "$0")/.."
bin=${NBDMIRROR_BIN:-$PWD/bin/nbdmirror}
if [[ -z ${NBDMIRROR_BIN:-} && -z ${MAKELEVEL:-} ]]; then # under `make demo`, make has just built it
	step "build"
	make --no-print-directory build
fi

work=$(mktemp -d /tmp/nbdmirror-demo.XXXXXX)
conf=$work/nbdmirror.conf
alpha_pid= beta_pid= fuse_pid= fuse_dir= loop= mnt=$work/mnt
# fuse_up NODE: NODE's export as a file (nbdfuse), then as a block device ($loop).
fuse_up() {
	fuse_dir=$work/$1/fuse
	echo "$1# nbdfuse $fuse_dir/disk 'nbd+unix:///r0?socket=$work/$1/run/nbd.sock' &"
	nbdfuse "$fuse_dir/disk" "nbd+unix:///r0?socket=$work/$1/run/nbd.sock" & fuse_pid=$!
	for _ in $(seq 100); do [[ -s $fuse_dir/disk ]] && break; sleep 0.1; done
	echo "$1# losetup -f --show $fuse_dir/disk"
	loop=$(losetup -f --show "$fuse_dir/disk"); echo "    $loop"
}
# fuse_down NODE: unmount, release the loop device, stop nbdfuse (its NBD client leaves).
fuse_down() {
	run "$1" sync
	run "$1" umount "$mnt"
	run "$1" losetup -d "$loop"; loop=
	run "$1" fusermount3 -u "$fuse_dir"; wait "$fuse_pid" || true; fuse_pid=
}
# demote NODE: secondary, retried for up to 10 s while the NBD client that
# just left is still counted (its disconnect reaches the daemon a moment later).
demote() {
	echo "$1# nbdmirror secondary r0"
	local out
	for _ in $(seq 100); do
		out=$(nbdm "$1" secondary r0 2>&1) && { [[ -z $out ]] || indent <<<"$out"; return 0; }
		[[ $out == *"held open"* ]] || break
		sleep 0.1
	done
	indent <<<"$out"; return 1
}
cleanup() {
	local rc=$?
	set +e
	mountpoint -q "$mnt" && umount "$mnt"
	[[ -n $loop ]] && losetup -d "$loop"
	[[ -n $fuse_pid ]] && { fusermount3 -u "$fuse_dir"; wait "$fuse_pid"; }
	for n in alpha beta; do
		pid=${n}_pid
		[[ -n ${!pid} ]] && { kill "${!pid}" 2>/dev/null; wait "${!pid}" 2>/dev/null; }
		if ((rc != 0)) && [[ -f $work/$n/daemon.log ]]; then
			echo "--- $n daemon log (last 30 lines)"; tail -n 30 "$work/$n/daemon.log"
		fi
	done
	rm -rf "$work"
	((rc == 0)) || echo "demo FAILED (exit $rc)" >&2
}
trap cleanup EXIT

step "a configuration for both nodes: r0 on a sparse 256 MiB disk file each"
port=7789
while [[ -n $(ss -Hltn "sport = :$port") ]]; do port=$((RANDOM % 20000 + 30000)); done
mkdir -p "$work"/{alpha,beta}/fuse "$mnt"
truncate -s 256M "$work/alpha/disk.img" "$work/beta/disk.img"
cat >"$conf" <<EOF
resource r0 {
  net  { protocol A; shared-secret "demo-secret"; }
  disk { c-plan-ahead 0; resync-rate 64M; }      # a fixed rate, slow enough to watch
  on alpha { disk $work/alpha/disk.img; meta-disk internal; address 127.0.0.1:$port; }
  on beta  { disk $work/beta/disk.img;  meta-disk internal; address 127.0.0.2:$port; }
}
EOF
echo "$conf:"; indent <"$conf"
echo "(each nbdmirror command below runs as: nbdmirror --config $conf --node NODE --run-dir $work/NODE/run ...)"
on alpha create-md r0
on beta create-md r0

step "start both daemons (logs in $work/NODE/daemon.log), bring r0 up, wait for the connection"
for n in alpha beta; do
	echo "$n# nbdmirror daemon 2>$work/$n/daemon.log &"
	"$bin" --config "$conf" --node "$n" --run-dir "$work/$n/run" daemon 2>"$work/$n/daemon.log" &
	printf -v "${n}_pid" %s $!
done
for _ in $(seq 100); do [[ -S $work/alpha/run/control.sock && -S $work/beta/run/control.sock ]] && break; sleep 0.1; done
on alpha up r0
on beta up r0
on alpha wait-connect --timeout 30s r0
on beta wait-connect --timeout 30s r0
echo "beta# cat $work/beta/run/status"; indent <"$work/beta/run/status"

step "initial sync: alpha's data is declared the valid copy; beta becomes SyncTarget"
on alpha primary --force r0
watch_sync beta

step "ext4 on alpha's export; write files and record their sha256"
fuse_up alpha
# mkfs discards the whole device first: a 255 MiB TRIM, replicated in pieces.
run alpha mkfs.ext4 -q "$loop"
run alpha mount "$loop" "$mnt"
mkdir -p "$mnt/blobs" "$mnt/notes"
echo "alpha# (write 8 random 4 MiB blobs and 200 small notes into $mnt)"
for i in $(seq 1 8); do head -c 4M /dev/urandom >"$mnt/blobs/blob-$i"; done
for i in $(seq 1 200); do echo "note $i written on alpha at $(date -Is)" >"$mnt/notes/note-$i.txt"; done
record() { (cd "$mnt" && find blobs notes -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/files.sha256"; }
record
echo "    $(wc -l <"$work/files.sha256") files, $(du -sh "$mnt" | cut -f1) in $mnt"
run alpha sync
on alpha status r0

step "beta disconnects; alpha writes on and counts the blocks beta misses (oos:)"
on beta disconnect r0
echo "alpha# (write 12 more 4 MiB blobs)"
for i in $(seq 9 20); do head -c 4M /dev/urandom >"$mnt/blobs/blob-$i"; done
record
run alpha sync
echo "alpha# sleep 1   (the status file is rewritten once a second)"; sleep 1
status alpha

step "beta reconnects: only the blocks marked out of sync are resynchronised"
on beta connect r0
on beta wait-connect --timeout 30s r0
watch_sync beta
on alpha status r0

step "planned switchover: alpha lets go, beta becomes Primary and mounts the same file system"
fuse_down alpha
demote alpha
on beta primary r0
fuse_up beta
run beta mount "$loop" "$mnt"
echo "beta# (cd $mnt && sha256sum -c --quiet $work/files.sha256)"
(cd "$mnt" && sha256sum -c --quiet "$work/files.sha256")
echo "    OK: all $(wc -l <"$work/files.sha256") files read back on beta with the sha256 recorded on alpha"
on beta status r0

step "shut down: beta lets go, r0 down on both, daemons stopped; compare the two disks"
fuse_down beta
demote beta
size=$(nbdm beta status --json r0 | grep -o '"size_bytes": *[0-9]*' | grep -o '[0-9]*$')
echo "    data area: $size bytes (status --json: size_bytes)"
on beta down r0
on alpha down r0
for n in alpha beta; do
	pid=${n}_pid
	run "$n" kill "${!pid}"; wait "${!pid}"; printf -v "$pid" %s ""
done
a=$(head -c "$size" "$work/alpha/disk.img" | sha256sum | cut -d' ' -f1)
b=$(head -c "$size" "$work/beta/disk.img" | sha256sum | cut -d' ' -f1)
echo "alpha# head -c $size $work/alpha/disk.img | sha256sum"; echo "    $a"
echo "beta# head -c $size $work/beta/disk.img | sha256sum"; echo "    $b"
[[ $a == "$b" ]] || { echo "demo: the disks differ" >&2; exit 1; }
echo "    disks equal"
if grep -E 'ProtocolError|protocol violation|panic' "$work"/{alpha,beta}/daemon.log; then
	echo "demo: a daemon log reports a protocol error or a panic" >&2; exit 1
fi
echo
echo "demo finished: nothing left running or mounted"
