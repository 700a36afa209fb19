#!/usr/bin/env bash
# Before/after: the extension built from a git ref (default: the last release tag's commit, or
# HEAD) against the working tree, on one server, alternating builds round by round.
# Each round installs one build, restarts the server, creates the bench database anew and runs
# the cases; then the other build. Reports per case the median tps of each build and the median
# over rounds of after/before, and rate_check's cost inside the database (ns per call).
# Usage: benches/ab.sh [base ref, default HEAD] [seconds per case, default 5] [rounds, default 5]
# Writes benches/results/ab.md. Leaves the working tree's build installed.
. "$(dirname "$0")/../scripts/lib.sh"

BASE=${1:-HEAD}
SECONDS_PER_CASE=${2:-5}
ROUNDS=${3:-5}
CLIENTS=8
AB=/tmp/quota_ext-ab
BENCH_DATA=/tmp/quota_ext-ab-data
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/ab.md"
CASES=(select1b rate_random rate_hot rate_limit_random consume_random)

ensure_all
mkdir -p "$AB"
base_commit=$(git -C "$REPO" rev-parse --short "$BASE")
log "building the base ($BASE = $base_commit) and the working tree, release"
git -C "$REPO" worktree remove --force "$AB/base-src" 2>/dev/null || rm -rf "$AB/base-src"
git -C "$REPO" worktree add --detach "$AB/base-src" "$BASE" >/dev/null
rm -rf "$AB/before" "$AB/after"
(cd "$AB/base-src" && CARGO_TARGET_DIR="$REPO/target" cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$AB/before" >/dev/null)
(cd "$REPO" && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$AB/after" >/dev/null)
git -C "$REPO" worktree remove --force "$AB/base-src"

LIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
use_build() { # use_build before|after: install that build and start a fresh server with it
    local tree="$AB/$1"
    stop_server "$BENCH_DATA" 2>/dev/null || true
    "${SUDO[@]}" install -m 755 "$(find "$tree" -name quota_ext.so | head -1)" "$LIBDIR/"
    "${SUDO[@]}" install -m 644 "$(find "$tree" -name quota_ext.control | head -1)" "$EXTDIR/"
    find "$tree" -name 'quota_ext--*.sql' -exec "${SUDO[@]}" install -m 644 {} "$EXTDIR/" \;
    start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
    pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
    pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null
    for s in "${CASES[@]}"; do bench "$s" 2 >/dev/null; done   # warm up
}
trap 'stop_server "$BENCH_DATA"' EXIT

bench() { # bench CASE SECONDS -> tps
    pg_psql "$BENCH_PORT" -d bench -c CHECKPOINT
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$1.sql" bench 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }'
}
ns_per_call() {
    pg_psql "$BENCH_PORT" -d bench -f "$SQL/ns_per_call.sql" 2>&1 | sed -n 's/.*ns_per_call=\([0-9]*\).*/\1/p'
}

declare -A RUNS
for round in $(seq "$ROUNDS"); do
    # Alternate which build goes first, so a drift of the machine favours neither.
    order=(before after)
    [ $((round % 2)) -eq 0 ] && order=(after before)
    for b in "${order[@]}"; do
        use_build "$b"
        for s in "${CASES[@]}"; do
            t=$(bench "$s" "$SECONDS_PER_CASE")
            RUNS[$b:$s]="${RUNS[$b:$s]:-} $t"
            log "round $round, $b: $s $t tps"
        done
        n=$(ns_per_call)
        RUNS[$b:ns]="${RUNS[$b:ns]:-} $n"
        log "round $round, $b: rate_check $n ns per call inside the database"
    done
done
use_build after
stop_server "$BENCH_DATA"

median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratios() { # ratios A B -> A/B of each round
    paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) \
        | awk '$2 > 0 { print $1 / $2 }'
}
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')," \
         "pgbench $CLIENTS clients, -M prepared, $ROUNDS rounds of ${SECONDS_PER_CASE}s per case, builds alternating (the first of a round alternates too)." \
         "before = $BASE ($base_commit), after = the working tree of $(git -C "$REPO" rev-parse --short HEAD)."
    echo
    echo "| case | before tps | after tps | after / before (median of rounds) | lowest-highest round |"
    echo "|---|---:|---:|---:|---:|"
    for s in "${CASES[@]}"; do
        b=$(echo "${RUNS[before:$s]}" | median | awk '{ printf "%.0f", $1 }')
        a=$(echo "${RUNS[after:$s]}" | median | awk '{ printf "%.0f", $1 }')
        r=$(ratios "after:$s" "before:$s" | median | awk '{ printf "%.3f", $1 }')
        rg=$(ratios "after:$s" "before:$s" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.3f-%.3f", lo, hi }')
        echo "| $s | $b | $a | **$r** | $rg |"
    done
    b=$(echo "${RUNS[before:ns]}" | median)
    a=$(echo "${RUNS[after:ns]}" | median)
    echo
    echo "rate_check inside the database (one statement making a million calls, minus the same statement without them): before ${b} ns, after ${a} ns per call (medians; rounds: before${RUNS[before:ns]}, after${RUNS[after:ns]})."
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
