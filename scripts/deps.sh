#!/usr/bin/env bash
# Installs what `make test`, `make demo` and `make bench` need on Debian:
# missing packages with apt-get, then the Go modules. Without root it only
# reports what is missing (the tests that need it then skip, or fail under
# NBDMIRROR_REQUIRE_E2E=1).
set -euo pipefail

packages=(
	libnbd-bin      # nbdinfo, nbdcopy, nbdfuse
	python3-libnbd  # nbdsh and the libnbd edge-case probe
	nbdkit          # reference server; error/delay filters for failing disks
	nbd-server      # reference server; transaction log + nbd-trplay
	qemu-utils      # qemu-io, qemu-img, qemu-nbd
	fio
	fuse3           # fusermount3 for nbdfuse
	nftables iproute2 kmod
	e2fsprogs mount util-linux
	rsync
	systemd man-db  # systemd-analyze verify/security of the units (and man for their Documentation=)
)

missing=()
for p in "${packages[@]}"; do
	[[ $p == \#* ]] && continue
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done

if ((${#missing[@]})); then
	if [[ $(id -u) != 0 ]]; then
		echo "deps: missing Debian packages: ${missing[*]} (run 'sudo make deps')" >&2
		[[ ${NBDMIRROR_REQUIRE_E2E:-} == 1 ]] && exit 1
	else
		echo "deps: installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
fi

go mod download
