#!/usr/bin/env bash
# Throughput of quota_ext beside its baselines, in one run on one server of our own.
# pgbench, 8 clients, prepared protocol; every case gets the same duration.
# Cases are interleaved over ROUNDS rounds, each case starts right after a CHECKPOINT (so full
# page writes weigh the same on every case), and the median tps of each case is reported.
# Usage: benches/run.sh [seconds per case and round, default 6] [rounds, default 3]
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-3}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-54317}
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/latest.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null

# Cases are pgbench scripts in benches/sql; a case NAME:SETTING runs script NAME with the
# server setting SETTING for its sessions.
bench() { # bench CASE SECONDS -> tps
    local script="${1%%:*}" opts=""
    [ "$script" != "$1" ] && opts="-c ${1#*:}"
    pg_psql "$BENCH_PORT" -d bench -c CHECKPOINT
    PGOPTIONS="$opts" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$script.sql" bench 2>&1 \
        | awk '/^tps = / { printf "%.0f\n", $3 }'
}

# Warm up: create the 10 000 subjects' rows on both sides, fill caches.
log "warming up"
for s in consume_random naive_random consume_hot naive_hot upsert_audit_random batch_random plain_update_random select1; do
    bench "$s" 3 >/dev/null
done

CASES=(select1 consume_random naive_random upsert_audit_random consume_random:quota_ext.audit=off consume_hot naive_hot
       batch_random plain_update_random batch_hot plain_update_hot)
declare -A RUNS TPS
for round in $(seq "$ROUNDS"); do
    for s in "${CASES[@]}"; do
        t=$(bench "$s" "$SECONDS_PER_CASE")
        RUNS[$s]="${RUNS[$s]:-} $t"
        log "round $round: $s $t tps"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
for s in "${CASES[@]}"; do TPS[$s]=$(echo "${RUNS[$s]}" | median | awk '{ printf "%.0f", $1 }'); done
# Ratios are taken within each round (a case and its baseline ran seconds apart), then the
# median over rounds: robust to the slow drifts of a shared machine.
ratio_of() { # ratio_of CASE BASELINE -> median over rounds of CASE/BASELINE
    paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) \
        | awk '$2 > 0 { printf "%s ", $1 / $2 }' | median | awk '{ printf "%.2f", $1 }'
}

{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
         "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared," \
         "$ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s, CHECKPOINT before each, synchronous_commit = on, quota_ext.audit = all. tps: median over rounds; ratios: median over rounds of the ratio within the round."
    echo
    echo "| case | tps | vs SELECT 1 | vs naive upsert (same keys) |"
    echo "|---|---:|---:|---:|"
    echo "| \`SELECT 1\` | ${TPS[select1]} | 1.00 | |"
    echo "| quota.consume, 10 000 random subjects | ${TPS[consume_random]} | $(ratio_of consume_random select1) | **$(ratio_of consume_random naive_random)** |"
    echo "| naive upsert, 10 000 random subjects | ${TPS[naive_random]} | $(ratio_of naive_random select1) | 1.00 |"
    echo "| quota.consume, one hot subject | ${TPS[consume_hot]} | $(ratio_of consume_hot select1) | **$(ratio_of consume_hot naive_hot)** |"
    echo "| naive upsert, one hot subject | ${TPS[naive_hot]} | $(ratio_of naive_hot select1) | 1.00 |"
    echo
    echo "Where the gap comes from (random subjects):"
    echo
    echo "| case | tps | vs naive upsert |"
    echo "|---|---:|---:|"
    a=consume_random:quota_ext.audit=off
    echo "| quota.consume with quota_ext.audit = off | ${TPS[$a]} | $(ratio_of "$a" naive_random) |"
    echo "| hand-written SQL doing what consume writes (upsert + audit row, one statement) | ${TPS[upsert_audit_random]} | $(ratio_of upsert_audit_random naive_random) |"
    echo
    echo "Inventory batches (consume_batch_quantity writes an audit row too; the plain UPDATE does not):"
    echo
    echo "| case | tps | vs plain UPDATE (same rows) |"
    echo "|---|---:|---:|"
    echo "| quota.consume_batch_quantity, 1 000 batches | ${TPS[batch_random]} | **$(ratio_of batch_random plain_update_random)** |"
    echo '| plain `UPDATE ... SET quantity = quantity - $1 WHERE id = $2 AND quantity >= $1`, 1 000 batches | '"${TPS[plain_update_random]}"' | 1.00 |'
    echo "| quota.consume_batch_quantity, one hot batch | ${TPS[batch_hot]} | **$(ratio_of batch_hot plain_update_hot)** |"
    echo "| plain UPDATE, one hot batch | ${TPS[plain_update_hot]} | 1.00 |"
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
