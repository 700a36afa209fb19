#!/usr/bin/env bash
# What the latency histograms cost: rate_check (the cheapest timed call) with
# quota_ext.latency on and off, in one run: pgbench (8 clients, -M prepared, interleaved
# rounds, ratios within rounds) and the cost inside the database (one statement making a
# million calls, minus the same without them; five runs each, alternating).
# Usage: benches/latency.sh [seconds per case and round, default 6] [rounds, default 5]
# Writes benches/results/latency.md.
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-5}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench-latency
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/latency.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
pg_psql "$BENCH_PORT" -d bench -c "CREATE EXTENSION quota_ext" >/dev/null

bench() { # bench on|off SECONDS -> tps
    PGOPTIONS="-c quota_ext.latency=$1" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/rate_random.sql" bench 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }'
}
ns() { # ns on|off -> ns per rate_check call inside the database
    PGOPTIONS="-c quota_ext.latency=$1" pg_psql "$BENCH_PORT" -d bench -f "$SQL/ns_per_call.sql" 2>&1 | sed -n 's/.*ns_per_call=\([0-9]*\).*/\1/p'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
bench on 3 >/dev/null; bench off 3 >/dev/null
declare -A RUNS NS
for round in $(seq "$ROUNDS"); do
    for m in on off; do
        t=$(bench "$m" "$SECONDS_PER_CASE"); RUNS[$m]="${RUNS[$m]:-} $t"; log "round $round: latency=$m $t tps"
    done
done
for _ in 1 2 3 4 5; do for m in on off; do NS[$m]="${NS[$m]:-} $(ns "$m")"; done; done
ratios() { paste <(echo "${RUNS[on]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[off]}" | tr ' ' '\n' | grep .) | awk '$2 > 0 { print $1 / $2 }'; }
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared, $ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s, rate_check on 10 000 random keys."
    echo
    echo "| quota_ext.latency | tps (median) | ns per call inside the database (median of 5; runs) |"
    echo "|---|---:|---:|"
    for m in off on; do
        echo "| $m | $(echo "${RUNS[$m]}" | median | awk '{ printf "%.0f", $1 }') | $(echo "${NS[$m]}" | median | awk '{ printf "%.0f", $1 }') ($(echo ${NS[$m]})) |"
    done
    echo
    echo "on / off, tps: **$(ratios | median | awk '{ printf "%.3f", $1 }')** (rounds $(ratios | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.3f-%.3f", lo, hi }'))."
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
