#!/usr/bin/env bash
# THE long property/fuzz run of gitproxy (README "Property tests"; issue 10).
#
#   scripts/fuzz.sh                 # every prop_* test, 100,000 cases each
#   FUZZ_CASES=1000000 scripts/fuzz.sh
#   scripts/fuzz.sh policy          # only the prop_* tests whose name holds "policy"
#
# Every property test of the workspace is named prop_*; each one uses
# proptest's default configuration, so PROPTEST_CASES sets how many cases it
# runs. The test suite (scripts/test.sh) runs them with proptest's default of
# 256 cases; this script runs FUZZ_CASES (default 100,000) of each, in the
# release profile, and prints one line per property with its case count.
# A failure prints proptest's minimal failing input and the seed is saved
# under proptest-regressions/ next to the test (commit it: it is replayed by
# every later run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cases="${FUZZ_CASES:-100000}"
filter="prop_${1:-}"
start=$(date +%s)

echo "==> cargo test --release --workspace --lib --bins --tests (build)" >&2
cargo test --release --workspace --lib --bins --tests --no-run >&2

log=$(mktemp "${TMPDIR:-/tmp}/gitproxy-fuzz.XXXXXX")
trap 'rm -f "$log"' EXIT
echo "==> PROPTEST_CASES=$cases cargo test --release --workspace --lib --bins --tests -- $filter" >&2
status=0
PROPTEST_CASES="$cases" cargo test --release --workspace --lib --bins --tests -- "$filter" \
    --test-threads=2 2>&1 | tee "$log" || status=$?

echo
echo "==> summary ($(( $(date +%s) - start ))s)"
passed=$(grep -cE '^test .*prop_.* \.\.\. ok$' "$log" || true)
failed=$(grep -cE '^test .*prop_.* \.\.\. FAILED$' "$log" || true)
grep -E '^test .*prop_.* \.\.\. (ok|FAILED)$' "$log" |
    sed -E "s/^test (.*) \.\.\. (ok|FAILED)$/    \2  \1  ($cases cases)/"
echo "    $passed properties passed, $failed failed, $cases cases each"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
