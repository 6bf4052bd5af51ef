#!/usr/bin/env bash
# One prepared run on a GPU machine with no Rust toolchain and no network, on binaries built
# on a CPU machine (scripts/build-gpu-bundle.sh). Usage, from the repository root:
#   scripts/gpu-check.sh [BIN_DIR]     (default target/gpu-bin)
# 1. the devices and libraries; 2. every kernel on the GPU against the emulator and the CPU,
# a whole training step, 200 tiny-preset steps GPU vs CPU, fixture parity, NCCL ids (the
# test executables find the GPU and add it to the devices they check); 3. jobs: ptb-small
# on the GPU alone, then through the coordinator with NCCL at world size 1 (test ppl and
# words/s side by side), then a coordinator job whose worker is SIGKILLed after its first
# checkpoint and replaced (the group re-forms with a fresh NCCL id); 4. the throughput table
# as JSON lines: lightrnn bench on the GPU (n = m = 512 and 1024, 2 layers, V = 100k and
# 1M, 128 to 1024 streams) beside the PyTorch reference on the same card. Each step has its
# own time limit so one hang cannot eat the loan. STEPS=parity,jobs,bench,torch (the
# default: all) picks steps, e.g. STEPS=parity,jobs for a short loan; PRESET (default
# ptb-small) the jobs' model (a dry run of the jobs on a CPU machine: LIGHTRNN_CUDA_EMULATOR=1
# PRESET=tiny STEPS=jobs).
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
STEPS=${STEPS:-parity,jobs,bench,torch}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
if want parity; then
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
fi
if want jobs; then
echo "== jobs: ptb-small alone and through the coordinator (NCCL, world 1) $(elapsed)"
RUNS=$(mktemp -d)
DATA=$BIN/ptb
if [[ ! -f "$DATA/ptb.train.txt" ]]; then
  echo "no PTB in $DATA (scripts/build-gpu-bundle.sh fetches it): a Zipf corpus instead"
  DATA=$RUNS/zipf
  timeout 120 python3 "$BIN/peers/zipf_corpus.py" --out "$DATA" --vocab 10000 --tokens 1000000 >/dev/null 2>&1
fi
JOB=(--preset "${PRESET:-ptb-small}" --backend cuda --data "$DATA")
timeout 420 "$BIN/lightrnn" train "${JOB[@]}" --out "$RUNS/alone" 2>"$RUNS/alone.log" | tail -1 | tee "$RUNS/alone.json" \
  || { status=1; echo "ptb-small alone failed:"; tail -20 "$RUNS/alone.log"; }
timeout 420 "$BIN/lightrnn" train "${JOB[@]}" --workers 1 --out "$RUNS/nccl" 2>"$RUNS/nccl.log" | tail -1 | tee "$RUNS/nccl.json" \
  || { status=1; echo "ptb-small through the coordinator failed:"; tail -20 "$RUNS/nccl.log"; }
grep -h "NCCL communicator formed" "$RUNS/nccl.log" | tail -1
python3 - "$RUNS/alone.json" "$RUNS/nccl.json" <<'PY' || status=1
import json, sys
a, c = (json.load(open(p)) for p in sys.argv[1:3])
print(json.dumps({"coordinator_vs_alone": {
    "test_ppl": [c["test_ppl"], a["test_ppl"], c["test_ppl"] / a["test_ppl"] - 1],
    "words_per_sec": [c["words_per_sec"], a["words_per_sec"], c["words_per_sec"] / a["words_per_sec"] - 1]}}))
PY
echo "== jobs: a sparse reallocation round, alone and through the coordinator (tables reduce-scattered by NCCL) $(elapsed)"
SPARSE=(--preset ptb-small-realloc --backend cuda --data "$DATA" --set epochs=2 --set realloc_sparse=16 --set realloc_solver=scalable)
for run in sparse-alone sparse-nccl; do
  extra=(); [[ $run == sparse-nccl ]] && extra=(--workers 1)
  timeout 300 "$BIN/lightrnn" train "${SPARSE[@]}" "${extra[@]}" --out "$RUNS/$run" 2>"$RUNS/$run.log" | tail -1 > "$RUNS/$run.json" \
    || { status=1; echo "the sparse round ($run) failed:"; tail -20 "$RUNS/$run.log"; }
done
grep -h "sparse loss tables: a range of words done" "$RUNS/sparse-nccl.log" | tail -1
python3 - "$RUNS/sparse-alone.json" "$RUNS/sparse-nccl.json" <<'PY' || status=1
import json, sys
a, c = (json.load(open(p)) for p in sys.argv[1:3])
print(json.dumps({"sparse_round_coordinator_vs_alone": {
    "test_ppl": [c["test_ppl"], a["test_ppl"], c["test_ppl"] / a["test_ppl"] - 1]}}))
PY
echo "== jobs: a worker killed after its first checkpoint is replaced $(elapsed)"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
timeout 300 "$BIN/lightrnn" coordinator "${JOB[@]}" --set epochs=1 --set checkpoint_every=50 \
  --world-size 1 --listen "127.0.0.1:$PORT" --heartbeat-ms 500 --collective-timeout-s 20 \
  --out "$RUNS/kill" >"$RUNS/kill.json" 2>"$RUNS/kill.log" &
COORD=$!
# Workers without `timeout` in front: $! must be the worker itself, for the SIGKILL (they
# end with the coordinator, which has its own limit).
"$BIN/lightrnn" worker --coordinator "http://127.0.0.1:$PORT" --device 0 2>"$RUNS/w1.log" &
W1=$!
for _ in $(seq 600); do [[ -d "$RUNS/kill/checkpoints" ]] && break; sleep 0.2; done
kill -9 $W1 2>/dev/null; wait $W1 2>/dev/null
"$BIN/lightrnn" worker --coordinator "http://127.0.0.1:$PORT" --device 0 2>"$RUNS/w2.log" &
W2=$!
wait $COORD; rc=$?
wait $W2
tail -1 "$RUNS/kill.json"
if [[ $rc -ne 0 ]] || ! grep -q '"generation":2' "$RUNS/kill.json"; then
  status=1; echo "the killed job did not re-form and finish (status $rc):"; tail -20 "$RUNS/kill.log"; tail -5 "$RUNS/w2.log"
fi
grep -h "NCCL communicator formed" "$RUNS/w2.log" | tail -1
fi
if want bench; then
echo "== throughput: lightrnn bench --backend cuda $(elapsed)"
for n in 512 1024; do
  for v in 100000 1000000; do
    for b in 128 256 512 1024; do
      timeout 60 "$BIN/lightrnn" bench --backend cuda --precision tf32 --vocab $v --emb $n --hidden $n \
        --layers 2 --batch $b --bptt 35 --steps 10 --warmup 2 || echo "{\"failed\": \"lightrnn n=$n V=$v B=$b\"}"
    done
  done
done
fi
if want torch; then
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
fi
echo "== done $(elapsed), status $status"
exit $status
