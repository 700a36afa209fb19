#!/usr/bin/env bash
# The whole test suite, on each supported PostgreSQL version: `cargo pgrx test pgNN` (behaviour
# inside one backend), then the pgrx-tests/ suites against real servers of our own (many sessions
# at once): all of them on 15 and 17, the concurrency, crash and upgrade suites on 16 and 18;
# then on each version the HTTP suite (http/: PostgREST behind nginx, supabase-js, Chromium).
# Installs whatever it needs first. Works as root and as an ordinary user.
#
# For development: QUOTA_EXT_PG_VERSIONS="17" runs one version alone (CI sets nothing).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/http.sh"

# The test servers, one a line: NAME|PORT|what it is for|settings (;-separated). Each gets
# /tmp/quota_ext-itest-<name>, and the suites find it by QUOTA_EXT_<NAME>_PORT (which also
# overrides the port). Ports are below the kernel's ephemeral range (32768-60999 by default): a
# port in it can be held by the client end of one of the suites' many connections when a
# server starts (seen once: the crash server could not bind).
SERVERS=(
    "TEST|25316|the main test server, with the roles of a Supabase project|max_prepared_transactions = 4"
    "TINY|25321|a small bucket table, a tiny audit queue no writer can drain, four breakers|quota_ext.rate_max_keys = 1024;quota_ext.audit_queue_size = 16;max_worker_processes = 0;quota_ext.breaker_max = 4"
    "SCARCE|25323|one background worker slot, which a parallel query can take|max_worker_processes = 1;max_logical_replication_workers = 0"
    "WRITERS|25324|worker slots to spare: more databases at once than the audit writer's 8 slots|max_worker_processes = 16"
    "NOPRELOAD|25318|without the preload|shared_preload_libraries = ''"
    "CRASH|25320|of its own, for the SIGKILL test|"
)
STANDBY_DATA=/tmp/quota_ext-itest-standby
# The crash tests' failover: a synchronous standby of the crash server (scripts/crash_ctl.sh).
export QUOTA_EXT_CRASH_STANDBY_PORT=${QUOTA_EXT_CRASH_STANDBY_PORT:-25325}
export QUOTA_EXT_STANDBY_PORT=${QUOTA_EXT_STANDBY_PORT:-25322}
BOUNCER_DIR=/tmp/quota_ext-pgbouncer
export QUOTA_EXT_PGBOUNCER_PORT=${QUOTA_EXT_PGBOUNCER_PORT:-25319}
# The HTTP stack (scripts/http.sh): PostgREST on the test server and PostgREST through
# pgbouncer, both behind nginx, which also serves the browser test's page.
POSTGREST_PORT=${QUOTA_EXT_POSTGREST_PORT:-25330}
POSTGREST_BOUNCER_PORT=${QUOTA_EXT_POSTGREST_BOUNCER_PORT:-25331}
GATEWAY_PORT=${QUOTA_EXT_GATEWAY_PORT:-25332}
PAGE_PORT=${QUOTA_EXT_PAGE_PORT:-25333}

data_of() { echo "/tmp/quota_ext-itest-$(echo "$1" | tr '[:upper:]' '[:lower:]')"; }
port_of() { local v="QUOTA_EXT_${1}_PORT"; echo "${!v}"; }
for s in "${SERVERS[@]}"; do
    IFS='|' read -r name port _ _ <<<"$s"
    v="QUOTA_EXT_${name}_PORT"
    export "$v=${!v:-$port}"
done
stop_pgbouncer() {
    [ -f "$BOUNCER_DIR/pgbouncer.pid" ] && kill "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2>/dev/null || true
}
stop_all() {
    stop_nginx
    stop_postgrest postgrest
    stop_postgrest postgrest-bouncer
    stop_pgbouncer
    stop_server "$STANDBY_DATA" 2>/dev/null || true
    stop_server "$(data_of CRASH)-standby" 2>/dev/null || true
    for s in "${SERVERS[@]}"; do stop_server "$(data_of "${s%%|*}")" 2>/dev/null || true; done
}
trap stop_all EXIT

