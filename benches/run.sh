#!/usr/bin/env bash
# Throughput of quota_ext beside its baselines, in one run on one server of our own.
# pgbench, 8 clients, prepared protocol; every case gets the same duration.
# Usage: benches/run.sh [seconds per case, default 8]
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-8}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-54317}
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/latest.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 4GB"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null

bench() { # bench SCRIPT SECONDS -> tps
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$1.sql" bench 2>&1 \
        | awk '/^tps = / { printf "%.0f\n", $3 }'
}

# Warm up: create the 10 000 subjects' rows on both sides, fill caches.
log "warming up"
for s in consume_random naive_random consume_hot naive_hot select1; do bench "$s" 3 >/dev/null; done

declare -A TPS
for s in select1 consume_random naive_random consume_hot naive_hot; do
    TPS[$s]=$(bench "$s" "$SECONDS_PER_CASE")
    log "$s: ${TPS[$s]} tps"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
         "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared," \
         "${SECONDS_PER_CASE}s per case, synchronous_commit = on, quota_ext.audit = all."
    echo
    echo "| case | tps | vs SELECT 1 | vs naive upsert (same keys) |"
    echo "|---|---:|---:|---:|"
    echo "| \`SELECT 1\` | ${TPS[select1]} | 1.00 | |"
    echo "| quota.consume, 10 000 random subjects | ${TPS[consume_random]} | $(ratio "${TPS[consume_random]}" "${TPS[select1]}") | **$(ratio "${TPS[consume_random]}" "${TPS[naive_random]}")** |"
    echo "| naive upsert, 10 000 random subjects | ${TPS[naive_random]} | $(ratio "${TPS[naive_random]}" "${TPS[select1]}") | 1.00 |"
    echo "| quota.consume, one hot subject | ${TPS[consume_hot]} | $(ratio "${TPS[consume_hot]}" "${TPS[select1]}") | **$(ratio "${TPS[consume_hot]}" "${TPS[naive_hot]}")** |"
    echo "| naive upsert, one hot subject | ${TPS[naive_hot]} | $(ratio "${TPS[naive_hot]}" "${TPS[select1]}") | 1.00 |"
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
