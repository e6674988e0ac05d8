#!/bin/bash
# One Pacemaker cluster node for TestPacemaker_*: PID 1 of its own PID
# namespace, run by the test as
#   ip netns exec NS unshare --mount --uts --ipc --pid --kill-child --mount-proc node.sh
# It gives the node its host name, private /run and /dev/shm, its own
# corosync and pacemaker state (bind mounts of the test's per-node copies),
# the test's OCF agents (an overlay on /usr/lib/ocf/resource.d), then starts
# the nbdmirror daemon, corosync and pacemakerd in the foreground of this
# namespace. Killing this process (SIGKILL) kills every process of the node.
#
# Environment: PCMK_NODE (host name), PCMK_STATE (the node's state
# directory), PCMK_RUN (the daemon's run directory, bound on /run/nbdmirror),
# PCMK_OCF (a directory of extra OCF providers), NBDMIRROR (the binary),
# NBDMIRROR_ARGS (its global flags), NBDMIRROR_DAEMON_ARGS (its daemon flags).
# The daemon's, corosync's and pacemakerd's output and PIDs (as this
# namespace numbers them) go to PCMK_STATE/log.
set -euo pipefail

hostname "$PCMK_NODE"
mount --make-rprivate /
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
install -d -o hacluster -g haclient -m 0750 /run/crm
for d in etc/corosync var/lib/pacemaker var/lib/corosync var/log/corosync var/log/pacemaker; do
	mount --bind "$PCMK_STATE/$d" "/$d"
done
# The daemon's run directory is the default, /run/nbdmirror, here (the
# test reaches it through the bind mount's source).
mkdir /run/nbdmirror
mount --bind "$PCMK_RUN" /run/nbdmirror
mount -t overlay overlay -o "ro,lowerdir=$PCMK_OCF:/usr/lib/ocf/resource.d" /usr/lib/ocf/resource.d

logs=$PCMK_STATE/log
mkdir -p "$logs"
# shellcheck disable=SC2086 # the flags are words
"$NBDMIRROR" $NBDMIRROR_ARGS daemon $NBDMIRROR_DAEMON_ARGS >>"$logs/nbdmirror.log" 2>&1 &
echo "nbdmirror $!" >"$logs/pids"
corosync -f >>"$logs/corosync.out" 2>&1 &
echo "corosync $!" >>"$logs/pids"
for ((i = 0; i < 300; i++)); do
	corosync-cfgtool -s >/dev/null 2>&1 && break
	sleep 0.1
done
pacemakerd -f >>"$logs/pacemakerd.out" 2>&1 &
echo "pacemakerd $!" >>"$logs/pids"
echo "node $PCMK_NODE up" >>"$logs/pids"
# PID 1 reaps the orphans; the node lives as long as each of its three
# daemons does.
wait -n
echo "node.sh: a daemon exited; stopping the node" >&2
exit 1
