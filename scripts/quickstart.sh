#!/usr/bin/env bash
# THE main-job command of gitproxy: builds the release binaries, starts a
# simulated GitLab, a broker and an on-premise agent on loopback, and shows
# real GitLab traffic (REST with curl and python-gitlab, a real git clone, a
# remediation merge request and a git push) flowing through the broker's front
# door and the agent's tunnel, plus the same through a direct-mode connection.
#
#   scripts/quickstart.sh          # run the demo, then stop everything
#   scripts/quickstart.sh --keep   # leave the three programs running until Ctrl-C
#
# Everything lives in a temporary directory that is removed on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
GITPROXY_SCRIPT_START=$(date +%s)
export GITPROXY_SCRIPT_START
# shellcheck source=scripts/lib/deps.sh
. scripts/lib/deps.sh

KEEP=0
case "${1:-}" in
    --keep) KEEP=1 ;;
    "") ;;
    *) die "usage: scripts/quickstart.sh [--keep]" ;;
esac

# Loopback never goes through a proxy the caller's shell may have set.
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NO_PROXY="$no_proxy"

section "dependencies"
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH: install the Rust toolchain (rustup) first"
ensure_system_deps
ensure_python_deps

section "cargo build --release --bins"
cargo build --release --workspace --bins
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$target_dir/release"
for b in gitproxy-broker gitproxy-agent gitlab-sandbox; do
    [ -x "$BIN/$b" ] || die "missing binary $BIN/$b"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gitproxy-quickstart.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Stop in reverse order of start: agent, broker, sandbox.
    local i
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ] && [ -d "$WORK" ]; then
        for f in sandbox.err broker.log agent.log; do
            [ -s "$WORK/$f" ] || continue
            printf '\n--- last lines of %s ---\n' "$f" >&2
            tail -n 20 "$WORK/$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX TIMEOUT_S PID WHAT: polls FILE until a line matches,
# failing early when PID dies. Prints the first matching line.
wait_for() {
    local file=$1 re=$2 timeout=$3 pid=$4 what=$5
    local deadline=$(( $(date +%s) + timeout ))
    while :; do
        if [ -f "$file" ] && grep -m1 -E "$re" "$file"; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$what exited before it was ready"
        [ "$(date +%s)" -lt "$deadline" ] || die "$what not ready within ${timeout}s"
        sleep 0.1
    done
}

json_field() { python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())[sys.argv[1]])' "$1"; }

section "start the GitLab sandbox (user demo, 251 projects)"
"$BIN/gitlab-sandbox" --listen 127.0.0.1:0 --demo --data-dir "$WORK/gitlab" \
    >"$WORK/sandbox.out" 2>"$WORK/sandbox.err" &
PIDS+=($!)
ready=$(wait_for "$WORK/sandbox.out" '"listening"' 180 "${PIDS[0]}" "gitlab-sandbox")
GITLAB_URL=$(json_field external_url <<<"$ready")
GITLAB_TOKEN=$(json_field token <<<"$ready")
log "GitLab at $GITLAB_URL"

section "generate an accessKey and write broker.toml"
"$BIN/gitproxy-broker" keygen >"$WORK/keygen.out"
ACCESS_KEY=$(sed -n 1p "$WORK/keygen.out")
ACCESS_KEY_LINE=$(sed -n 2p "$WORK/keygen.out")
cat >"$WORK/broker.toml" <<TOML
# Agent mode: requests travel through the on-premise agent's tunnel.
[[connection]]
id = "acme"
mode = "agent"
gitlab_url = "$GITLAB_URL"
token = "$GITLAB_TOKEN"
$ACCESS_KEY_LINE

# Direct mode: the broker calls GitLab itself.
[[connection]]
id = "acme-direct"
mode = "direct"
gitlab_url = "$GITLAB_URL"
token = "$GITLAB_TOKEN"
TOML
sed -e 's/^token = .*/token = "***"/' "$WORK/broker.toml" | sed 's/^/    | /'

section "start gitproxy-broker"
GITPROXY_LOG_FORMAT=json "$BIN/gitproxy-broker" serve --config "$WORK/broker.toml" \
    --agent-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 2>"$WORK/broker.log" &
PIDS+=($!)
BROKER_PID=$!
agent_line=$(wait_for "$WORK/broker.log" '"listener":"agent"' 30 "$BROKER_PID" "gitproxy-broker")
api_line=$(wait_for "$WORK/broker.log" '"listener":"api"' 30 "$BROKER_PID" "gitproxy-broker")
AGENT_ADDR=$(json_field addr <<<"$agent_line")
API_ADDR=$(json_field addr <<<"$api_line")
API="http://$API_ADDR"
log "agent listener: $AGENT_ADDR (the agent dials in here)"
log "api listener:   $API_ADDR (front door: $API/gitlab/{connection}/...)"

section "start gitproxy-agent (dials out to the broker; no listening port)"
GITPROXY_BROKER_URL="http://$AGENT_ADDR" GITPROXY_ACCESS_KEY="$ACCESS_KEY" \
    GITPROXY_STATE_FILE="$WORK/agent-state.json" GITPROXY_INSTANCE=quickstart-agent \
    GITPROXY_LOG_FORMAT=json "$BIN/gitproxy-agent" run 2>"$WORK/agent.log" &
PIDS+=($!)
AGENT_PID=$!
wait_for "$WORK/agent.log" '"message":"connected to the broker"' 30 "$AGENT_PID" "gitproxy-agent" >/dev/null
log "agent: connected to the broker"
# The exec probe Kubernetes uses; the state file is written right after connecting.
for _ in $(seq 1 50); do
    GITPROXY_STATE_FILE="$WORK/agent-state.json" "$BIN/gitproxy-agent" health >/dev/null 2>&1 && break
    sleep 0.1
