# Shared by scripts/demo.sh, scripts/test.sh and benches/run.sh. Source it; do not run it.
# Everything here is idempotent and works as root and as an ordinary user (with sudo).

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG="$PG_BIN/pg_config"
PG_ISOLATION_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/isolation/pg_isolation_regress
PGRX_VERSION=0.18.0
PACKAGES=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 libclang-dev clang
          build-essential pkg-config sudo pgbouncer redis-server redis-tools)

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

# Run a command as the user that owns PostgreSQL data folders: postgres when we are root
# (initdb refuses root), ourselves otherwise.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

ensure_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
        log "installing Debian packages: ${missing[*]}"
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # The Debian packages start a cluster of their own; ours run on their own ports, so that
    # one is left as it is.
}

ensure_rust() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
}

ensure_cargo_pgrx() {
    ensure_rust
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        log "installing cargo-pgrx $PGRX_VERSION (takes several minutes, once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        log "cargo pgrx init --pg15 $PG_CONFIG"
        cargo pgrx init --pg15 "$PG_CONFIG"
    fi
    # As an ordinary user, cargo pgrx writes the extension into PostgreSQL's own folders.
    if [ "$(id -u)" -ne 0 ]; then
        local dirs=("$("$PG_CONFIG" --pkglibdir)" "$("$PG_CONFIG" --sharedir)/extension")
        for d in "${dirs[@]}"; do
            if [ ! -w "$d" ]; then
                log "giving group $(id -gn) write access to $d (for cargo pgrx install/test)"
                "${SUDO[@]}" chgrp "$(id -gn)" "$d"
                "${SUDO[@]}" chmod g+w "$d"
            fi
        done
        # Files an earlier install left to another owner (root, say) cannot be overwritten.
        local f
        for f in "${dirs[0]}"/quota_ext.so "${dirs[1]}"/quota_ext.control "${dirs[1]}"/quota_ext--*.sql; do
            if [ -e "$f" ] && [ ! -w "$f" ]; then
                "${SUDO[@]}" chown "$(id -un)" "$f"
            fi
        done
    fi
}

ensure_all() {
    ensure_packages
    ensure_cargo_pgrx
}

# Build quota_ext and install it into the system PostgreSQL 15. $1: "--release" or empty.
install_extension() {
    log "cargo pgrx install $* (into $("$PG_CONFIG" --pkglibdir))"
    (cd "$REPO" && cargo pgrx install --pg-config "$PG_CONFIG" "$@")
}

# start_server DATADIR PORT [extra postgresql.conf lines...]
# A cluster of our own on a loopback port, trust auth, quota_ext preloaded.
start_server() {
    local data="$1" port="$2"
    shift 2
    stop_server "$data" 2>/dev/null || true
    "${SUDO[@]}" rm -rf "$data"
    mkdir -p "$(dirname "$data")"
    if [ "$(id -u)" -eq 0 ]; then install -d -o postgres -g postgres "$data"; else mkdir -p "$data"; fi
    as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$data'"
        echo "shared_preload_libraries = 'quota_ext'"
        echo "max_connections = 200"
        echo "shared_buffers = 512MB"
        echo "logging_collector = off"
        for line in "$@"; do echo "$line"; done
    } | as_pg tee -a "$data/postgresql.conf" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w start >/dev/null \
        || { tail -20 "$data/server.log" >&2; die "server in $data did not start"; }
}

stop_server() {
    local data="$1"
    [ -f "$data/postmaster.pid" ] || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
}

# psql against our server as postgres. Usage: pg_psql PORT [psql args...]
pg_psql() {
    local port="$1"
    shift
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}
