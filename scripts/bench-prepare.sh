#!/usr/bin/env bash
# The corpus-preparation benchmark (docs/benchmarks.md, "Inputs as they come"): a
# release build, PTB (scripts/fetch_ptb.py), a Python with pyarrow and zstandard to
# write the formats (.venv-bench), then scripts/bench_prepare.py. Run it on a quiet
# machine. Arguments go to bench_prepare.py (--reps, --files, --dir).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p lightrnn-coordinator
python3 scripts/fetch_ptb.py data/ptb >/dev/null
if [[ ! -x .venv-bench/bin/python ]]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q "pyarrow==22.0.0" "zstandard==0.25.0"
fi
.venv-bench/bin/python scripts/bench_prepare.py --bin "${CARGO_TARGET_DIR:-target}/release/lightrnn" "$@"
