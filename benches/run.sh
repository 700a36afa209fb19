#!/usr/bin/env bash
# Throughput of quota_ext beside its baselines, in one run on one server of our own.
# pgbench, 8 clients, prepared protocol; every case gets the same duration.
# Cases are interleaved over ROUNDS rounds, each case starts right after a CHECKPOINT (so full
# page writes weigh the same on every case), and the median tps of each case is reported.
# Usage: benches/run.sh [seconds per case and round, default 6] [rounds, default 3]
# QUOTA_EXT_BENCH_ONLY=rate runs the rate-limit cases alone (more rounds in the same time) and
# writes benches/results/rate.md instead of benches/results/latest.md.
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_PER_CASE=${1:-6}
ROUNDS=${2:-3}
CLIENTS=8
BENCH_DATA=/tmp/quota_ext-bench
BENCH_PORT=${QUOTA_EXT_BENCH_PORT:-25317}
SQL="$REPO/benches/sql"
OUT="$REPO/benches/results/latest.md"
ONLY=${QUOTA_EXT_BENCH_ONLY:-}
case "$ONLY" in
    "") ;;
    rate) OUT="$REPO/benches/results/rate.md" ;;
    *) die "QUOTA_EXT_BENCH_ONLY: unknown group '$ONLY' (known: rate)" ;;
esac

ensure_all
install_extension --release
log "starting a bench server on 127.0.0.1:$BENCH_PORT"
start_server "$BENCH_DATA" "$BENCH_PORT" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
trap 'stop_server "$BENCH_DATA"' EXIT
pg_psql "$BENCH_PORT" -d postgres -c "CREATE DATABASE bench"
pg_psql "$BENCH_PORT" -d bench -f "$SQL/setup.sql" >/dev/null

# Cases are pgbench scripts in benches/sql; a case NAME:SETTING runs script NAME with the
# server setting SETTING for its sessions.
REDIS_PORT=${QUOTA_EXT_REDIS_PORT:-6391}
REDIS_SHA=""
if command -v redis-server >/dev/null; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile /tmp/quota_ext-bench-redis.pid --logfile /tmp/quota_ext-bench-redis.log
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    REDIS_SHA=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$(cat "$REPO/benches/redis_bucket.lua")")
    trap 'stop_server "$BENCH_DATA"; redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
fi

# redis-benchmark has no duration: a request count that takes about the case's seconds.
redis_bench() { # redis_bench SECONDS -> requests per second
    [ -n "$REDIS_SHA" ] || { echo 0; return; }
    redis-benchmark -p "$REDIS_PORT" -c "$CLIENTS" -n $((40000 * $1)) -r 10000 -q \
        EVALSHA "$REDIS_SHA" 1 bucket:__rand_int__ 1 1000000000 2>/dev/null \
        | tr '\r' '\n' | awk '/requests per second/ { for (i = 1; i <= NF; i++) if ($(i+1) == "requests") { printf "%.0f\n", $i; exit } }'
}

bench() { # bench CASE SECONDS -> tps
    [ "$1" = redis_lua ] && { redis_bench "$2"; return; }
    local script="${1%%:*}" opts=""
    [ "$script" != "$1" ] && opts="-c ${1#*:}"
    pg_psql "$BENCH_PORT" -d bench -c CHECKPOINT
    PGOPTIONS="$opts" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$2" -f "$SQL/$script.sql" bench 2>&1 \
        | awk '/^tps = / { printf "%.0f\n", $3 }'
}

# Warm up: create the 10 000 subjects' rows on both sides, fill caches.
log "warming up"
WARM=(consume_random naive_random consume_hot naive_hot upsert_audit_random batch_random plain_update_random
      rate_random plpgsql_bucket_random select1)
RATE_CASES=(select1b rate_random rate_hot rate_limit_random rate_shape_floor plpgsql_bucket_random plpgsql_bucket_hot redis_lua)
[ "$ONLY" = rate ] && WARM=(rate_random plpgsql_bucket_random select1b)
for s in "${WARM[@]}"; do
    bench "$s" 3 >/dev/null
done

CASES=(select1 consume_random naive_random upsert_audit_random consume_random:quota_ext.audit=off consume_hot naive_hot
       batch_random plain_update_random batch_floor_random batch_hot plain_update_hot plain_update_pkonly_random
       "${RATE_CASES[@]}"
       naive_random:synchronous_commit=off consume_random:synchronous_commit=off
       upsert_audit_random:synchronous_commit=off plain_update_random:synchronous_commit=off
       batch_random:synchronous_commit=off batch_floor_random:synchronous_commit=off)
