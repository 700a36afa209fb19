#!/usr/bin/env bash
# The whole test suite: `cargo pgrx test pg15` (behaviour inside one backend), then the
# pgrx-tests/ suites against a real server of our own (many sessions at once).
# Installs whatever it needs first. Works as root and as an ordinary user.
. "$(dirname "$0")/lib.sh"

# Servers listen on ports below the kernel's ephemeral range (32768-60999 by default): a port
# in it can be held by the client end of one of the suites' many connections when a server
# starts (seen once: the crash server could not bind).
TEST_DATA=/tmp/quota_ext-itest
TEST_PORT=${QUOTA_EXT_TEST_PORT:-25316}
NOPRELOAD_DATA=/tmp/quota_ext-itest-nopreload
NOPRELOAD_PORT=${QUOTA_EXT_NOPRELOAD_PORT:-25318}

ensure_all

# While working on the external suites: QUOTA_EXT_SKIP_UNIT=1 skips step 1, and
# QUOTA_EXT_SUITES="--test security --test rate" runs only those suites (CI sets neither).
if [ -n "${QUOTA_EXT_SKIP_UNIT:-}" ]; then
    log "skipping cargo pgrx test (QUOTA_EXT_SKIP_UNIT)"
elif [ "$(id -u)" -eq 0 ]; then
    log "cargo pgrx test pg15"
    rm -rf /tmp/quota_ext-pgdata
    (cd "$REPO" && cargo pgrx test pg15 --runas postgres --pgdata /tmp/quota_ext-pgdata)
else
    log "cargo pgrx test pg15"
    (cd "$REPO" && cargo pgrx test pg15)
fi

install_extension
# The released install scripts, for the upgrade test (cargo pgrx install only copies upgrade
# scripts, sql/quota_ext--A--B.sql).
"${SUDO[@]}" install -m 644 "$REPO"/sql/frozen/quota_ext--*.sql "$("$PG_CONFIG" --sharedir)/extension/"
log "starting a test server on 127.0.0.1:$TEST_PORT ($TEST_DATA)"
start_server "$TEST_DATA" "$TEST_PORT"
trap 'stop_server "$TEST_DATA"; stop_server "$NOPRELOAD_DATA"; stop_server "$TINY_DATA"; stop_server "$SCARCE_DATA"; stop_server "$WRITERS_DATA"; stop_server "$STANDBY_DATA"' EXIT
# The roles a Supabase project has, so CREATE EXTENSION grants to them as it would there. The
# server without the preload has none: there nothing is granted.
pg_psql "$TEST_PORT" -d postgres <<'SQL'
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE service_role NOLOGIN BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
SQL
# A hot standby of the test server, for the rate path on a replica.
STANDBY_DATA=/tmp/quota_ext-itest-standby
STANDBY_PORT=${QUOTA_EXT_STANDBY_PORT:-25322}
log "starting a hot standby of the test server on 127.0.0.1:$STANDBY_PORT"
pg_psql "$TEST_PORT" -d postgres -c "CREATE DATABASE standby_check"
pg_psql "$TEST_PORT" -d standby_check -c "CREATE EXTENSION quota_ext" -c "SELECT quota.set_limit('free', 'api', 'day', 5)" >/dev/null
stop_server "$STANDBY_DATA" 2>/dev/null || true
"${SUDO[@]}" rm -rf "$STANDBY_DATA"
as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$TEST_PORT" -U postgres -D "$STANDBY_DATA" -R -X stream --checkpoint=fast
printf "port = %s\nunix_socket_directories = '%s'\n" "$STANDBY_PORT" "$STANDBY_DATA" | as_pg tee -a "$STANDBY_DATA/postgresql.conf" >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$STANDBY_DATA" -l "$STANDBY_DATA/standby.log" -w start >/dev/null \
    || { tail -20 "$STANDBY_DATA/standby.log" >&2; die "the standby did not start"; }

TINY_DATA=/tmp/quota_ext-itest-tiny
TINY_PORT=${QUOTA_EXT_TINY_PORT:-25321}
log "starting a server with a tiny bucket table on 127.0.0.1:$TINY_PORT"
# ... and a tiny audit queue that no writer can drain (no background worker may start).
start_server "$TINY_DATA" "$TINY_PORT" "quota_ext.rate_max_keys = 1024" "quota_ext.audit_queue_size = 16" \
    "max_worker_processes = 0"
