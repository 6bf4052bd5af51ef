#!/usr/bin/env bash
# Reallocation on sparse loss tables (issue 17's benchmark, docs/benchmarks.md section 13).
#
# usage: scripts/bench_sparse.sh V K DIR [--dense]
#
# Writes synthetic sparse tables of V words with K candidates per side to DIR/sparse
# (scripts/synthetic_tables.py, the same values as the dense tables of the same seed),
# solves them with `lightrnn allocate --tables DIR/sparse --solver scalable`, and prints the
# allocate JSON line with the generator's seconds and peak RSS. With --dense it also writes
# the dense tables to DIR/dense, solves them, and prints both solutions' costs evaluated on
# the dense tables (scripts/eval_alloc.py): the price of solving from the sparse tables.
#
# LIGHTRNN (default target/release/lightrnn) and PYTHON (default .venv-test/bin/python,
# with numpy) name the tools. Run on a quiet machine: the figures are times.
set -euo pipefail
[[ $# -ge 3 ]] || { sed -n 4,14p "$0"; exit 2; }
V=$1 K=$2 DIR=$3 DENSE=${4:-}
LIGHTRNN=${LIGHTRNN:-target/release/lightrnn}
PYTHON=${PYTHON:-.venv-test/bin/python}
mkdir -p "$DIR"
# `time -v` where GNU time exists, for peak RSS; the JSON line has its own figures.
timed() { local log=$1; shift; /usr/bin/time -v "$@" 2> "$log"; }
rss() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$1"; }
secs() { awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$1"; }

timed "$DIR/gen-sparse.log" "$PYTHON" scripts/synthetic_tables.py --vocab "$V" --sparse "$K" --out "$DIR/sparse" > /dev/null
echo "{\"step\": \"generate sparse\", \"vocab\": $V, \"k\": $K, \"seconds\": $(secs "$DIR/gen-sparse.log"), \"peak_rss_mib\": $(rss "$DIR/gen-sparse.log")}"
"$LIGHTRNN" allocate --tables "$DIR/sparse" --solver scalable --out "$DIR/alloc-sparse.npy" --force \
  | tee "$DIR/allocate-sparse.json"
if [[ "$DENSE" == "--dense" ]]; then
  timed "$DIR/gen-dense.log" "$PYTHON" scripts/synthetic_tables.py --vocab "$V" --out "$DIR/dense" > /dev/null
  echo "{\"step\": \"generate dense\", \"vocab\": $V, \"seconds\": $(secs "$DIR/gen-dense.log"), \"peak_rss_mib\": $(rss "$DIR/gen-dense.log")}"
  "$LIGHTRNN" allocate --tables "$DIR/dense" --solver scalable --out "$DIR/alloc-dense.npy" --force \
    | tee "$DIR/allocate-dense.json"
  "$PYTHON" scripts/eval_alloc.py "$DIR/dense" "$DIR/alloc-dense.npy" "$DIR/alloc-sparse.npy"
fi