[ "$ONLY" = rate ] && CASES=("${RATE_CASES[@]}")
declare -A RUNS TPS
for round in $(seq "$ROUNDS"); do
    for s in "${CASES[@]}"; do
        t=$(bench "$s" "$SECONDS_PER_CASE")
        RUNS[$s]="${RUNS[$s]:-} $t"
        log "round $round: $s $t tps"
    done
done
NS_RUNS=""
for _ in 1 2 3 4 5; do
    NS_RUNS="$NS_RUNS $(pg_psql "$BENCH_PORT" -d bench -f "$SQL/ns_per_call.sql" 2>&1 | sed -n 's/.*ns_per_call=\([0-9]*\).*/\1/p')"
done
log "rate_check inside the database, ns per call in five runs:$NS_RUNS"
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
NS_PER_CALL=$(echo "$NS_RUNS" | median | awk '{ printf "%.0f", $1 }')
NS_RANGE=$(echo "$NS_RUNS" | tr ' ' '\n' | grep . | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%d-%d", lo, hi }')
for s in "${CASES[@]}"; do TPS[$s]=$(echo "${RUNS[$s]}" | median | awk '{ printf "%.0f", $1 }'); done
# Ratios are taken within each round (a case and its baseline ran seconds apart), then the
# median over rounds: robust to the slow drifts of a shared machine.
ratios() { # ratios CASE BASELINE -> CASE/BASELINE of each round, one per line
    paste <(echo "${RUNS[$1]}" | tr ' ' '\n' | grep .) <(echo "${RUNS[$2]}" | tr ' ' '\n' | grep .) \
        | awk '$2 > 0 { print $1 / $2 }'
}
ratio_of() { # ratio_of CASE BASELINE -> median over rounds of CASE/BASELINE
    ratios "$1" "$2" | median | awk '{ printf "%.2f", $1 }'
}
range_of() { # range_of CASE BASELINE -> lowest-highest ratio within a round
    ratios "$1" "$2" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'
}
off=":synchronous_commit=off"

header() {
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
         "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench $CLIENTS clients, -M prepared," \
         "$ROUNDS interleaved rounds of ${SECONDS_PER_CASE}s, CHECKPOINT before each, synchronous_commit = on (unless a table says otherwise), quota_ext.audit = all. tps: median over rounds; ratios: median over rounds of the ratio within the round."
    echo
}

rate_table() {
    echo 'Rate limits (shared memory, no table writes; `SELECT 1` measured again in the same round):'
    echo
    echo "| case | tps | vs SELECT 1 | lowest-highest round |"
    echo "|---|---:|---:|---:|"
    echo '| `SELECT 1` | '"${TPS[select1b]}"' | 1.00 | |'
    echo "| quota.rate_check, 10 000 random keys | ${TPS[rate_random]} | **$(ratio_of rate_random select1b)** | $(range_of rate_random select1b) |"
    echo "| quota.rate_check, one hot key | ${TPS[rate_hot]} | **$(ratio_of rate_hot select1b)** | $(range_of rate_hot select1b) |"
    echo "| quota.rate_limit (policy path: policy and plan resolved from the backend cache), 10 000 random keys | ${TPS[rate_limit_random]} | **$(ratio_of rate_limit_random select1b)** | $(range_of rate_limit_random select1b) |"
    echo "| (for comparison) the answer alone: a \`quota.rate_decision\` row built in SQL around the same key, no function called (the floor of the result type) | ${TPS[rate_shape_floor]} | $(ratio_of rate_shape_floor select1b) | $(range_of rate_shape_floor select1b) |"
    echo "| plpgsql GCRA bucket on an UNLOGGED table, 10 000 random keys | ${TPS[plpgsql_bucket_random]} | $(ratio_of plpgsql_bucket_random select1b) | $(range_of plpgsql_bucket_random select1b) |"
    echo "| plpgsql GCRA bucket on an UNLOGGED table, one hot key | ${TPS[plpgsql_bucket_hot]} | $(ratio_of plpgsql_bucket_hot select1b) | $(range_of plpgsql_bucket_hot select1b) |"
    echo "| Redis Lua GCRA bucket, EVALSHA from redis-benchmark, 10 000 random keys | ${TPS[redis_lua]} | $(ratio_of redis_lua select1b) | $(range_of redis_lua select1b) |"
    echo
    echo "rate_check vs the plpgsql bucket: **$(ratio_of rate_random plpgsql_bucket_random)x** (random keys);" \
         "hot key vs random keys: **$(ratio_of rate_hot rate_random)**;" \
         "rate_check vs the answer alone: $(ratio_of rate_random rate_shape_floor), rate_limit vs the answer alone: $(ratio_of rate_limit_random rate_shape_floor);" \
         "cost inside the database: **${NS_PER_CALL} ns per call**, median of five runs ($NS_RANGE) of one statement making a million calls, minus the same statement without them."
}

{
    header
    if [ "$ONLY" != rate ]; then
        echo "| case | tps | vs SELECT 1 | vs naive upsert (same keys) | lowest-highest round |"
        echo "|---|---:|---:|---:|---:|"
        echo "| \`SELECT 1\` | ${TPS[select1]} | 1.00 | | |"
        echo "| quota.consume, 10 000 random subjects | ${TPS[consume_random]} | $(ratio_of consume_random select1) | **$(ratio_of consume_random naive_random)** | $(range_of consume_random naive_random) |"
        echo "| naive upsert, 10 000 random subjects | ${TPS[naive_random]} | $(ratio_of naive_random select1) | 1.00 | |"
        echo "| quota.consume, one hot subject | ${TPS[consume_hot]} | $(ratio_of consume_hot select1) | **$(ratio_of consume_hot naive_hot)** | $(range_of consume_hot naive_hot) |"
        echo "| naive upsert, one hot subject | ${TPS[naive_hot]} | $(ratio_of naive_hot select1) | 1.00 | |"
        echo
        echo "Where the gap comes from (random subjects):"
        echo
        echo "| case | tps | vs naive upsert | lowest-highest round |"
        echo "|---|---:|---:|---:|"
        a=consume_random:quota_ext.audit=off
        echo "| quota.consume with quota_ext.audit = off | ${TPS[$a]} | $(ratio_of "$a" naive_random) | $(range_of "$a" naive_random) |"
        echo "| hand-written SQL doing what consume writes (upsert + audit row, one statement) | ${TPS[upsert_audit_random]} | $(ratio_of upsert_audit_random naive_random) | $(range_of upsert_audit_random naive_random) |"
        echo
        echo "The same with \`synchronous_commit = off\` (commits not waited for: what each case costs in CPU, without the storage's flush times, which swing from second to second on a shared machine):"
        echo
        echo "| case | tps | vs naive upsert | lowest-highest round |"
        echo "|---|---:|---:|---:|"
        echo "| naive upsert | ${TPS[naive_random$off]} | 1.00 | |"
        echo "| quota.consume | ${TPS[consume_random$off]} | **$(ratio_of consume_random$off naive_random$off)** | $(range_of consume_random$off naive_random$off) |"
        echo "| hand-written upsert + audit row | ${TPS[upsert_audit_random$off]} | $(ratio_of upsert_audit_random$off naive_random$off) | $(range_of upsert_audit_random$off naive_random$off) |"
        echo
        echo "Inventory batches (consume_batch_quantity writes an audit row too; the plain UPDATE does not):"
        echo
        echo "| case | tps | vs plain UPDATE (same rows) | lowest-highest round |"
        echo "|---|---:|---:|---:|"
        echo "| quota.consume_batch_quantity, 1 000 batches | ${TPS[batch_random]} | **$(ratio_of batch_random plain_update_random)** | $(range_of batch_random plain_update_random) |"
        echo '| plain `UPDATE quota.batches SET quantity = quantity - $1 WHERE id = $2 AND quantity >= $1`, 1 000 batches | '"${TPS[plain_update_random]}"' | 1.00 | |'
        echo "| quota.consume_batch_quantity, one hot batch | ${TPS[batch_hot]} | **$(ratio_of batch_hot plain_update_hot)** | $(range_of batch_hot plain_update_hot) |"
        echo "| plain UPDATE, one hot batch | ${TPS[plain_update_hot]} | 1.00 | |"
        echo "| (for comparison) hand-written SQL doing what consume_batch_quantity writes (UPDATE + audit row, one statement), 1 000 batches | ${TPS[batch_floor_random]} | $(ratio_of batch_floor_random plain_update_random) | $(range_of batch_floor_random plain_update_random) |"
        echo "| (for comparison) the plain UPDATE on a copy of the rows in a table with only a primary key (HOT updates), 1 000 batches | ${TPS[plain_update_pkonly_random]} | $(ratio_of plain_update_pkonly_random plain_update_random) | |"
        echo
        echo "The same with \`synchronous_commit = off\`:"
        echo
        echo "| case | tps | vs plain UPDATE | lowest-highest round |"
        echo "|---|---:|---:|---:|"
        echo "| plain UPDATE, 1 000 batches | ${TPS[plain_update_random$off]} | 1.00 | |"
        echo "| quota.consume_batch_quantity | ${TPS[batch_random$off]} | **$(ratio_of batch_random$off plain_update_random$off)** | $(range_of batch_random$off plain_update_random$off) |"
        echo "| hand-written UPDATE + audit row | ${TPS[batch_floor_random$off]} | $(ratio_of batch_floor_random$off plain_update_random$off) | $(range_of batch_floor_random$off plain_update_random$off) |"
        echo
    fi
    rate_table
} | tee "$OUT"
log "written to ${OUT#$REPO/}"
