#!/usr/bin/env bash
# THE benchmark command of gitproxy (README "Benchmarks", BENCHMARKS.md).
#
#   scripts/bench.sh                      # full run, report in BENCHMARKS.run.md
#   scripts/bench.sh --quick              # seconds-long smoke run
#   scripts/bench.sh --only small,bulk    # some scenarios
#   scripts/bench.sh --peers              # + rathole 0.5.0 in the small and bulk tables
#   BENCH_OUT=/tmp/run.md scripts/bench.sh
#
# Builds the release binaries (broker, agent, gitproxy-bench), then runs
# gitproxy-bench, which starts an upstream, the broker and an agent on
# loopback and measures direct access, the tunnel (agent mode) and the
# direct-mode front door side by side. Arguments go to gitproxy-bench,
# except --peers: it builds rathole 0.5.0 (plain TCP) once into a cache
# directory outside the repository (scripts/lib/rathole.sh) and passes it as
# `--rathole PATH`, so the small and bulk tables also show a plain TCP tunnel
# measured in the same run; without a usable rathole the run stops.
# Run it on a quiet machine: it prints the load average it started with.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing wrk (Debian)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2 ||
            echo "    wrk not installed: the in-process load generator is used" >&2
    else
        echo "    wrk not found: the in-process load generator is used" >&2
    fi
fi

args=()
peers=0
for a in "$@"; do
    if [ "$a" = --peers ]; then peers=1; else args+=("$a"); fi
done

echo "==> cargo build --release --bins" >&2
cargo build --release --workspace --bins >&2

if [ "$peers" = 1 ]; then
    rathole=$(scripts/lib/rathole.sh) || {
        echo "error: --peers needs rathole 0.5.0 and it could not be built (see above)" >&2
        exit 1
    }
    args+=(--rathole "$rathole")
fi

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export GITPROXY_BIN_DIR="${GITPROXY_BIN_DIR:-$target_dir/release}"
out="${BENCH_OUT:-BENCHMARKS.run.md}"

echo "==> load average: $(cut -d' ' -f1-3 /proc/loadavg) (quiet machine: 1-min < 0.7)" >&2
echo "==> $GITPROXY_BIN_DIR/gitproxy-bench --out $out ${args[*]}" >&2
exec "$GITPROXY_BIN_DIR/gitproxy-bench" --out "$out" "${args[@]}"
