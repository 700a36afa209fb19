#!/usr/bin/env bash
# Instructions per call of the rate functions in the two builds benches/ab.sh made (run it
# first: it leaves them in /tmp/quota_ext-ab/{before,after}), counted by callgrind in a
# single-user backend: the same work counts the same total every time, whatever else the
# machine does, so a difference of a few percent that pgbench's noise hides shows here.
# Per call = (statement with 2N calls - statement with N calls) / N.
# Usage: benches/ab_instructions.sh [N, default 20000]. Appends to benches/results/ab.md.
. "$(dirname "$0")/../scripts/lib.sh"
N=${1:-20000}
AB=/tmp/quota_ext-ab
OUT="$REPO/benches/results/ab.md"
command -v valgrind >/dev/null || { "${SUDO[@]}" apt-get install -y -qq valgrind >/dev/null; }
[ -d "$AB/before" ] && [ -d "$AB/after" ] || die "run benches/ab.sh first"
LIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
use_build() {
    local tree="$AB/$1"
    "${SUDO[@]}" install -m 755 "$(find "$tree" -name quota_ext.so | head -1)" "$LIBDIR/"
    "${SUDO[@]}" install -m 644 "$(find "$tree" -name quota_ext.control | head -1)" "$EXTDIR/"
    find "$tree" -name 'quota_ext--*.sql' -exec "${SUDO[@]}" install -m 644 {} "$EXTDIR/" \;
}
DATA=/tmp/quota_ext-ab-callgrind
count() { # count BUILD STATEMENT -> total instructions of the backend
    local file
    file=$(mktemp /tmp/quota_ext-callgrind.XXXXXX)
    chmod 666 "$file"
    echo "$2" | as_pg valgrind --tool=callgrind --callgrind-out-file="$file" \
        "$PG_BIN/postgres" --single -D "$DATA" -c shared_preload_libraries=quota_ext bench >/dev/null 2>&1
    callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
    rm -f "$file"
}
per_call() { # per_call BUILD CALL -> instructions per call of CALL(i)
    use_build "$1"
    "${SUDO[@]}" rm -rf "$DATA"
    if [ "$(id -u)" -eq 0 ]; then install -d -o postgres -g postgres "$DATA"; else mkdir -p "$DATA"; fi
    as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    echo "CREATE DATABASE bench" | as_pg "$PG_BIN/postgres" --single -D "$DATA" postgres >/dev/null
    printf '%s\n' "CREATE EXTENSION quota_ext" \
        "INSERT INTO quota.rate_policies VALUES ('bench', 'free', 1000000000, '1 second', NULL, false)" |
        as_pg "$PG_BIN/postgres" --single -D "$DATA" -c shared_preload_libraries=quota_ext bench >/dev/null
    local one two
    one=$(count "$1" "SELECT count(*) FROM generate_series(1, $N) i WHERE ($2).allowed")
    two=$(count "$1" "SELECT count(*) FROM generate_series(1, $((2 * N))) i WHERE ($2).allowed")
    echo $(((two - one) / N))
}
declare -A IR
for call in "quota.rate_check('k:' || (i % 10000), 1000000000, '1 second')" \
            "quota.rate_limit('bench', 'user-' || (i % 10000))"; do
    for b in before after; do
        IR[$b:$call]=$(per_call "$b" "$call")
        log "$b: $call: ${IR[$b:$call]} instructions per call"
    done
done
use_build after
"${SUDO[@]}" rm -rf "$DATA"
{
    echo
    echo "Instructions per call (callgrind, single-user backend, (2N - N calls) / N with N = $N; deterministic):"
    echo
    echo "| call | before | after | after / before |"
    echo "|---|---:|---:|---:|"
    for call in "quota.rate_check('k:' || (i % 10000), 1000000000, '1 second')" \
                "quota.rate_limit('bench', 'user-' || (i % 10000))"; do
        b=${IR[before:$call]}; a=${IR[after:$call]}
        echo "| \`$call\` | $b | $a | $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", a / b }') |"
    done
} | tee -a "$OUT"
