#!/usr/bin/env bash
# One prepared run on a GPU machine with no Rust toolchain and no network, on binaries built
# on a CPU machine (scripts/build-gpu-bundle.sh). Usage, from the repository root:
#   scripts/gpu-check.sh [BIN_DIR]     (default target/gpu-bin)
# 1. the devices and libraries; 2. every kernel on the GPU against the emulator and the CPU,
# a whole training step, 200 tiny-preset steps GPU vs CPU, fixture parity (the test
# executables find the GPU and add it to the devices they check); 3. the throughput table
# as JSON lines: lightrnn bench on the GPU (n = m = 512 and 1024, 2 layers, V = 100k and
# 1M, 128 to 1024 streams) beside the PyTorch reference on the same card. Under 8 minutes
# on an H200; each step has its own time limit so one hang cannot eat the loan.
set -uo pipefail
BIN=$(cd "${1:-target/gpu-bin}" && pwd)
T0=$(date +%s)
# The image keeps CUDA and NCCL in Python's site-packages (nvidia/*/lib); cudarc looks for
# libnccl.so, the wheel ships libnccl.so.2: link it in a temp dir.
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
export LIGHTRNN_REQUIRE_NVRTC=1
elapsed() { echo "[$(( $(date +%s) - T0 )) s]"; }
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -5
echo "== library directories"; echo "$LIBS" | tr ':' '\n'
echo "== lightrnn devices"; timeout 60 "$BIN/lightrnn" devices
status=0
echo "== kernel and backend parity on the GPU $(elapsed)"
for t in nvrtc cuda parity gradcheck; do
  [[ -x "$BIN/$t-test" ]] || { echo "missing $BIN/$t-test"; status=1; continue; }
  echo "-- $t"
  # From kernels/: the tests read their fixtures relative to it on another machine.
  (cd kernels && timeout 180 "$BIN/$t-test" --nocapture --test-threads 1) > "$SHIM/$t.log" 2>&1
  rc=$?
  grep -E "^test |test result|steps:|panicked|registers|no NVRTC" "$SHIM/$t.log"
  [[ $rc -eq 0 ]] || { status=1; echo "$t failed (status $rc):"; tail -30 "$SHIM/$t.log"; }
done
echo "== throughput: lightrnn bench --backend cuda $(elapsed)"
for n in 512 1024; do
  for v in 100000 1000000; do
    for b in 128 256 512 1024; do
      timeout 60 "$BIN/lightrnn" bench --backend cuda --precision tf32 --vocab $v --emb $n --hidden $n \
        --layers 2 --batch $b --bptt 35 --steps 10 --warmup 2 || echo "{\"failed\": \"lightrnn n=$n V=$v B=$b\"}"
    done
  done
done
echo "== throughput: PyTorch reference (bench.py --device cuda --tf32) $(elapsed)"
PEERS=$BIN/peers
if [[ -f "$PEERS/bench.py" ]] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  CORP=$(mktemp -d)
  for v in 100000 1000000; do
    timeout 120 python3 "$PEERS/zipf_corpus.py" --out "$CORP/z$v" --vocab $v --tokens 3000000 >/dev/null 2>&1
    for n in 512 1024; do
      for b in 128 512 1024; do
        (cd "$PEERS" && timeout 90 python3 bench.py --corpus "$CORP/z$v" --model lightrnn --vocab $v \
          --emb $n --hidden $n --layers 2 --batch $b --bptt 35 --device cuda --tf32 --steps 10 --warmup 2 2>/dev/null) \
          || echo "{\"failed\": \"pytorch n=$n V=$v B=$b\"}"
      done
    done
  done
else
  echo "no PyTorch with CUDA here, or no $PEERS (scripts/build-gpu-bundle.sh copies ../shared/peers)"
fi
echo "== done $(elapsed), status $status"
exit $status
