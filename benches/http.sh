#!/usr/bin/env bash
# Requests per second through PostgREST 12.0.2 on loopback (autocannon, 8 connections, POST):
#   - /rpc/noop with and without db-pre-request = quota.pre_request (what the hook costs);
#   - /rpc/consume of quota against /rpc/naive_consume, a hand-written plpgsql upsert (no
#     audit, one period) exposed the same way.
# Two PostgREST processes on one server (one with the hook), cases alternating round by round;
# per case the median requests/s, and per pair the median over rounds of the ratio.
# Beside them, /rpc/noop with a pre-request hook that does nothing (the floor of any hook), and
# with one that only sets fixed headers of the size quota's sets (PostgREST's share).
# Usage: benches/http.sh [seconds, default 5] [rounds, default 5]. Writes benches/results/http.md.
# QUOTA_EXT_BENCH_HEADERS=draft|legacy|both sets quota_ext.rate_limit_headers for the run.
. "$(dirname "$0")/../scripts/lib.sh"
. "$(dirname "$0")/../scripts/http.sh"
SECS=${1:-5}
ROUNDS=${2:-5}
DATA=/tmp/quota_ext-bench-http
PORT=${QUOTA_EXT_BENCH_PORT:-25317}
PLAIN=25340
HOOKED=25341
EMPTY=25342
STATIC=25343
OUT="$REPO/benches/results/http.md"

ensure_all
ensure_http_stack
install_extension --release
start_server "$DATA" "$PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
trap 'stop_postgrest bench-plain; stop_postgrest bench-hooked; stop_postgrest bench-empty; stop_postgrest bench-static; stop_server "$DATA"' EXIT
create_supabase_roles "$PORT"
pg_psql "$PORT" -d postgres -c "CREATE DATABASE bench_http"
pg_psql "$PORT" -d bench_http -f "$REPO/benches/http/setup.sql" >/dev/null
HEADERS=${QUOTA_EXT_BENCH_HEADERS:-both}
pg_psql "$PORT" -d postgres -c "ALTER DATABASE bench_http SET quota_ext.rate_limit_headers = '$HEADERS'"
start_postgrest bench-plain "$PORT" bench_http "$PLAIN" 'db-pre-request = ""'   # no hook
start_postgrest bench-hooked "$PORT" bench_http "$HOOKED"
start_postgrest bench-empty "$PORT" bench_http "$EMPTY" 'db-pre-request = "public.empty_hook"'
start_postgrest bench-static "$PORT" bench_http "$STATIC" 'db-pre-request = "public.static_headers_hook"'
TOKEN=$(cd "$HTTP_DIR" && node -e "
const { SignJWT } = require('jose');
new SignJWT({ role: 'authenticated', sub: 'bench-user' }).setProtectedHeader({ alg: 'HS256' })
  .setExpirationTime('2h').sign(new TextEncoder().encode(process.env.QUOTA_EXT_JWT_SECRET)).then(t => console.log(t))")

rps() { # rps PORT FUNCTION BODY -> requests per second
    "$HTTP_DIR/node_modules/.bin/autocannon" -c 8 -d "$SECS" -m POST -j \
        -H "Authorization=Bearer $TOKEN" -H "Content-Type=application/json" -H "Content-Profile=$4" \
        -b "$3" "http://127.0.0.1:$1/rpc/$2" 2>/dev/null \
        | node -e 'let s=""; process.stdin.on("data", d => s += d).on("end", () => { const r = JSON.parse(s); console.log(r.non2xx ? 0 : Math.round(r.requests.average)) })'
}
declare -A CASE=(
    [noop]="$PLAIN noop {} public"
    [noop_hooked]="$HOOKED noop {} public"
    [noop_empty_hook]="$EMPTY noop {} public"
    [noop_static_hook]="$STATIC noop {} public"
    [consume]="$PLAIN consume {\"metric\":\"api\"} quota"
    [naive_consume]="$PLAIN naive_consume {\"metric\":\"api\"} public"
)
ORDER=(noop noop_empty_hook noop_static_hook noop_hooked consume naive_consume)
for c in "${ORDER[@]}"; do read -r p f b s <<<"${CASE[$c]}"; rps "$p" "$f" "$b" "$s" >/dev/null; done   # warm up
declare -A RUNS
for round in $(seq "$ROUNDS"); do
    for c in "${ORDER[@]}"; do
        read -r p f b s <<<"${CASE[$c]}"
        r=$(rps "$p" "$f" "$b" "$s")
        RUNS[$c]="${RUNS[$c]:-} $r"
        log "round $round: $c $r requests/s"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratio() { paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) \
    | awk '$2 > 0 { print $1 / $2 }' | median | awk '{ printf "%.2f", $1 }'; }
{
    echo "PostgREST 12.0.2 on loopback, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), autocannon 8 connections," \
         "POST, ${SECS}s x $ROUNDS rounds alternating the cases, $(date -u +%Y-%m-%d), $(nproc) cores, quota_ext.rate_limit_headers = $HEADERS; requests/s: median over rounds."
    echo
    echo "| case | requests/s | ratio (median over rounds) |"
    echo "|---|---:|---:|"
    echo "| \`/rpc/noop\`, no pre-request | $(echo "${RUNS[noop]}" | median) | 1.00 |"
    echo "| \`/rpc/noop\` with a pre-request hook that does nothing (the floor of any hook) | $(echo "${RUNS[noop_empty_hook]}" | median) | $(ratio noop_empty_hook noop) |"
    echo "| \`/rpc/noop\` with a hook that only sets nine fixed headers of the same size | $(echo "${RUNS[noop_static_hook]}" | median) | $(ratio noop_static_hook noop); $(ratio noop_static_hook noop_empty_hook) of the empty hook's |"
    echo "| \`/rpc/noop\` with \`db-pre-request = quota.pre_request\` | $(echo "${RUNS[noop_hooked]}" | median) | $(ratio noop_hooked noop); $(ratio noop_hooked noop_empty_hook) of the empty hook's |"
    echo "| \`/rpc/consume\` (quota, audited, no pre-request) | $(echo "${RUNS[consume]}" | median) | $(ratio consume naive_consume) of the line below |"
    echo "| \`/rpc/naive_consume\` (hand-written plpgsql upsert, no audit) | $(echo "${RUNS[naive_consume]}" | median) | 1.00 |"
} | tee "$OUT"
