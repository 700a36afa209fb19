#!/usr/bin/env bash
# Pooled quotas, in one run on one server of our own:
# 1. consume by members of 1 000 organizations of 10 members each, beside consume on 10 000
#    independent subjects (pgbench, 8 clients, -M prepared; cases interleaved over ROUNDS rounds,
#    CHECKPOINT before each; ratios taken within each round, median over rounds);
# 2. near_limit over 1 000 000 and 10 000 000 usage rows of history, beside a plain join on the
#    current windows, the same join through the index (the floor) and 0.7.0's near_limit.
# Usage: benches/pooled.sh [seconds per case and round, default 6] [rounds, default 3]
# Writes benches/results/pooled.md.
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-3}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench-pooled
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql/pooled"
OUT="$REPO/benches/results/pooled.md"

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench" -c "CREATE DATABASE near"
pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null

bench() { # bench CASE SECONDS -> tps; CASE is a script of benches/sql/pooled, :SETTING optional
    local script="${1%%:*}" opts=""
    [ "$script" != "$1" ] && opts="-c ${1#*:}"
    pg_psql "$BENCH_PORT" -d bench -c CHECKPOINT
    PGOPTIONS="$opts" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$script.sql" bench 2>&1 \
        | awk '/^tps = / { printf "%.0f\n", $3 }'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

off=":synchronous_commit=off"
CASES=(independent members members_nocap two_rows "independent$off" "members$off" "members_nocap$off")
log "warming up (every subject's rows and caches)"
for s in independent members members_nocap two_rows; do bench "$s" 4 >/dev/null; done
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

# near_limit: milliseconds, median of RUNS_NEAR runs, at each history size.
pg_psql "$BENCH_PORT" -d near -f "$SQL/near_setup.sql" >/dev/null
declare -A MS
for rows in 1000000 10000000; do
    log "near_limit: history up to $rows usage rows"
    pg_psql "$BENCH_PORT" -d near -v rows="$rows" -f "$SQL/near_history.sql" >/dev/null
    for q in near_limit plain_join index_join near_limit_0_7; do
        n=5
        [ "$q" = near_limit_0_7 ] && [ "$rows" -gt 1000000 ] && n=1
        MS[$q:$rows]=$(pg_psql "$BENCH_PORT" -d near -Atc "SELECT round(bench_ms(q, $n)::numeric, 1) FROM near_queries WHERE name = '$q'")
        log "  $q: ${MS[$q:$rows]} ms"
    done
done
ms_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared, $ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s, CHECKPOINT before each, quota_ext.audit = all. tps: median over rounds; ratios: median over rounds of the ratio within the round."
    echo
    echo "| case | tps | vs independent subjects | lowest-highest round |"
    echo "|---|---:|---:|---:|"
    echo "| consume, 10 000 independent subjects | ${TPS[independent]} | 1.00 | |"
    echo "| consume by members of 1 000 organizations of 10, each member capped (two windows a charge) | ${TPS[members]} | **$(ratio_of members independent)** | $(range_of members independent) |"
    echo "| consume by members of 1 000 organizations of 10, no cap of their own (the organization's window only) | ${TPS[members_nocap]} | **$(ratio_of members_nocap independent)** | $(range_of members_nocap independent) |"
    echo "| (the floor of a two-window charge) two independent consumes in one transaction | ${TPS[two_rows]} | $(ratio_of two_rows independent) | $(range_of two_rows independent) |"
    echo
    echo "With \`synchronous_commit = off\` (CPU only): capped members $(ratio_of "members$off" "independent$off") ($(range_of "members$off" "independent$off")), uncapped members $(ratio_of "members_nocap$off" "independent$off") ($(range_of "members_nocap$off" "independent$off")) of independent subjects (${TPS[independent$off]} tps)."
    echo
    echo "near_limit(0.8) over 10 000 subjects and 1 000 organizations with usage today, and old daily windows (ms, median of 5 runs; 0.7.0's query once at 10M):"
    echo
    echo "| usage rows | near_limit | plain join on the current windows | near_limit / plain join | the join through the index (floor) | near_limit / floor | 0.7.0's near_limit |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for rows in 1000000 10000000; do
        echo "| $rows | ${MS[near_limit:$rows]} | ${MS[plain_join:$rows]} | **$(ms_ratio "${MS[near_limit:$rows]}" "${MS[plain_join:$rows]}")** | ${MS[index_join:$rows]} | $(ms_ratio "${MS[near_limit:$rows]}" "${MS[index_join:$rows]}") | ${MS[near_limit_0_7:$rows]} |"
    done
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
