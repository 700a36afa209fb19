#!/usr/bin/env bash
# The whole test suite: `cargo pgrx test pg15` (behaviour inside one backend), then the
# pgrx-tests/ suites against a real server of our own (many sessions at once).
# Installs whatever it needs first. Works as root and as an ordinary user.
. "$(dirname "$0")/lib.sh"

TEST_DATA=/tmp/quota_ext-itest
TEST_PORT=${QUOTA_EXT_TEST_PORT:-54316}
NOPRELOAD_DATA=/tmp/quota_ext-itest-nopreload
NOPRELOAD_PORT=${QUOTA_EXT_NOPRELOAD_PORT:-54318}

ensure_all

log "cargo pgrx test pg15"
if [ "$(id -u)" -eq 0 ]; then
    rm -rf /tmp/quota_ext-pgdata
    (cd "$REPO" && cargo pgrx test pg15 --runas postgres --pgdata /tmp/quota_ext-pgdata)
else
    (cd "$REPO" && cargo pgrx test pg15)
fi

install_extension
log "starting a test server on 127.0.0.1:$TEST_PORT ($TEST_DATA)"
start_server "$TEST_DATA" "$TEST_PORT"
trap 'stop_server "$TEST_DATA"; stop_server "$NOPRELOAD_DATA"' EXIT
log "starting a server without the preload on 127.0.0.1:$NOPRELOAD_PORT"
start_server "$NOPRELOAD_DATA" "$NOPRELOAD_PORT" "shared_preload_libraries = ''"

log "pgrx-tests: external suites"
(cd "$REPO/pgrx-tests" && QUOTA_EXT_TEST_PORT=$TEST_PORT QUOTA_EXT_NOPRELOAD_PORT=$NOPRELOAD_PORT \
    cargo test -- --test-threads=2)

log "all tests passed"
