#!/usr/bin/env bash
# Build, on a CPU machine, everything scripts/gpu-check.sh runs on a GPU machine that has no
# Rust toolchain and no network:
#   lightrnn               the release binary with CUDA (stripped)
#   kernels/               every CUDA kernel compiled ahead of time by NVRTC 13.0 for sm_90
#                          (H100, H200) with a manifest: loaded when the card and driver
#                          match, so no process on the GPU machine compiles
#   cuda-test              the kernel and whole-step parity tests (with the NCCL check)
#   torch_bench_matrix.py  the PyTorch reference over many configurations in one process
#   peers/                 a copy of the PyTorch reference (../shared/peers)
#   ptb/                   the Penn Treebank for the jobs (never committed)
# Fails when the bundle is over 56 MiB (the device machine takes 64 MiB with the tree).
# Usage: scripts/build-gpu-bundle.sh [OUT]   (default target/gpu-bin; carry it to the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/gpu-bin}
LIMIT_MIB=${BUNDLE_LIMIT_MIB:-56}
ARCH=${GPU_ARCH:-sm_90}
mkdir -p "$OUT"
cargo build --release --locked -p lightrnn-coordinator --features lightrnn-coordinator/cuda
cp target/release/lightrnn "$OUT/lightrnn"
strip "$OUT/lightrnn" # debug line tables: 127 MB -> 22 MB
# The kernel test executable: the newest build of the `cuda` test target.
cargo test --release --locked -p lightrnn-kernels --features cuda --no-run --message-format=json \
  --test cuda 2>/dev/null \
  | python3 -c '
import json, shutil, sys
out = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], out + "/" + m["target"]["name"] + "-test")
        print("test executable:", m["target"]["name"])
' "$OUT"
strip "$OUT/cuda-test"
# Stale pieces of earlier bundles (the parity and gradcheck tests run on CPUs only).
rm -f "$OUT/parity-test" "$OUT/gradcheck-test" "$OUT/nvrtc-test"
NVRTC=$(scripts/nvrtc-lib.sh)
rm -rf "$OUT/kernels"
LD_LIBRARY_PATH="$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$OUT/lightrnn" kernels --arch "$ARCH" --out "$OUT/kernels" \
  | python3 -c 'import json, sys; m = json.load(sys.stdin); print("kernels: %d sources for %s by NVRTC %s" % (len(m["sources"]), m["arch"], m["nvrtc"]))'
cp scripts/torch_bench_matrix.py "$OUT/"
if [[ -d ../shared/peers ]]; then
  [[ -d "$OUT/peers" ]] && chmod -R u+w "$OUT/peers" && rm -rf "$OUT/peers"
  cp -r ../shared/peers "$OUT/peers"
  chmod -R u+w "$OUT/peers"
else
  echo "no ../shared/peers: the bundle has no PyTorch reference (gpu-check.sh skips its steps)"
fi
# PTB for the job steps (the GPU machine has no network; the text is LDC's: never commit it).
python3 scripts/fetch_ptb.py "$OUT/ptb" || echo "no PTB: gpu-check.sh's jobs use a Zipf corpus"
bytes=$(du -sb "$OUT" | cut -f1)
mib=$(python3 -c "print(f'{$bytes / 1048576:.1f}')")
du -sh "$OUT"/* | sed 's/^/  /'
if ((bytes > LIMIT_MIB * 1048576)); then
  echo "the bundle is $mib MiB, over its limit of $LIMIT_MIB MiB (the device machine takes 64 MiB with the tree)" >&2
  exit 1
fi
echo "bundle: $OUT, $mib MiB (limit $LIMIT_MIB MiB)"
