#!/usr/bin/env bash
# Instructions per call, counted by callgrind in a single-user backend (release build, the
# library preloaded): the same work counts the same total every time, whatever else the
# machine does, so a change that costs a few percent shows here when pgbench's noise hides it.
# Per call = ((statement with 2N calls - statement with N) - (the same for the bare loop)) / N,
# each call the argument of count() in `SELECT count((call)) FROM generate_series(1, N) i`
# (a call in FROM gets an argument that depends on i: a function scan whose arguments did not
# change is rewound, not called again).
# Usage: benches/instructions.sh [N, default 2000]. Writes benches/results/instructions.md.
# QUOTA_EXT_BUILD_TREE=<dir of a `cargo pgrx package`> measures that build instead of the
# working tree's; QUOTA_EXT_INSTR_OUT=<file> writes the table there.
. "$(dirname "$0")/../scripts/lib.sh"
N=${1:-2000}
OUT=${QUOTA_EXT_INSTR_OUT:-$REPO/benches/results/instructions.md}
DATA=/tmp/quota_ext-instructions
command -v valgrind >/dev/null || { "${SUDO[@]}" apt-get install -y -qq valgrind >/dev/null; }
ensure_all
if [ -n "${QUOTA_EXT_BUILD_TREE:-}" ]; then
    LIBDIR=$("$PG_CONFIG" --pkglibdir)
    EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
    "${SUDO[@]}" install -m 755 "$(find "$QUOTA_EXT_BUILD_TREE" -name quota_ext.so | head -1)" "$LIBDIR/"
    "${SUDO[@]}" install -m 644 "$(find "$QUOTA_EXT_BUILD_TREE" -name quota_ext.control | head -1)" "$EXTDIR/"
    find "$QUOTA_EXT_BUILD_TREE" -name 'quota_ext--*.sql' -exec "${SUDO[@]}" install -m 644 {} "$EXTDIR/" \;
else
    install_extension --release
fi

single() { # single DB [postgres options...] < statements: a single-user backend, one per line
    local db=$1
    shift
    as_pg "$PG_BIN/postgres" --single -D "$DATA" -c shared_preload_libraries=quota_ext "$@" "$db"
}
"${SUDO[@]}" rm -rf "$DATA"
if [ "$(id -u)" -eq 0 ]; then install -d -o postgres -g postgres "$DATA"; else mkdir -p "$DATA"; fi
as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
echo "CREATE DATABASE bench" | single postgres >/dev/null
# What the calls need: a limit never reached, subjects with usage to refund, batches of their
# own items that never run out (no call updates a row an earlier call of the same statement
# did: its version chain would grow), a policy that never denies, a role for pre_request.
single bench >/dev/null <<SQL
CREATE EXTENSION quota_ext
SELECT quota.set_limit('free', 'api', 'day', 1000000000000)
SELECT quota.consume('r' || i, 'api', 10) FROM generate_series(1, $((3 * N))) i
CREATE TABLE bench_batches (n int PRIMARY KEY, id uuid NOT NULL)
INSERT INTO bench_batches SELECT n, (quota.create_batch('bench', 'w' || n, 1000000000000)).id FROM generate_series(1, $((2 * N))) n
INSERT INTO quota.rate_policies VALUES ('bench', 'free', 1000000000, '1 second', NULL, false), ('read', 'free', 1000000000, '1 second', NULL, false)
CREATE ROLE bench_user NOLOGIN
GRANT USAGE ON SCHEMA quota TO bench_user
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO bench_user
CREATE TABLE naive_usage (subject text, metric text, window_start timestamptz, used bigint, lim bigint, PRIMARY KEY (subject, metric, window_start))
CREATE FUNCTION upsert_audit(s text) RETURNS bigint LANGUAGE sql AS \$\$ WITH u AS (INSERT INTO naive_usage VALUES (s, 'api', date_trunc('day', now()), 1, 1000000000000) ON CONFLICT (subject, metric, window_start) DO UPDATE SET used = naive_usage.used + 1 WHERE naive_usage.used + 1 <= naive_usage.lim RETURNING used), a AS (INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details) SELECT s, 'consume', 'api', 1, true, 'granted', jsonb_build_object('used', used) FROM u) SELECT used FROM u \$\$
CREATE FUNCTION upsert(s text) RETURNS bigint LANGUAGE sql AS \$\$ INSERT INTO naive_usage VALUES (s, 'api', date_trunc('day', now()), 1, 1000000000000) ON CONFLICT (subject, metric, window_start) DO UPDATE SET used = naive_usage.used + 1 WHERE naive_usage.used + 1 <= naive_usage.lim RETURNING used \$\$
SQL