VERSIONS=(${QUOTA_EXT_PG_VERSIONS:-15 17 16 18})
FULL_VERSIONS=" 15 17 "
# On the other versions: the suites that prove the concurrency and upgrade claims, and the
# crash test below.
QUICK_SUITES="--test quota_concurrency --test upgrade --test hot"
# The exactness suites once more with every window hot from its first consume (quota::hot,
# TestDb::hot_if_asked): the guarantees hold on the hot path too.
HOT_SUITES="--test quota_concurrency --test pooled --test random_ops"

ensure_all
ensure_http_stack

# While working on the external suites: QUOTA_EXT_SKIP_UNIT=1 skips `cargo pgrx test`, and
# QUOTA_EXT_SUITES="--test security --test rate" runs only those suites, QUOTA_EXT_SKIP_HTTP=1
# skips the HTTP suite (CI sets none of them).
run_unit() {
    if [ -n "${QUOTA_EXT_SKIP_UNIT:-}" ]; then
        log "skipping cargo pgrx test (QUOTA_EXT_SKIP_UNIT)"
    elif [ "$(id -u)" -eq 0 ]; then
        log "cargo pgrx test $PG_FEATURE"
        rm -rf "/tmp/quota_ext-pgdata-$PG_MAJOR"
        (cd "$REPO" && cargo pgrx test "$PG_FEATURE" --runas postgres --pgdata "/tmp/quota_ext-pgdata-$PG_MAJOR")
    else
        log "cargo pgrx test $PG_FEATURE"
        (cd "$REPO" && cargo pgrx test "$PG_FEATURE")
    fi
}

# Install the build for the version in use, start its servers and the roles of a Supabase
# project.
start_servers() {
    install_extension
    # The released install scripts, for the upgrade test (cargo pgrx install only copies upgrade
    # scripts, sql/quota_ext--A--B.sql).
    "${SUDO[@]}" install -m 644 "$REPO"/sql/frozen/quota_ext--*.sql "$("$PG_CONFIG" --sharedir)/extension/"
    for s in "${SERVERS[@]}"; do
        IFS='|' read -r name _ what settings <<<"$s"
        IFS=';' read -r -a lines <<<"$settings"
        log "starting a server on 127.0.0.1:$(port_of "$name"): $what"
        start_server "$(data_of "$name")" "$(port_of "$name")" "${lines[@]}"
    done
    TEST_PORT=$(port_of TEST)

    # The roles a Supabase project has, so CREATE EXTENSION grants to them as it would there. The
    # server without the preload has none: there nothing is granted.
    create_supabase_roles "$TEST_PORT"
}

# A hot standby of the test server and pgbouncer in front of it (the full suites use them).
start_companions() {
    # A hot standby of the test server, for the rate path on a replica.
    log "starting a hot standby of the test server on 127.0.0.1:$QUOTA_EXT_STANDBY_PORT"
    pg_psql "$TEST_PORT" -d postgres -c "CREATE DATABASE standby_check"
    pg_psql "$TEST_PORT" -d standby_check -c "CREATE EXTENSION quota_ext" -c "SELECT quota.set_limit('free', 'api', 'day', 5)" >/dev/null
    stop_server "$STANDBY_DATA" 2>/dev/null || true
    "${SUDO[@]}" rm -rf "$STANDBY_DATA"
    as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$TEST_PORT" -U postgres -D "$STANDBY_DATA" -R -X stream --checkpoint=fast
    printf "port = %s\nunix_socket_directories = '%s'\n" "$QUOTA_EXT_STANDBY_PORT" "$STANDBY_DATA" | as_pg tee -a "$STANDBY_DATA/postgresql.conf" >/dev/null
    pg_ctl_as_pg -D "$STANDBY_DATA" -l "$STANDBY_DATA/standby.log" -w start >/dev/null \
        || { tail -20 "$STANDBY_DATA/standby.log" >&2; die "the standby did not start"; }

    # pgbouncer in transaction mode in front of the test server, with a configuration of our own.
    log "starting pgbouncer (transaction mode) on 127.0.0.1:$QUOTA_EXT_PGBOUNCER_PORT"
    "${SUDO[@]}" rm -rf "$BOUNCER_DIR"
    mkdir -p "$BOUNCER_DIR"
    cat > "$BOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$TEST_PORT user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $QUOTA_EXT_PGBOUNCER_PORT
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 4
max_client_conn = 100
logfile = $BOUNCER_DIR/pgbouncer.log
pidfile = $BOUNCER_DIR/pgbouncer.pid
INI
    [ "$(id -u)" -eq 0 ] && chown -R postgres "$BOUNCER_DIR"
    as_pg /usr/sbin/pgbouncer -d "$BOUNCER_DIR/pgbouncer.ini"
    for _ in $(seq 50); do [ -f "$BOUNCER_DIR/pgbouncer.pid" ] && break; sleep 0.1; done
    [ -f "$BOUNCER_DIR/pgbouncer.pid" ] || die "pgbouncer did not start: $(cat "$BOUNCER_DIR/pgbouncer.log" 2>/dev/null)"
}

