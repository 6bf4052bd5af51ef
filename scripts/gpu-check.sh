#!/usr/bin/env bash
# One prepared run for a GPU machine that has no Rust toolchain and no network: it takes
# binaries built on a CPU machine with `--features cuda` and reports what the GPU image
# offers. Usage (on the GPU machine, from the repository root):
#   scripts/gpu-check.sh BIN_DIR
# BIN_DIR holds `lightrnn` (cargo build --release --features cuda) and test executables
# (cargo test --release --features cuda --no-run), e.g. target/gpu-bin.
set -uo pipefail
BIN=${1:-target/gpu-bin}
# The image keeps CUDA and NCCL in Python's site-packages (nvidia/*/lib); cudarc looks
# for libnccl.so, the wheel ships libnccl.so.2: link it in a temp dir.
LIBS=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)
SHIM=$(mktemp -d)
for d in ${LIBS//:/ }; do
  [[ -e "$d/libnccl.so.2" && ! -e "$d/libnccl.so" ]] && ln -sf "$d/libnccl.so.2" "$SHIM/libnccl.so"
  [[ -e "$d/libnvrtc.so.13" && ! -e "$d/libnvrtc.so" ]] && ln -sf "$d/libnvrtc.so.13" "$SHIM/libnvrtc.so"
  [[ -e "$d/libcublas.so.13" && ! -e "$d/libcublas.so" ]] && ln -sf "$d/libcublas.so.13" "$SHIM/libcublas.so"
done
export LD_LIBRARY_PATH="$SHIM:$LIBS:${LD_LIBRARY_PATH:-}"
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -5
echo "== library directories"; echo "$LIBS" | tr ':' '\n'
echo "== lightrnn devices"; "$BIN/lightrnn" devices
echo "== device tests"
status=0
for t in "$BIN"/*-test; do
  [[ -x "$t" ]] || continue
  echo "-- $t"; "$t" --nocapture || status=1
done
echo "== python"; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1 | tail -1
exit $status
