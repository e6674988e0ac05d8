#!/usr/bin/env bash
# make demo: one node of a resource, run by the node daemon. create-md, start
# `nbdmirror daemon`, bring r0 up and make it Primary; its NBD export gets an
# ext4 file system through a real NBD client (nbdfuse + a loop device); files
# are written and read back after dropping the caches; the status file and
# `nbdmirror status` are shown; then unmount, secondary, down, and SIGTERM.
# Needs root (loop devices, mount). Leaves nothing running or mounted.
set -euo pipefail

bin=${NBDMIRROR_BIN:-$PWD/bin/nbdmirror}
[[ -x $bin ]] || { echo "demo: $bin not built (run 'make build')" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "demo: needs root for the loop device and mount (run 'sudo make demo')" >&2; exit 1; }

work=$(mktemp -d /tmp/nbdmirror-demo.XXXXXX)
run=$work/run conf=$work/nbdmirror.conf
daemon_pid= fuse_pid= loop=
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# nbdm runs nbdmirror as node alpha with this demo's configuration and run directory.
nbdm() { "$bin" --config "$conf" --node alpha --run-dir "$run" "$@"; }
# show prints a command line, runs it and indents its output.
show() { echo "\$ nbdmirror $*"; nbdm "$@" 2>&1 | sed 's/^/    /'; }
cleanup() {
	set +e
	mountpoint -q "$work/mnt" && umount "$work/mnt"
	[[ -n $loop ]] && losetup -d "$loop"
	[[ -n $fuse_pid ]] && { fusermount3 -u "$work/fuse" 2>/dev/null; wait "$fuse_pid" 2>/dev/null; }
	[[ -n $daemon_pid ]] && { kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null; }
	rm -rf "$work"
}
trap cleanup EXIT

step "a configuration: resource r0 on a 256 MiB disk file, this node is alpha"
truncate -s 256M "$work/d0"
mkdir -p "$work/fuse" "$work/mnt"
cat >"$conf" <<EOF
resource r0 {
  disk { al-extents 7; }
  disk $work/d0;
  meta-disk internal;
  on alpha { address 127.0.0.1:7000; }
  on beta  { address 127.0.0.2:7000; }
}
EOF
sed 's/^/    /' "$conf"
show create-md r0

step "start the node daemon (control socket, status file and NBD socket in $run)"
"$bin" --config "$conf" --node alpha --run-dir "$run" daemon 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [[ -S $run/control.sock ]] && break; sleep 0.1; done
show status r0

step "up: attach the disk; primary --force: this node's data is the valid copy, the export r0 appears"
show up r0
show primary --force r0
show role r0
show dstate r0
uri="nbd+unix:///r0?socket=$run/nbd.sock"
echo "\$ nbdinfo '$uri'"
nbdinfo "$uri" | sed 's/^/    /'

step "a real client: nbdfuse exposes the export as a file, losetup makes it a block device"
nbdfuse "$work/fuse/disk" "$uri" &
fuse_pid=$!
for _ in $(seq 100); do [[ -s $work/fuse/disk ]] && break; sleep 0.1; done
loop=$(losetup -f --show "$work/fuse/disk")
echo "loop device: $loop"

step "mkfs.ext4 and mount"
mkfs.ext4 -q -F "$loop"
mount "$loop" "$work/mnt"
df -h "$work/mnt" | sed 's/^/    /'

step "write files, sync, drop the page cache, read them back"
head -c 32M /dev/urandom >"$work/payload.bin"
cp "$work/payload.bin" "$work/mnt/"
for i in $(seq 1 100); do echo "file $i" >"$work/mnt/note-$i.txt"; done
sync
echo 3 >/proc/sys/vm/drop_caches
cmp "$work/payload.bin" "$work/mnt/payload.bin" && echo "payload.bin: identical after the round trip"
[[ $(cat "$work/mnt/note-42.txt") == "file 42" ]] && echo "100 small files: read back"

step "the status file ($run/status, /proc/drbd's layout) and nbdmirror status"
echo "\$ cat $run/status"
sed 's/^/    /' "$run/status"
show status --statistics r0

step "secondary is refused while the file system is mounted (exit 20)"
echo "\$ nbdmirror secondary r0"
code=0
nbdm secondary r0 >"$work/secondary.out" 2>&1 || code=$?
sed 's/^/    /' "$work/secondary.out"
echo "    (exit $code)"
[[ $code == 20 ]] || { echo "demo: secondary was not refused while mounted" >&2; exit 1; }

step "unmount and check the file system; the NBD client leaves"
umount "$work/mnt"
e2fsck -fn "$loop" | tail -1
losetup -d "$loop"; loop=
fusermount3 -u "$work/fuse"; wait "$fuse_pid" || true; fuse_pid=

step "secondary (once the client has disconnected), then down: the bitmap is written, the metadata clean"
for _ in $(seq 100); do nbdm secondary r0 2>/dev/null && break; sleep 0.1; done
show role r0
show down r0
show status r0

step "stop the daemon (SIGTERM: finish in-flight requests, flush, mark the metadata clean, exit)"
kill "$daemon_pid"; wait "$daemon_pid"; daemon_pid=
sed 's/^/    /' "$work/daemon.log"
show dump-md r0
echo
echo "demo finished: nothing left running or mounted"
