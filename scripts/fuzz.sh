#!/usr/bin/env bash
# Fuzz each target for a while: scripts/fuzz.sh FUZZTIME MINIMIZE PKG:TARGET...
#
# FUZZTIME is go test's -fuzztime: a count (300000x) or a duration (60s).
# With a duration, go1.26's fuzz coordinator can end a clean run with a bare
# "context deadline exceeded" failure when its deadline races its own
# workers' stop (golang/go#75804, fixed in go1.27). That failure, and only
# it, is not a finding: exactly that message, no "Failing input written
# to", no new file in testdata/fuzz/TARGET, no panic and no other failure in
# the output, and the target's corpus replayed without -fuzz passes. Any
# other failure fails the run. A target the package does not define fails
# too: go test -fuzz would otherwise fuzz nothing and pass.
set -uo pipefail
GO=${GO:-go}
if [ $# -lt 3 ]; then
	echo "usage: $0 FUZZTIME MINIMIZE PKG:TARGET..." >&2
	exit 2
fi
fuzztime=$1 minimize=$2
shift 2
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for t in "$@"; do
	pkg=${t%%:*} fn=${t##*:}
	listed=$("$GO" test -list "^${fn}\$" "$pkg" 2>&1)
	if ! grep -qx "$fn" <<<"$listed"; then
		echo "fuzz: $pkg has no fuzz target $fn (FUZZ_TARGETS in the Makefile names it)" >&2
		exit 1
	fi
	dir=${pkg#./}/testdata/fuzz/$fn
	before=$(ls "$dir" 2>/dev/null)
	echo "fuzz $pkg $fn ($fuzztime)"
	"$GO" test -run '^$' -fuzz "^${fn}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimize" "$pkg" 2>&1 | tee "$log"
	rc=${PIPESTATUS[0]}
	[ "$rc" -eq 0 ] && continue
	after=$(ls "$dir" 2>/dev/null)
	if [ "$before" = "$after" ] &&
		! grep -q 'Failing input written to' "$log" &&
		! grep -q '^panic:' "$log" &&
		[ "$(grep -c -- '^--- FAIL' "$log")" -eq 1 ] &&
		grep -A1 -- "^--- FAIL: ${fn} (" "$log" | tail -n1 | grep -qx '    context deadline exceeded' &&
		[ "$(grep -cvE '^(fuzz: |--- FAIL: |    context deadline exceeded$|FAIL|exit status |ok |warning: )' "$log")" -eq 0 ]; then
		echo "fuzz: $fn: the fuzzer's own -fuzztime deadline was reported as a failure (golang/go#75804): no input failed; replaying the corpus"
		if "$GO" test -count=1 -run "^${fn}\$" "$pkg"; then
			continue
		fi
	fi
	echo "fuzz: $pkg $fn failed" >&2
	exit 1
done
