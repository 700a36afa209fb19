#!/usr/bin/env bash
# The same source on several PostgreSQL versions, side by side, in one run:
#  1. instructions per call (benches/instructions.sh) on every supported version: noise-free;
#  2. throughput: a server of each version at once, the cases alternating between them round by
#     round (pgbench, 8 clients, -M prepared, CHECKPOINT before each), and per case the median
#     over rounds of the ratio new/old within the round.
# Usage: benches/versions.sh [old major, default 15] [new major, default 17] [seconds, default 5]
#        [rounds, default 5]. Writes benches/results/versions.md.
. "$(dirname "$0")/../scripts/lib.sh"
OLD=${1:-15}
NEW=${2:-17}
SECONDS_PER_CASE=${3:-5}
ROUNDS=${4:-5}
CLIENTS=8
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/versions.md"
CASES=(select1 consume_random naive_random consume_hot batch_random plain_update_random rate_random rate_limit_random)
declare -A PORT=([$OLD]=25327 [$NEW]=25328)

ensure_all
for v in "${PG_VERSIONS[@]}"; do
    log "instructions per call on PostgreSQL $v"
    QUOTA_EXT_PG=$v QUOTA_EXT_INSTR_OUT="/tmp/quota_ext-instructions-$v.md" "$REPO/benches/instructions.sh" 1000 >/dev/null
done

data_of() { echo "/tmp/quota_ext-versions-$1"; }
trap 'for v in "$OLD" "$NEW"; do use_pg "$v"; stop_server "$(data_of "$v")" 2>/dev/null || true; done' EXIT
for v in "$OLD" "$NEW"; do
    use_pg "$v"
    install_extension --release
    log "starting a PostgreSQL $v bench server on 127.0.0.1:${PORT[$v]}"
    start_server "$(data_of "$v")" "${PORT[$v]}" "max_wal_size = 8GB" "checkpoint_timeout = 30min" "shared_buffers = 256MB"
    pg_psql "${PORT[$v]}" -d postgres -c "CREATE DATABASE bench"
    pg_psql "${PORT[$v]}" -d bench -f "$SQL/setup.sql" >/dev/null
done

bench() { # bench MAJOR CASE SECONDS -> tps
    use_pg "$1"
    pg_psql "${PORT[$1]}" -d bench -c CHECKPOINT
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$3" -f "$SQL/$2.sql" bench 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }'
}
log "warming up"
for s in "${CASES[@]}"; do for v in "$OLD" "$NEW"; do bench "$v" "$s" 2 >/dev/null; done; done
declare -A RUNS
for round in $(seq "$ROUNDS"); do
    # Which version goes first alternates, so neither always runs on a warmer machine.
    order=("$OLD" "$NEW"); [ $((round % 2)) -eq 0 ] && order=("$NEW" "$OLD")
    for s in "${CASES[@]}"; do
        for v in "${order[@]}"; do
            t=$(bench "$v" "$s" "$SECONDS_PER_CASE")
            RUNS[$v:$s]="${RUNS[$v:$s]:-} $t"
            log "round $round: PostgreSQL $v $s $t tps"
        done
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratio() { paste <(echo "${RUNS[$NEW:$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$OLD:$1]}" | tr ' ' '\n' | grep .) \
    | awk '$2 > 0 { print $1 / $2 }' | median | awk '{ printf "%.2f", $1 }'; }
instr() { awk -F'|' -v name="$2" '$2 == " " name " " { gsub(/ /, "", $3); print $3 }' "/tmp/quota_ext-instructions-$1.md"; }
{
    use_pg "$OLD"; old_version=$("$PG_BIN/postgres" --version | awk '{print $3}')
    use_pg "$NEW"; new_version=$("$PG_BIN/postgres" --version | awk '{print $3}')
    echo "PostgreSQL $old_version and $new_version (throughput; instructions on every supported version), the same source ($(git -C "$REPO" rev-parse --short HEAD)), release builds," \
         "measured $(date -u +%Y-%m-%d) on $(nproc) cores."
    echo
    echo "Instructions per call (callgrind, single-user backend, N = 1000; see benches/instructions.sh):"
    echo
    echo "| call |$(printf ' %s |' "${PG_VERSIONS[@]}") $NEW / $OLD |"
    echo "|---|$(printf -- '---:|%.0s' "${PG_VERSIONS[@]}")---:|"
    awk -F'|' 'NR > 4 && NF > 2 { gsub(/^ | $/, "", $2); print $2 }' "/tmp/quota_ext-instructions-$OLD.md" | while read -r name; do
        row="| $name |"
        for v in "${PG_VERSIONS[@]}"; do row="$row $(instr "$v" "$name") |"; done
        a=$(instr "$OLD" "$name"); b=$(instr "$NEW" "$name")
        echo "$row $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (a > 0 ? b / a : 0) }') |"
    done
    echo
    echo "Throughput (pgbench $CLIENTS clients, -M prepared, ${SECONDS_PER_CASE}s, $ROUNDS rounds alternating the versions, both servers up at once; tps: median over rounds):"
    echo
    echo "| case | $OLD tps | $NEW tps | $NEW / $OLD (median over rounds) |"
    echo "|---|---:|---:|---:|"
    for s in "${CASES[@]}"; do
        echo "| $s | $(echo "${RUNS[$OLD:$s]}" | median | awk '{ printf "%.0f", $1 }') | $(echo "${RUNS[$NEW:$s]}" | median | awk '{ printf "%.0f", $1 }') | $(ratio "$s") |"
    done
} | tee "$OUT"
