#!/usr/bin/env bash
# Builds rathole 0.5.0, the plain TCP tunnel that `scripts/bench.sh --peers`
# measures next to gitproxy, and prints the path of its binary on stdout.
#
#   scripts/lib/rathole.sh        # -> .../gitproxy-bench/rathole-0.5.0/bin/rathole
#
# The build lives in a cache directory outside the repository
# (GITPROXY_BENCH_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/gitproxy-bench)
# and runs once: a binary already there is reused. The source comes from
# crates.io through cargo (a throwaway project depending on `rathole =0.5.0`,
# `cargo fetch`), is built with its own Cargo.lock except for `time`, whose
# pinned 0.3.29 no longer compiles with current rustc (0.3.36 does), and with
# TCP only: no TLS (no OpenSSL), no noise, no websocket, no hot reload.
# Everything cargo prints goes to build.log in the cache directory; on failure
# the script says where it is and exits non-zero.
set -euo pipefail

version=0.5.0
cache="${GITPROXY_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gitproxy-bench}/rathole-$version"
bin="$cache/bin/rathole"

if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache/bin" "$cache/fetch/src"
log="$cache/build.log"
: >"$log"

fail() {
    echo "error: building rathole $version failed ($1); build log: $log" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
}

echo "==> building rathole $version (TCP only) into $cache, once (LTO: 17 minutes on a busy 2-core machine); log: $log" >&2

# A throwaway project whose only job is to make cargo download the crate.
cat >"$cache/fetch/Cargo.toml" <<EOF
[package]
name = "rathole-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
rathole = { version = "=$version", default-features = false }

[workspace]
EOF
: >"$cache/fetch/src/lib.rs"
cargo fetch --manifest-path "$cache/fetch/Cargo.toml" >>"$log" 2>&1 || fail "cargo fetch"

manifest=$(cargo metadata --format-version 1 --manifest-path "$cache/fetch/Cargo.toml" 2>>"$log" |
    python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "rathole":
        print(p["manifest_path"])
') || fail "cargo metadata"
[ -n "$manifest" ] || fail "rathole $version not found in the registry cache"

# Build a copy: the registry's source directory is cargo's, not ours.
rm -rf "$cache/src"
cp -R "$(dirname "$manifest")" "$cache/src"
chmod -R u+w "$cache/src"
(
    cd "$cache/src"
    cargo update -p time --precise 0.3.36 &&
        cargo build --release --no-default-features --features server,client \
            --target-dir "$cache/target"
) >>"$log" 2>&1 || fail "cargo build"

cp "$cache/target/release/rathole" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "==> rathole $version built: $bin" >&2
echo "$bin"
