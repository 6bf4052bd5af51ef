#!/usr/bin/env bash
# The CPU throughput matrix of docs/benchmarks.md: `lightrnn bench` for each configuration,
# and, when PEERS (the PyTorch reference directory) and PY (its Python) are set, the
# reference's bench.py on the same configuration right after it, in the same session.
# Needs a quiet machine: any other busy process ruins 2-thread timings.
#   scripts/bench-cpu.sh [REPS]            -> JSON lines on stdout
#   PEERS=../shared/peers PY=/tmp/peers-venv/bin/python scripts/bench-cpu.sh 3
# A change's before and after, interleaved (a refactor's "throughput unchanged"): BASE names
# the binary before the change; its lines say "impl":"before", this tree's "impl":"after".
#   BASE=target/base/lightrnn scripts/bench-cpu.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-1}
BIN=target/release/lightrnn
cargo build --release --quiet --bin lightrnn
CONFIGS=(
  "10000 512 512 1 32 35 40"
  "100000 512 512 1 32 35 40"
  "1000000 512 512 1 32 35 40"
  "10000 200 200 1 32 35 60"
)
wait_quiet() {  # up to 120 s for the 1-minute load to fall below 0.5
  for _ in $(seq 60); do
    awk '{exit !($1 < 0.5)}' /proc/loadavg && return 0
    sleep 2
  done
}
IMPL=lightrnn PEAK=--gemm-peak
# Before and after run the same flags (no GEMM-peak probe beside either).
[[ -n "${BASE:-}" ]] && IMPL=after PEAK=
for rep in $(seq "$REPS"); do
  for c in "${CONFIGS[@]}"; do
    read -r V N M L B T S <<<"$c"
    if [[ -n "${BASE:-}" ]]; then
      wait_quiet
      echo "{\"impl\":\"before\",\"rep\":$rep,\"bench\":$($BASE bench --vocab "$V" --emb "$N" --hidden "$M" --layers "$L" \
        --batch "$B" --bptt "$T" --threads 2 --steps "$S" --warmup 3 2>/dev/null)}"
      wait_quiet
    fi
    echo "{\"impl\":\"$IMPL\",\"rep\":$rep,\"bench\":$($BIN bench --vocab "$V" --emb "$N" --hidden "$M" --layers "$L" \
      --batch "$B" --bptt "$T" --threads 2 --steps "$S" --warmup 3 $PEAK 2>/dev/null)}"
    if [[ -n "${PEERS:-}" && -n "${PY:-}" ]]; then
      [[ -d /tmp/peers/zipf$V ]] || (cd "$PEERS" && "$PY" zipf_corpus.py --out /tmp/peers/zipf$V --vocab "$V" --tokens 2000000 >&2)
      wait_quiet
      echo "{\"impl\":\"pytorch\",\"rep\":$rep,\"bench\":$(cd "$PEERS" && "$PY" bench.py --corpus /tmp/peers/zipf$V --vocab "$V" \
        --model lightrnn --emb "$N" --hidden "$M" --layers "$L" --batch "$B" --bptt "$T" --threads 2 --warmup 3 --steps "$S" 2>/dev/null)}"
    fi
  done
done
