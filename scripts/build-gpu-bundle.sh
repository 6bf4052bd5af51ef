#!/usr/bin/env bash
# Build, on a CPU machine, everything scripts/gpu-check.sh runs on a GPU machine that has no
# Rust toolchain and no network: the `lightrnn` binary with CUDA, the kernel test
# executables with CUDA, and a copy of the PyTorch reference (../shared/peers).
# Usage: scripts/build-gpu-bundle.sh [OUT]   (default target/gpu-bin; carry it to the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/gpu-bin}
mkdir -p "$OUT"
cargo build --release --locked -p lightrnn-coordinator --features lightrnn-coordinator/cuda
cp target/release/lightrnn "$OUT/lightrnn"
strip "$OUT/lightrnn"  # debug line tables: 127 MB -> 22 MB (the device carry is 64 MiB)
# Test executables: the newest build of each named test target (JSON messages name them).
cargo test --release --locked -p lightrnn-kernels --features cuda --no-run --message-format=json \
  --test cuda --test nvrtc --test parity --test gradcheck 2>/dev/null \
  | python3 -c '
import json, shutil, sys
out = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        name = m["target"]["name"]
        shutil.copy(m["executable"], out + "/" + name + "-test")
        print("test executable:", name)
' "$OUT"
for t in "$OUT"/*-test; do strip "$t"; done
if [[ -d ../shared/peers ]]; then
  [[ -d "$OUT/peers" ]] && chmod -R u+w "$OUT/peers" && rm -rf "$OUT/peers"
  cp -r ../shared/peers "$OUT/peers"
  chmod -R u+w "$OUT/peers"
fi
# PTB for the job steps (the GPU machine has no network; the text is LDC's: never commit it).
python3 scripts/fetch_ptb.py "$OUT/ptb" || echo "no PTB: gpu-check.sh's jobs use a Zipf corpus"
du -sh "$OUT"
