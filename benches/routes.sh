#!/usr/bin/env bash
# The pre-request hook with 20 rows in quota.rate_routes, beside the hook without routes (the
# method rule) and the same request transaction without the hook, in one run (pgbench, 8
# clients, -M prepared, interleaved rounds, ratios within rounds).
# Usage: benches/routes.sh [seconds per case and round, default 6] [rounds, default 3]
# Writes benches/results/routes.md.
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-3}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench-routes
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql/routes"
OUT="$REPO/benches/results/routes.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE ROLE bench_user NOLOGIN" -c "CREATE DATABASE noroutes" -c "CREATE DATABASE routes"
for db in noroutes routes; do pg_psql "$BENCH_PORT" -d "$db" -f "$SQL/setup.sql" >/dev/null; done
pg_psql "$BENCH_PORT" -d routes -f "$SQL/routes.sql" >/dev/null

bench() { # bench SCRIPT DB SECONDS -> tps
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$3" -f "$SQL/$1.sql" "$2" 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
CASES=("floor noroutes" "hook noroutes" "hook routes")
for c in "${CASES[@]}"; do bench $c 3 >/dev/null; done
declare -A RUNS TPS
for round in $(seq "$ROUNDS"); do
    for c in "${CASES[@]}"; do
        t=$(bench $c "$SECONDS_PER_CASE")
        RUNS[$c]="${RUNS[$c]:-} $t"
        log "round $round: $c $t tps"
    done
done
for c in "${CASES[@]}"; do TPS[$c]=$(echo "${RUNS[$c]}" | median | awk '{ printf "%.0f", $1 }'); done
ratios() { paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) | awk '$2 > 0 { print $1 / $2 }'; }
ratio_of() { ratios "$1" "$2" | median | awk '{ printf "%.2f", $1 }'; }
range_of() { ratios "$1" "$2" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared, $ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s. Each transaction is a PostgREST request's: SET LOCAL ROLE, the four request settings, then the statement."
    echo
    echo "| case | tps | vs the request without the hook | lowest-highest round |"
    echo "|---|---:|---:|---:|"
    echo "| the request, \`SELECT 1\` instead of the hook | ${TPS[floor noroutes]} | 1.00 | |"
    echo "| pre_request, no routes (the method rule: one bucket) | ${TPS[hook noroutes]} | $(ratio_of "hook noroutes" "floor noroutes") | $(range_of "hook noroutes" "floor noroutes") |"
    echo "| pre_request, 20 routes (all matched against the path; two match: two buckets) | ${TPS[hook routes]} | $(ratio_of "hook routes" "floor noroutes") | $(range_of "hook routes" "floor noroutes") |"
    echo
    echo "20 routes vs no routes: **$(ratio_of "hook routes" "hook noroutes")** ($(range_of "hook routes" "hook noroutes"))."
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
