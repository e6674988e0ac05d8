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
	openssl         # certificates for the TLS fault tests
	e2fsprogs mount util-linux
	rsync
	systemd man-db  # systemd-analyze verify/security of the units (and man for their Documentation=)
)
# Installed without their recommends (resource-agents alone would pull in
# fence-agents and crmsh's Python stack, none of which the tests use).
lean=(
	resource-agents      # ocf-tester, ra-api-1.dtd, ocf-returncodes
	pacemaker-cli-utils  # crm_attribute (promotion scores)
	libxml2-utils        # xmllint: ocf-tester validates the agent's meta-data
	pacemaker corosync   # the two-node cluster of TestPacemaker_* (make test-cluster)
)

# not_installed PACKAGE... prints those not installed.
not_installed() {
	local p
	for p in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			echo "$p"
		fi
	done
}
mapfile -t missing < <(not_installed "${packages[@]}")
mapfile -t missing_lean < <(not_installed "${lean[@]}")

if ((${#missing[@]} + ${#missing_lean[@]})); then
	if [[ $(id -u) != 0 ]]; then
		echo "deps: missing Debian packages: ${missing[*]} ${missing_lean[*]} (run 'sudo make deps')" >&2
		[[ ${NBDMIRROR_REQUIRE_E2E:-} == 1 ]] && exit 1
	else
		echo "deps: installing ${missing[*]} ${missing_lean[*]}"
		apt-get update -qq
		if ((${#missing[@]})); then
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
		fi
		if ((${#missing_lean[@]})); then
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_lean[@]}" >/dev/null
		fi
	fi
fi

go mod download
