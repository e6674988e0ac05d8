#!/usr/bin/env bash
# make demo: export a file with `nbdmirror serve`, put an ext4 file system on
# it through a real NBD client (nbdfuse + a loop device), write files, read
# them back after dropping the caches, check the file system, and clean up.
# Needs root (loop devices, mount). Leaves nothing running or mounted.
set -euo pipefail

bin=${NBDMIRROR_BIN:-$PWD/bin/nbdmirror}
[[ -x $bin ]] || { echo "demo: $bin not built (run 'make build')" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "demo: needs root for the loop device and mount (run 'sudo make demo')" >&2; exit 1; }

work=$(mktemp -d /tmp/nbdmirror-demo.XXXXXX)
srv_pid= fuse_pid= loop=
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
	set +e
	mountpoint -q "$work/mnt" && umount "$work/mnt"
	[[ -n $loop ]] && losetup -d "$loop"
	[[ -n $fuse_pid ]] && { fusermount3 -u "$work/fuse" 2>/dev/null; wait "$fuse_pid" 2>/dev/null; }
	[[ -n $srv_pid ]] && { kill "$srv_pid" 2>/dev/null; wait "$srv_pid" 2>/dev/null; }
	rm -rf "$work"
}
trap cleanup EXIT

step "a 256 MiB disk file, served over NBD on a Unix socket"
truncate -s 256M "$work/disk.img"
mkdir -p "$work/fuse" "$work/mnt"
"$bin" serve --file "$work/disk.img" --export r0 --listen "unix:$work/nbd.sock" 2>"$work/serve.log" &
srv_pid=$!
for _ in $(seq 100); do [[ -S $work/nbd.sock ]] && break; sleep 0.1; done
uri="nbd+unix:///r0?socket=$work/nbd.sock"
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

step "unmount and check the file system"
umount "$work/mnt"
e2fsck -fn "$loop" | tail -1

step "stop the server (SIGTERM: finish in-flight requests, flush, exit)"
losetup -d "$loop"; loop=
fusermount3 -u "$work/fuse"; wait "$fuse_pid" || true; fuse_pid=
kill "$srv_pid"; wait "$srv_pid"; srv_pid=
sed 's/^/    /' "$work/serve.log"
echo
echo "demo finished: nothing left running or mounted"