done
log "gitproxy-agent health: $(GITPROXY_STATE_FILE="$WORK/agent-state.json" "$BIN/gitproxy-agent" health)"

section "REST through the tunnel: curl, no credentials (the broker adds the connection's token)"
log "\$ curl $API/gitlab/acme/api/v4/version"
log "$(curl -fsS "$API/gitlab/acme/api/v4/version")"

section "python-gitlab through the tunnel"
python3 - "$API/gitlab/acme" "$GITLAB_TOKEN" <<'PY'
import json
import sys

import gitlab

base, token = sys.argv[1], sys.argv[2]
gl = gitlab.Gitlab(base, private_token=token, keep_base_url=True)
projects = gl.projects.list(get_all=True, membership=True, min_access_level=30)
print(f"    gl.projects.list(get_all=True, membership=True, min_access_level=30): {len(projects)} projects (Developer or above)")
project = gl.projects.get("demo-group/webapp")
raw = project.files.raw(file_path="package.json", ref=project.default_branch)
deps = json.loads(raw)["dependencies"]
print(f"    demo-group/webapp package.json on {project.default_branch}: "
      + ", ".join(f"{k}@{v}" for k, v in deps.items()))
PY

section "git clone through the tunnel (no credentials in the URL: the broker injects the token)"
log "\$ git clone $API/gitlab/acme/demo-group/webapp.git"
GIT_TERMINAL_PROMPT=0 git -c credential.helper= clone -q \
    "$API/gitlab/acme/demo-group/webapp.git" "$WORK/webapp"
log "cloned: $(git -C "$WORK/webapp" log --oneline -1) [$(git -C "$WORK/webapp" ls-files | tr '\n' ' ')]"

section "remediation through the tunnel: python-gitlab commits a lodash bump on a new branch and opens an MR"
GITLAB_TOKEN="$GITLAB_TOKEN" python3 integration-tests/python/remediate.py \
    "$API/gitlab/acme" demo-group/webapp fix/bump-lodash lodash 4.17.21 >"$WORK/remediate.json"
python3 - "$WORK/remediate.json" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
print(f"    commit {r['commit_id'][:8]} on fix/bump-lodash: {r['commit_title']}")
print(f"    merge request !{r['mr_iid']} ({r['mr_state']}): {r['mr_web_url']}")
d = r["duplicate"]
print(f"    the same merge request again: {d['status']} {d['body']}" if d else "    the same merge request again: no error?!")
PY

section "git push of a new branch through the tunnel (no credentials: the broker injects the token)"
printf '\nEdited through gitproxy.\n' >>"$WORK/webapp/README.md"
git -C "$WORK/webapp" checkout -q -b docs/through-gitproxy
git -C "$WORK/webapp" -c user.name="Quickstart" -c user.email="quickstart@example.com" \
    commit -q -am "Edit the README through gitproxy"
log "\$ git push origin docs/through-gitproxy"
GIT_TERMINAL_PROMPT=0 git -C "$WORK/webapp" -c credential.helper= push -q origin docs/through-gitproxy
branches=$(curl -fsS "$API/gitlab/acme/api/v4/projects/demo-group%2Fwebapp/repository/branches" |
    python3 -c 'import json, sys; print(", ".join(b["name"] for b in json.load(sys.stdin)))')
log "branches of demo-group/webapp in GitLab: $branches"

section "the same REST call through the direct-mode connection"
log "\$ curl $API/gitlab/acme-direct/api/v4/version"
log "$(curl -fsS "$API/gitlab/acme-direct/api/v4/version")"

section "an error made by gitproxy itself (the policy allows only the API and git)"
log "\$ curl $API/gitlab/acme/admin/users"
err_headers=$(curl -sS -o "$WORK/err.json" -D - "$API/gitlab/acme/admin/users" | tr -d '\r')
log "$(grep -m1 '^HTTP/' <<<"$err_headers")  $(grep -i -m1 '^x-gitproxy-error:' <<<"$err_headers")"
log "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["error"] + ": " + d["message"])' "$WORK/err.json")"

section "GET /v1/connections"
curl -fsS "$API/v1/connections" >"$WORK/connections.json"
python3 - "$WORK/connections.json" <<'PY'
import json
import sys

for c in json.load(open(sys.argv[1]))["connections"]:
    agents = ", ".join(
        f"{a['instance']} v{a['version']} since {a['connected_since']} (in flight {a['in_flight']})"
        for a in c["agents"]
    ) or "-"
    print(f"    {c['id']:<12} mode={c['mode']:<6} status={c['status']:<9} gitlab_url={c['gitlab_url']}  agents: {agents}")
PY

section "the broker's request log (one JSON line per request; shown condensed)"
python3 - "$WORK/broker.log" <<'PY'
import json
import sys

for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if not str(e.get("message", "")).startswith("request"):
        continue
    agent = e.get("agent") or "-"
    print(f"    {e['connection']:<11} {e['mode']:<6} {agent:<16} {e['method']:<4} {e['path']:<52} "
          f"{e['status']}  in={e['bytes_in']}B out={e['bytes_out']}B {e['duration_ms']}ms")
PY
log "the last one as logged:"
grep '"message":"request"' "$WORK/broker.log" | tail -n 1 | sed 's/^/    /'

if [ "$KEEP" = 1 ]; then
    section "running; press Ctrl-C to stop"
    log "front door (agent):  $API/gitlab/acme"
    log "front door (direct): $API/gitlab/acme-direct"
    log "connections:         $API/v1/connections"
    log "logs in $WORK (broker.log, agent.log)"
    wait "$AGENT_PID"
fi

section "done: stopping the agent, the broker and the sandbox"
