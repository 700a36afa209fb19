#!/usr/bin/env bash
# Build and install quota_ext, start a local PostgreSQL (15, or QUOTA_EXT_PG) with it preloaded
# and created, run a short demo in SQL and over HTTP (PostgREST behind nginx, as on Supabase),
# and leave the servers running. Installs whatever it needs first.
# Works as root and as an ordinary user.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/http.sh"

DEMO_DATA=${QUOTA_EXT_DEMO_DATA:-/tmp/quota_ext-demo}
DEMO_PORT=${QUOTA_EXT_DEMO_PORT:-25315}
DEMO_POSTGREST=25334
DEMO_GATEWAY=25335

ensure_all
ensure_http_stack
install_extension --release
log "starting PostgreSQL $PG_MAJOR on 127.0.0.1:$DEMO_PORT (data in $DEMO_DATA)"
start_server "$DEMO_DATA" "$DEMO_PORT"
create_supabase_roles "$DEMO_PORT"
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

log "demo over HTTP: PostgREST on 127.0.0.1:$DEMO_POSTGREST behind nginx on 127.0.0.1:$DEMO_GATEWAY"
pg_psql "$DEMO_PORT" -d quota_demo -q <<'SQL'
INSERT INTO quota.plans (plan) VALUES ('demo');
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES ('default', 'demo', 2, '1 minute');
SELECT quota.set_plan('dave', 'demo');
SELECT quota.set_limit('demo', 'api_calls', 'day', 100);
SQL
start_postgrest demo-postgrest "$DEMO_PORT" quota_demo "$DEMO_POSTGREST"
start_nginx "$DEMO_GATEWAY" "$DEMO_POSTGREST" $((DEMO_GATEWAY + 10))
TOKEN=$(cd "$HTTP_DIR" && node -e "
const { SignJWT } = require('jose');
new SignJWT({ role: 'authenticated', sub: 'dave' }).setProtectedHeader({ alg: 'HS256' })
  .setExpirationTime('1h').sign(new TextEncoder().encode(process.env.QUOTA_EXT_JWT_SECRET)).then(t => console.log(t))")
BATCH=$(pg_psql "$DEMO_PORT" -d quota_demo -At -c "SELECT id FROM quota.create_batch('dave', 'eggs', 12)")
rpc() { # rpc FUNCTION JSON: POST it as user dave, showing the status line and rate-limit headers
    echo "\$ curl -X POST $QUOTA_GATEWAY/rest/v1/rpc/$1 -d '$2'"
    curl -s -i -X POST "http://127.0.0.1:$DEMO_GATEWAY/rest/v1/rpc/$1" \
        -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" -H "Content-Profile: quota" -d "$2" \
        | grep -iE '^(HTTP/|ratelimit|retry-after|\{|\[)' | sed 's/^/    /'
}
QUOTA_GATEWAY="http://127.0.0.1:$DEMO_GATEWAY"
rpc consume '{"metric": "api_calls"}'
rpc consume_batch_quantity "{\"p_batch_id\": \"$BATCH\", \"p_quantity_to_consume\": 2}"
rpc consume '{"metric": "api_calls"}'   # dave's plan allows 2 requests a minute: 429

cat <<MSG

quota_ext is installed and the demo servers are still running.
  connect:   psql -h 127.0.0.1 -p $DEMO_PORT -U postgres quota_demo
  HTTP:      $QUOTA_GATEWAY/rest/v1/ (PostgREST behind nginx; JWT secret: $QUOTA_EXT_JWT_SECRET)
  supabase-js: node --experimental-default-type=module examples/supabase.mjs
  stop:      kill \$(cat /tmp/quota_ext-demo-postgrest/postgrest.pid) \$(cat $NGINX_DIR/nginx.pid);
             $( [ "$(id -u)" -eq 0 ] && echo "runuser -u postgres -- " )$PG_BIN/pg_ctl -D $DEMO_DATA stop
MSG
