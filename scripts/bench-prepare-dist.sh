#!/usr/bin/env bash
# The distributed preparation benchmark (docs/benchmarks.md, "Preparation by the
# workers"): a release build, PTB (scripts/fetch_ptb.py), then
# scripts/bench_prepare_dist.py (standard library only). Run it on a quiet machine.
# Arguments go to bench_prepare_dist.py (--reps, --files, --configs, --dir).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p lightrnn-coordinator
python3 scripts/fetch_ptb.py data/ptb >/dev/null
python3 scripts/bench_prepare_dist.py --bin "${CARGO_TARGET_DIR:-target}/release/lightrnn" "$@"
