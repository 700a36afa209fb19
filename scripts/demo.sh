#!/usr/bin/env bash
# Build and install quota_ext, start a local PostgreSQL 15 with it preloaded and created, run a
# short demo, and leave the server running. Installs whatever it needs first.
# Works as root and as an ordinary user.
. "$(dirname "$0")/lib.sh"

DEMO_DATA=${QUOTA_EXT_DEMO_DATA:-/tmp/quota_ext-demo}
DEMO_PORT=${QUOTA_EXT_DEMO_PORT:-25315}

ensure_all
install_extension --release
log "starting PostgreSQL 15 on 127.0.0.1:$DEMO_PORT (data in $DEMO_DATA)"
start_server "$DEMO_DATA" "$DEMO_PORT"
pg_psql "$DEMO_PORT" -d postgres -c "CREATE DATABASE quota_demo"
pg_psql "$DEMO_PORT" -d quota_demo -c "CREATE EXTENSION quota_ext"

log "demo"
pg_psql "$DEMO_PORT" -d quota_demo -e <<'SQL'
-- Plan 'free' gets 3 API calls a minute and 1000 a day. Subjects without a row in
-- quota.subjects are on quota_ext.default_plan ('free').
SELECT quota.set_limit('free', 'api_calls', 'minute', 3);
SELECT quota.set_limit('free', 'api_calls', 'day', 1000);

-- Consume until denied: both periods are checked at once; the answer describes the binding one.
SELECT allowed, used, quota_limit, remaining, period, retry_after_seconds FROM quota.consume('alice', 'api_calls');
SELECT allowed, used, quota_limit, remaining, period, retry_after_seconds FROM quota.consume('alice', 'api_calls');
SELECT allowed, used, quota_limit, remaining, period, retry_after_seconds FROM quota.consume('alice', 'api_calls');
SELECT allowed, used, quota_limit, remaining, period, retry_after_seconds FROM quota.consume('alice', 'api_calls');

-- A client retry with the same idempotency key gets the first answer back and counts nothing.
SELECT allowed, used, replayed FROM quota.consume('bob', 'api_calls', 1, 'request-7f3a');
SELECT allowed, used, replayed FROM quota.consume('bob', 'api_calls', 1, 'request-7f3a');

-- Status, and who is close to a limit.
SELECT metric, period, used, quota_limit, remaining, reset_at FROM quota.status('alice');
SELECT * FROM quota.near_limit(0.5);

-- The audit trail, newest first.
SELECT id, subject, action, amount, success, reason, details FROM quota.audit_page('alice');
SQL

cat <<MSG

quota_ext is installed and the demo server is still running.
  connect:  psql -h 127.0.0.1 -p $DEMO_PORT -U postgres quota_demo
  stop:     $( [ "$(id -u)" -eq 0 ] && echo "runuser -u postgres -- " )$PG_BIN/pg_ctl -D $DEMO_DATA stop
MSG