# The external suites ($1: which; empty for all), the crash test and the isolation specs.
run_suites() {
    log "pgrx-tests: external suites"
    (cd "$REPO/pgrx-tests" && cargo test --no-fail-fast ${QUOTA_EXT_SUITES:-$1} -- --test-threads=2)   # the crash test is #[ignore]d here and run below

    log "pgrx-tests: the exactness suites on hot windows (quota_ext.hot_after = 1)"
    # (Less the rate-limit test among them: its buckets, spent by the first run, live on.)
    (cd "$REPO/pgrx-tests" && QUOTA_EXT_TEST_HOT_AFTER=1 cargo test --no-fail-fast $HOT_SUITES -- --test-threads=2 \
        --skip a_pooled_rate_policy_limits_an_organization_as_one)

    log "crash tests on a server of its own (SIGKILL of a backend, an immediate shutdown, a failover)"
    (cd "$REPO/pgrx-tests" && QUOTA_EXT_PG="$PG_MAJOR" QUOTA_EXT_CRASH_DATA="$(data_of CRASH)" \
        QUOTA_EXT_CRASH_CTL="$REPO/scripts/crash_ctl.sh" cargo test --test crash -- --ignored --test-threads=1)
    grep -q "terminated by signal 9" "$(data_of CRASH)/server.log" || die "the crash test did not crash a backend"

    [ -n "$1" ] && return 0
    log "isolation specs (pg_isolation_regress)"
    ISO_OUT=$(mktemp -d /tmp/quota_ext-isolation.XXXXXX)
    chmod 777 "$ISO_OUT"
    if ! (cd "$REPO/pgrx-tests/isolation" && "$PG_ISOLATION_REGRESS" --bindir="$PG_BIN" --inputdir=. --outputdir="$ISO_OUT" \
            --host=127.0.0.1 --port="$TEST_PORT" --user=postgres --dbname=quota_isolation --schedule=schedule); then
        cat "$ISO_OUT/regression.diffs" >&2
        die "isolation specs failed"
    fi
    rm -rf "$ISO_OUT"
}

