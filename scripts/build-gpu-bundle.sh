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
# Test executables: the newest build of each named test target (JSON messages name them).
cargo test --release --locked -p lightrnn-kernels --features cuda --no-run --message-format=json \
  --test cuda --test nvrtc --test parity --test gradcheck 2>/dev/null \
  | python3 -c '
import json, shutil, sys
out = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], f"{out}/{m[\"target\"][\"name\"]}-test")
        print("test executable:", m["target"]["name"])
' "$OUT"
if [[ -d ../shared/peers ]]; then
  rm -rf "$OUT/peers"
  cp -r ../shared/peers "$OUT/peers"
fi
du -sh "$OUT"