RUN=0
count() { # count PREAMBLE EXPR ROWS -> total instructions of a backend running the statement
    # (an @ in EXPR becomes a number of this run's own, so "new" subjects are new in every run)
    local file stmt
    RUN=$((RUN + 1))
    # (in count's argument, where the planner cannot turn a row's IS NOT NULL into its fields')
    stmt="SELECT count((${2//@/$RUN})) FROM generate_series(1, $3) i"
    file=$(mktemp /tmp/quota_ext-callgrind.XXXXXX)
    chmod 666 "$file"
    { [ -z "$1" ] || printf '%s\n' "$1" | sed 's/;; */\n/g'
      echo "$stmt"; } |
        as_pg valgrind --tool=callgrind --callgrind-out-file="$file" \
            "$PG_BIN/postgres" --single -D "$DATA" -c shared_preload_libraries=quota_ext bench >/dev/null 2>&1
    callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
    rm -f "$file"
}
per_call() { # per_call PREAMBLE EXPR BARE -> instructions per call of EXPR beyond BARE
    local one two b1 b2
    one=$(count "$1" "$2" "$N"); two=$(count "$1" "$2" $((2 * N)))
    b1=$(count "$1" "$3" "$N"); b2=$(count "$1" "$3" $((2 * N)))
    echo $((((two - one) - (b2 - b1)) / N))
}

# name ^ preamble (statements before, separated by ;;) ^ call ^ bare loop (^ separates: SQL has |)
CLAIMS="SELECT set_config('request.jwt.claims', '{\"sub\":\"bench-user\"}', false)"
CASES=(
    "rate_check^^quota.rate_check('k:' || (i % 10000), 1000000000, '1 second')^'k:' || (i % 10000)"
    "rate_limit^^quota.rate_limit('bench', 'user-' || (i % 10000))^'user-' || (i % 10000)"
    "the answer alone: a quota.rate_decision built in SQL^^ROW(true, 'k:' || (i % 10000), 1000::bigint, 999::bigint, 0.001::float8, 0::float8)::quota.rate_decision^'k:' || (i % 10000)"
    "pre_request (an authenticated request)^$CLAIMS;; SET ROLE bench_user^(SELECT i WHERE quota.pre_request()::text = '')^i"
    "consume, a new subject each call^^quota.consume('n@:' || i, 'api', 1)^'n@:' || i"
    "the hand-written upsert + audit row, a new subject each call^^upsert_audit('h@:' || i)^'h@:' || i"
    "the hand-written upsert alone, a new subject each call^^upsert('u@:' || i)^'u@:' || i"
    "refund (trusted)^^quota.refund('r' || i, 'api', 1)^'r' || i"
    "consume_batch_quantity, a batch of its own each call^^(SELECT i FROM quota.consume_batch_quantity((SELECT id FROM bench_batches WHERE n = i), 1))^(SELECT id FROM bench_batches WHERE n = i)"
    "consume_item, an item of its own each call^^(SELECT i FROM quota.consume_item('bench', 'w' || i, 1))^'w' || i"
)
declare -a ROWS
for c in "${CASES[@]}"; do
    IFS='^' read -r name pre expr bare <<<"$c"
    n=$(per_call "$pre" "$expr" "$bare")
    log "$name: $n instructions per call"
    ROWS+=("| $name | $n |")
done
"${SUDO[@]}" rm -rf "$DATA"
{
    echo "Instructions per call, $(date -u +%Y-%m-%d), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')," \
         "release build of $(git -C "$REPO" rev-parse --short HEAD)${QUOTA_EXT_BUILD_TREE:+ (build tree $QUOTA_EXT_BUILD_TREE)}:" \
         "callgrind, single-user backend, ((2N - N calls) - (the same of the bare loop)) / N, N = $N."
    echo
    echo "| call | instructions per call |"
    echo "|---|---:|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT"