# The HTTP suite (http/test, node --test): a database of its own on the test server, PostgREST
# on it directly and through pgbouncer, nginx in front as Supabase's gateway.
run_http() {
    log "HTTP: PostgREST $("$POSTGREST" --version 2>/dev/null | head -1 | awk '{print $2}') behind nginx, supabase-js, Chromium"
    export QUOTA_EXT_HTTP_DB=http_e2e QUOTA_EXT_TEST_PORT=$TEST_PORT
    pg_psql "$TEST_PORT" -d postgres -c "DROP DATABASE IF EXISTS http_e2e WITH (FORCE)" -c "CREATE DATABASE http_e2e"
    pg_psql "$TEST_PORT" -d http_e2e -c "CREATE EXTENSION quota_ext" -f "$REPO/http/setup.sql" >/dev/null
    start_postgrest postgrest "$TEST_PORT" http_e2e "$POSTGREST_PORT"
    start_postgrest postgrest-bouncer "$QUOTA_EXT_PGBOUNCER_PORT" http_e2e "$POSTGREST_BOUNCER_PORT" \
        'db-prepared-statements = false'
    start_nginx "$GATEWAY_PORT" "$POSTGREST_PORT" "$PAGE_PORT" "$POSTGREST_BOUNCER_PORT"
    export QUOTA_EXT_HTTP_URL="http://127.0.0.1:$GATEWAY_PORT"
    export QUOTA_EXT_HTTP_BOUNCER_URL="http://127.0.0.1:$GATEWAY_PORT/bouncer"
    export QUOTA_EXT_HTTP_PAGE_URL="http://127.0.0.1:$PAGE_PORT"
    (cd "$REPO/http" && node --test --test-concurrency=1 test/)
    stop_nginx
    stop_postgrest postgrest
    stop_postgrest postgrest-bouncer
}

declare -A TOOK=()
PARTS=()
for major in "${VERSIONS[@]}"; do
    use_pg "$major"
    started=$SECONDS
    log "PostgreSQL $major ($("$PG_CONFIG" --version))"
    run_unit
    start_servers
    start_companions
    if [[ "$FULL_VERSIONS" == *" $major "* ]]; then
        run_suites ""
    else
        run_suites "$QUICK_SUITES"
    fi
    [ -n "${QUOTA_EXT_SKIP_HTTP:-}" ] || run_http
    stop_all
    TOOK["PostgreSQL $major"]=$((SECONDS - started))
    PARTS+=("PostgreSQL $major")
done

# The Debian package for 15, as a self-hoster installs it: dpkg -i, a fresh cluster of Debian's
# PostgreSQL, the extension created and used, dpkg -r. Last: the package's files replace those
# cargo pgrx installed, and removing it removes them.
test_package() {
    use_pg 15
    "$REPO/scripts/package.sh" 15
    local deb=("$REPO"/target/debian/postgresql-15-quota-ext_*_amd64.deb) data=/tmp/quota_ext-itest-package
    log "dpkg -i $(basename "${deb[0]}")"
    "${SUDO[@]}" dpkg -i "${deb[0]}" >/dev/null
    dpkg -L postgresql-15-quota-ext | grep -qx /usr/lib/postgresql/15/lib/quota_ext.so \
        || die "the package does not install /usr/lib/postgresql/15/lib/quota_ext.so"
    start_server "$data" "$(port_of TEST)"
    local got
    got=$(pg_psql "$(port_of TEST)" -d postgres -At \
        -c "CREATE EXTENSION quota_ext" \
        -c "SELECT quota.set_limit('free', 'api', 'day', 2)" \
        -c "SELECT string_agg(allowed::text, ',') FROM (SELECT (quota.consume('pkg', 'api')).allowed FROM generate_series(1, 3)) c" | tail -1)
    stop_server "$data"
    "${SUDO[@]}" rm -rf "$data"
    [ "$got" = "true,true,false" ] || die "the packaged extension answered '$got' instead of true,true,false"
    "${SUDO[@]}" dpkg -r postgresql-15-quota-ext >/dev/null
    [ ! -e /usr/lib/postgresql/15/lib/quota_ext.so ] || die "dpkg -r left quota_ext.so behind"
    log "the package installs, works and removes cleanly"
}
if [[ " ${VERSIONS[*]} " == *" 15 "* ]] && [ -z "${QUOTA_EXT_SUITES:-}" ]; then
    started=$SECONDS
    test_package
    TOOK[package]=$((SECONDS - started))
    PARTS+=(package)
fi

for part in "${PARTS[@]}"; do
    log "$part: $((TOOK[$part] / 60)) min $((TOOK[$part] % 60)) s"
done
log "all tests passed"
