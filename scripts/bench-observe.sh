#!/usr/bin/env bash
# What watching a run costs (docs/benchmarks.md, section 19): the phase timers, a trace
# and TensorBoard's event files, on the release build and PTB (scripts/fetch_ptb.py).
# Prints JSON lines; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f data/ptb/ptb.train.txt ]] || python3 scripts/fetch_ptb.py data/ptb
cargo build -q --release -p lightrnn-coordinator --bin lightrnn
BIN="${CARGO_TARGET_DIR:-target}/release/lightrnn"
exec python3 scripts/bench_observe.py --bin "$BIN" --data data/ptb "$@"