# ... and one with a single background worker slot, which a parallel query can take.
SCARCE_DATA=/tmp/quota_ext-itest-scarce
SCARCE_PORT=${QUOTA_EXT_SCARCE_PORT:-25323}
log "starting a server with one background worker slot on 127.0.0.1:$SCARCE_PORT"
start_server "$SCARCE_DATA" "$SCARCE_PORT" "max_worker_processes = 1" "max_logical_replication_workers = 0"
# ... and one with worker slots to spare, for more databases at once than the audit writer has
# slots (8), where no other suite's calls can rescue a stranded row.
WRITERS_DATA=/tmp/quota_ext-itest-writers
WRITERS_PORT=${QUOTA_EXT_WRITERS_PORT:-25324}
log "starting a server with 16 background worker slots on 127.0.0.1:$WRITERS_PORT"
start_server "$WRITERS_DATA" "$WRITERS_PORT" "max_worker_processes = 16"
log "starting a server without the preload on 127.0.0.1:$NOPRELOAD_PORT"
start_server "$NOPRELOAD_DATA" "$NOPRELOAD_PORT" "shared_preload_libraries = ''"

# pgbouncer in transaction mode in front of the test server, with a configuration of our own.
BOUNCER_DIR=/tmp/quota_ext-pgbouncer
BOUNCER_PORT=${QUOTA_EXT_PGBOUNCER_PORT:-25319}
start_pgbouncer() {
    "${SUDO[@]}" rm -rf "$BOUNCER_DIR"
    mkdir -p "$BOUNCER_DIR"
    cat > "$BOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$TEST_PORT user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
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
    for _ in $(seq 50); do [ -f "$BOUNCER_DIR/pgbouncer.pid" ] && return 0; sleep 0.1; done
    die "pgbouncer did not start: $(cat "$BOUNCER_DIR/pgbouncer.log" 2>/dev/null)"
}
stop_pgbouncer() {
    [ -f "$BOUNCER_DIR/pgbouncer.pid" ] && kill "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2>/dev/null || true
}
log "starting pgbouncer (transaction mode) on 127.0.0.1:$BOUNCER_PORT"
start_pgbouncer
trap 'stop_pgbouncer; stop_server "$TEST_DATA"; stop_server "$NOPRELOAD_DATA"; stop_server "$TINY_DATA"; stop_server "$SCARCE_DATA"; stop_server "$WRITERS_DATA"; stop_server "$STANDBY_DATA"' EXIT

log "pgrx-tests: external suites"
(cd "$REPO/pgrx-tests" && QUOTA_EXT_TEST_PORT=$TEST_PORT QUOTA_EXT_NOPRELOAD_PORT=$NOPRELOAD_PORT \
    QUOTA_EXT_PGBOUNCER_PORT=$BOUNCER_PORT QUOTA_EXT_TINY_PORT=$TINY_PORT QUOTA_EXT_STANDBY_PORT=$STANDBY_PORT \
    QUOTA_EXT_SCARCE_PORT=$SCARCE_PORT QUOTA_EXT_WRITERS_PORT=$WRITERS_PORT QUOTA_EXT_PG_BIN=$PG_BIN \
    cargo test ${QUOTA_EXT_SUITES:-} -- --test-threads=2)   # the crash test is #[ignore]d here and run below

log "crash test on a server of its own (SIGKILL of a backend)"
CRASH_DATA=/tmp/quota_ext-itest-crash
CRASH_PORT=${QUOTA_EXT_CRASH_PORT:-25320}
start_server "$CRASH_DATA" "$CRASH_PORT"
trap 'stop_pgbouncer; stop_server "$TEST_DATA"; stop_server "$NOPRELOAD_DATA"; stop_server "$TINY_DATA"; stop_server "$SCARCE_DATA"; stop_server "$WRITERS_DATA"; stop_server "$STANDBY_DATA"; stop_server "$CRASH_DATA"' EXIT
(cd "$REPO/pgrx-tests" && QUOTA_EXT_CRASH_PORT=$CRASH_PORT cargo test --test crash -- --ignored)
grep -q "terminated by signal 9" "$CRASH_DATA/server.log" || die "the crash test did not crash a backend"

log "isolation specs (pg_isolation_regress)"
ISO_OUT=$(mktemp -d /tmp/quota_ext-isolation.XXXXXX)
chmod 777 "$ISO_OUT"
if ! (cd "$REPO/pgrx-tests/isolation" && "$PG_ISOLATION_REGRESS" --inputdir=. --outputdir="$ISO_OUT" \
        --host=127.0.0.1 --port="$TEST_PORT" --user=postgres --dbname=quota_isolation --schedule=schedule); then
    cat "$ISO_OUT/regression.diffs" >&2
    die "isolation specs failed"
fi
rm -rf "$ISO_OUT"

log "all tests passed"
