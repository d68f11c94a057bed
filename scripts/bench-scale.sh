#!/usr/bin/env bash
# The scale benchmark of gitproxy (issue 11, BENCHMARKS.md "Scale"):
# one broker replica in cluster mode (a real redis-server) holding N idle
# agents driven by gitproxy-agent-swarm, each on its own TCP connection;
# memory per agent, Redis upkeep, and the reconnect storm after a restart.
#
#   scripts/bench-scale.sh                          # 20,000 agents
#   scripts/bench-scale.sh --scale-agents 5000      # fewer
#   BENCH_OUT=/tmp/scale.md scripts/bench-scale.sh  # default BENCHMARKS.scale.md
#
# Both the broker and the swarm need one file descriptor per agent: run as
# root (the hard limit is raised when the kernel allows it) or raise
# `ulimit -n` beforehand; with a lower limit the largest N that fits runs
# and the report says so.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Raise the limit for this shell and its children when allowed; the
# benchmark tries again itself and reports what it got.
ulimit -Hn 25000 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "==> open-file limit $(ulimit -n) (hard $(ulimit -Hn))" >&2

export BENCH_OUT="${BENCH_OUT:-BENCHMARKS.scale.md}"
exec scripts/bench.sh --only scale "$@"
