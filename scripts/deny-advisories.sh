#!/usr/bin/env bash
# RustSec advisories for the dependency graph: `cargo deny check advisories`
# with deny.toml. It fetches the advisory database, so it needs network
# access; scripts/test.sh runs the offline checks (bans, licenses, sources)
# only. Run it on a machine with network before a release.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/deps.sh
. scripts/lib/deps.sh

section "cargo deny check advisories"
cargo_tool cargo-deny "$GITPROXY_CARGO_DENY_VERSION"
cargo deny --log-level warn check advisories
