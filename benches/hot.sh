#!/usr/bin/env bash
# Hot subjects (quota::hot), in one run on one server of our own: consume on one subject, on 10
# subjects and by the 10 members of one organization, beside consume on 10 000 independent
# subjects, each with the same case on the cold path (quota_ext.hot_after = 0, every caller of a
# window queues on its usage row: 0.9.0's way) and the hand-written upsert + audit row on one
# row and on 10 000; and the floor: a transaction that writes one audit row and nothing else.
# pgbench, 8 clients, -M prepared, synchronous_commit on, quota_ext.audit = all; cases
# interleaved over ROUNDS rounds, CHECKPOINT before each; ratios taken within each round, median
# over rounds.
# Usage: benches/hot.sh [seconds per case and round, default 6] [rounds, default 3]
# Writes benches/results/hot.md.
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-3}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench-hot
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql/hot"
OUT="$REPO/benches/results/hot.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null

bench() { # bench CASE SECONDS -> tps; CASE is a script of benches/sql/hot, :SETTING optional
    local script="${1%%:*}" opts=""
    [ "$script" != "$1" ] && opts="-c ${1#*:}"
    pg_psql "$BENCH_PORT" -d bench -c CHECKPOINT
    PGOPTIONS="$opts" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$script.sql" bench 2>&1 \
        | awk '/^tps = / { printf "%.0f\n", $3 }'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

# The cold path: the same cases on subjects of their own (cold_*.sql) whose sessions never turn a
# window hot (a window once hot stays hot until it ends, whatever the setting says later).
cold=":quota_ext.hot_after=0"
declare -A COLD=([consume_random]="cold_random$cold" [consume_hot]="cold_hot$cold"
                 [consume_hot10]="cold_hot10$cold" [org_members]="cold_org_members$cold")
CASES=(consume_random "${COLD[consume_random]}" consume_hot "${COLD[consume_hot]}" consume_hot10
       "${COLD[consume_hot10]}" org_members "${COLD[org_members]}" upsert_audit_random upsert_audit_hot
       audit_only)
log "warming up (every subject's rows and caches)"
for s in "${CASES[@]}"; do
    bench "$s" 3 >/dev/null
done
declare -A RUNS TPS
for round in $(seq "$ROUNDS"); do
    for s in "${CASES[@]}"; do
        t=$(bench "$s" "$SECONDS_PER_CASE")
        RUNS[$s]="${RUNS[$s]:-} $t"
        log "round $round: $s $t tps"
    done
done
for s in "${CASES[@]}"; do TPS[$s]=$(echo "${RUNS[$s]}" | median | awk '{ printf "%.0f", $1 }'); done
ratios() {
    paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) \
        | awk '$2 > 0 { print $1 / $2 }'
}
ratio_of() { ratios "$1" "$2" | median | awk '{ printf "%.2f", $1 }'; }
range_of() { ratios "$1" "$2" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
loads=$(pg_psql "$BENCH_PORT" -d bench -Atc "SELECT value FROM quota.metrics() WHERE name = 'hot_window_loads'")

row() { # row LABEL CASE
    local c=${COLD[$2]}
    echo "| $1 | ${TPS[$2]} | **$(ratio_of "$2" consume_random)** | $(range_of "$2" consume_random) | ${TPS[$c]} | $(ratio_of "$c" consume_random) | $(ratio_of "$2" "$c") |"
}
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared, $ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s, CHECKPOINT before each, synchronous_commit = on, quota_ext.audit = all. tps: median over rounds; ratios: median over rounds of the ratio within the round. Cold path: the same case on subjects of its own, in sessions with quota_ext.hot_after = 0, whose windows never turn hot (every caller of a window queues on its usage row, as in 0.9.0)."
    echo
    echo "| case | tps | vs 10 000 random subjects | lowest-highest round | cold path tps | cold vs random | hot vs cold |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    c=${COLD[consume_random]}
    echo "| consume, 10 000 random subjects (they stay cold: about one call a second each) | ${TPS[consume_random]} | 1.00 | | ${TPS[$c]} | $(ratio_of "$c" consume_random) | $(ratio_of consume_random "$c") |"
    row "consume, one hot subject" consume_hot
    row "consume, 10 hot subjects" consume_hot10
    row "consume by the 10 members of one organization, each capped (two windows a charge, one shared)" org_members
    echo
    echo "Baselines in the same rounds: the hand-written upsert + audit row (one statement on quota_ext's tables) on 10 000 random subjects ${TPS[upsert_audit_random]} tps, on one row ${TPS[upsert_audit_hot]} tps ($(ratio_of upsert_audit_hot upsert_audit_random) of its own random case); one hot subject's consume is $(ratio_of consume_hot upsert_audit_hot) of the hand-written pair on one row, and random consume $(ratio_of consume_random upsert_audit_random) of it on random rows."
    echo
    echo "The floor: a transaction that writes one audit row and nothing else, ${TPS[audit_only]} tps; one hot subject's consume (a stripe row and an audit row) is $(ratio_of consume_hot audit_only) of it, random consume $(ratio_of consume_random audit_only)."
    echo
    echo "Windows turned hot during the run: $loads."
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
