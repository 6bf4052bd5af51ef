#!/usr/bin/env bash
# The prepared run for a GPU machine lent for minutes (no Rust toolchain, no network), on
# the bundle scripts/build-gpu-bundle.sh builds here. From the repository root:
#
#   scripts/gpu-check.sh [BIN_DIR [DEADLINE_S]]     (default target/gpu-bin, 540 s)
#
# Three tiers under one deadline for the whole run; before each step the time left is
# checked, and a step that no longer fits is skipped with a line saying so. Every step runs
# in its own process group, killed (TERM, then KILL) at its limit or the deadline, so no
# step waits without bound.
#  tier 1, first light (under 3 minutes): driver, devices, library and wheel versions
#          (exits at once, with the reason, without a GPU or a library); every kernel and a
#          whole training step on the GPU against the CPU (the GPU's cases only; a missing
#          GPU fails them); NCCL at world size 1 in process (id, communicator, the
#          fixed-order all-reduce and the reduce-scatter against host values); our words/s
#          and the PyTorch reference's at the goal's configuration (n = m = 512, 2 layers,
#          V = 1M, 512 streams, T = 35), side by side.
#  tier 2, jobs, each capped: the model alone vs through the coordinator (1 epoch), the
#          sparse reallocation round alone vs through the coordinator, a coordinator job
#          whose worker is SIGKILLed after its first checkpoint and replaced, the 200-step
#          parity run.
#  tier 3, the throughput table: ours in one process for every configuration, the PyTorch
#          reference in one Python process.
# Everything printed also goes to $OUT/gpu-check.log as it happens, every JSON result to
# $OUT/results.jsonl (one line each, with its "step"); the logs of failed steps (and of
# tables with a failed configuration) are packed into $OUT/failed-logs.tar.gz on any exit
# (a TERM at the machine's limit included).
# $OUT is the device tool's output folder (a temporary one elsewhere).
#
# TIERS=1,2,3 picks tiers; STEP_CAP=N gives every step at most N s. A dry run on a CPU
# machine: LIGHTRNN_CUDA_EMULATOR=1 SIZE=tiny (the emulated device, tiny models and
# corpora, no PyTorch: its steps say they are skipped; PYTHON names a Python with numpy for
# the corpora); CI runs it so (scripts/gpu-check-dry-run.sh).
set -uo pipefail
# No job control: every step is its own process group through setsid, whose pid is $!.
set +m
BIN=$(cd "${1:-target/gpu-bin}" && pwd) || { echo "no bundle at ${1:-target/gpu-bin}"; exit 2; }
DEADLINE_S=${2:-540}
T0=$(date +%s)
ROOT=$(pwd)
WORK=$(mktemp -d)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
RESULTS=$OUT/results.jsonl
: >"$LOG"
: >"$RESULTS"
TIERS=${TIERS:-1,2,3}
SIZE=${SIZE:-full}
STEP_CAP=${STEP_CAP:-0}
PYTHON=${PYTHON:-python3}
CUR=
DRY=0
[[ "${LIGHTRNN_CUDA_EMULATOR:-}" == 1 ]] && DRY=1
FAILED=()
# Steps that passed with a failed part (a configuration of a table): their logs are packed.
PARTIAL=()
say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((DEADLINE_S - $(elapsed))); }
# A JSON result line, tagged with its step.
record() { python3 -c 'import json,sys; d=json.loads(sys.argv[2]); print(json.dumps({"step": sys.argv[1], **d}))' "$1" "$2" >>"$RESULTS" 2>/dev/null \
  || echo "{\"step\": \"$1\", \"unparsed\": true}" >>"$RESULTS"; }
pack() {
  local logs=()
  for f in "${FAILED[@]}" "${PARTIAL[@]}"; do [[ -f "$WORK/$f.log" ]] && logs+=("$f.log"); done
  if ((${#logs[@]})); then tar -czf "$OUT/failed-logs.tar.gz" -C "$WORK" "${logs[@]}" 2>/dev/null; fi
}
on_exit() { pack; }
trap on_exit EXIT
stop() {
  [[ -n "$CUR" ]] && kill -KILL -- "-$CUR" 2>/dev/null
  say "== stopped by a signal at $(elapsed) s: packing what was measured"
  pack
  exit 143
}
trap stop TERM INT

# run_step NAME NEEDS_S LIMIT_S COMMAND...: the command in its own process group with its
# output in $WORK/NAME.log, killed at min(LIMIT_S, time left); its JSON lines go to the
# results. Skipped (and said so) when less than NEEDS_S (what it takes on a card) is left.
# Returns the command's status.
run_step() {
  local name=$1 needs=$2 limit=$3
  shift 3
  ((STEP_CAP > 0 && limit > STEP_CAP)) && limit=$STEP_CAP
  ((needs > limit)) && needs=$limit
  local rem
  rem=$(left)
  if ((rem < needs)); then
    say "-- $name: skipped, needs $needs s and $rem s are left"
    record "$name" '{"skipped": "deadline"}'
    return 3
  fi
  ((limit > rem)) && limit=$rem
  local t=$(($(date +%s)))
  setsid bash -c "$*" >"$WORK/$name.log" 2>&1 &
  local pid=$! rc killed=0
  CUR=$pid
  while kill -0 "$pid" 2>/dev/null; do
    if (($(date +%s) - t >= limit)); then
      # TERM (a trainer checkpoints and stops), then KILL whatever is left of the group.
      killed=1
      kill -TERM -- "-$pid" 2>/dev/null
      for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null
      break
    fi
    sleep 0.5
  done
  wait "$pid"
  rc=$?
  CUR=
  ((killed && rc == 0)) && rc=124
  local secs=$(($(date +%s) - t))
  grep -E '^\{' "$WORK/$name.log" | while IFS= read -r line; do record "$name" "$line"; done
  local passed
  passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^passed/) s += $i } END { if (s) print s }' "$WORK/$name.log")
  if ((rc == 0)); then
    say "-- $name: ok ($secs s)"
    grep -q '^{"failed"' "$WORK/$name.log" && PARTIAL+=("$name") && say "   (with failed parts: see results.jsonl; the log is packed)"
    record "$name" "{\"ok\": true, \"seconds\": $secs${passed:+, \"tests_passed\": $passed}}"
  else
    FAILED+=("$name")
    local why="status $rc"
    ((killed)) && why="killed at its limit of $limit s"
    say "-- $name: FAILED ($why, $secs s); its last lines:"
    tail -8 "$WORK/$name.log" | cut -c1-200 | tee -a "$LOG"
    record "$name" "{\"failed\": \"$why\", \"seconds\": $secs}"
  fi
  return $rc
}
want() { [[ ",$TIERS," == *",$1,"* ]]; }
# PyTorch with CUDA and the reference in the bundle (asked once, within 60 s).
TORCH=
have_torch() {
  [[ -z "$TORCH" ]] && TORCH=no && [[ -f "$BIN/peers/bench.py" ]] \
    && timeout 60 python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && TORCH=yes
  [[ $TORCH == yes ]]
}

# The image keeps CUDA and NCCL in Python's site-packages (nvidia/*/lib); cudarc looks for
# the unversioned names, the wheels ship versioned ones: link them in a shim folder.
LIBS=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)
SHIM=$WORK/shim
mkdir -p "$SHIM"
for d in ${LIBS//:/ }; do
  for lib in libnccl.so.2 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
    [[ -e "$d/$lib" && ! -e "$d/${lib%.*}" ]] && ln -sf "$d/$lib" "$SHIM/${lib%.*}"
  done
done
export LD_LIBRARY_PATH="$SHIM:$LIBS:${LD_LIBRARY_PATH:-}"
# Kernels compiled ahead of time ship beside the binary (loaded when they fit the card).
[[ -d "$BIN/kernels" ]] && export LIGHTRNN_KERNEL_DIR=$BIN/kernels
export LIGHTRNN_LOG=${LIGHTRNN_LOG:-info}

say "== gpu-check: bundle $BIN, deadline $DEADLINE_S s, tiers $TIERS, size $SIZE, dry run $DRY, out $OUT"
# Sizes: the goal's configuration and the jobs; tiny ones for the dry run.
if [[ $SIZE == tiny ]]; then
  GV=2000 GN=16 GB=8 GT=6 GS=4 GW=2
  TABLE=(--vocab 2000,5000 --emb 16,32 --hidden 16,32 --layers 2 --batch 4,8 --bptt 6 --steps 3 --warmup 1)
  TORCH_TABLE="2000:16:4,2000:16:8"
  JOB_PRESET=tiny
  CORPUS_TOKENS=12000
else
  GV=1000000 GN=512 GB=512 GT=35 GS=20 GW=3
  TABLE=(--vocab 100000,1000000 --emb 512,1024 --hidden 512,1024 --layers 2 --batch 128,256,512,1024 --bptt 35 --steps 10 --warmup 2)
  TORCH_TABLE="100000:512:128,100000:512:512,100000:1024:512,1000000:512:128,1000000:512:512,1000000:1024:512"
  JOB_PRESET=ptb-small
  CORPUS_TOKENS=1000000
fi
GOAL="--vocab $GV --emb $GN --hidden $GN --layers 2 --batch $GB --bptt $GT --steps $GS --warmup $GW"
DEVICES=gpu
((DRY)) && DEVICES=emulated

if want 1; then
  say "== tier 1: first light [$(elapsed) s]"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
      | head -4 | sed 's/^/   gpu: /' | tee -a "$LOG"
  else
    say "   gpu: no nvidia-smi"
  fi
  timeout 30 python3 - >"$WORK/wheels.json" 2>/dev/null <<'PY'
import importlib.metadata as md, json
names = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"] and (d.metadata["Name"].lower().startswith("nvidia") or d.metadata["Name"].lower() in ("torch", "numpy")))
print(json.dumps({"wheels": {n: md.version(n) for n in names}}))
PY
  [[ -s "$WORK/wheels.json" ]] && record wheels "$(cat "$WORK/wheels.json")" && say "   wheels: $(cut -c1-600 "$WORK/wheels.json")"
  timeout 60 "$BIN/lightrnn" devices >"$WORK/devices.json" 2>"$WORK/devices.log"
  say "   devices: $(cut -c1-1200 "$WORK/devices.json")"
  record devices "$(cat "$WORK/devices.json" 2>/dev/null || echo '{}')"
  # No GPU (and no emulator asked for) or a missing library: nothing else can run.
  if ! python3 - "$WORK/devices.json" "$DRY" <<'PY' | tee -a "$LOG"
import json, sys
d = json.load(open(sys.argv[1]))
dry = sys.argv[2] == "1"
missing = [l for l in ("libcuda", "libcublas", "libnccl") if not d.get("cuda_libraries", {}).get(l)]
if not dry and (not d.get("cuda_devices") or missing):
    print(f"   cannot run on a GPU here: {d.get('reason') or 'missing ' + ', '.join(missing)}")
    sys.exit(1)
if not dry and not d.get("cuda_libraries", {}).get("libnvrtc") and not d.get("compiled_kernels"):
    print("   cannot run: neither NVRTC nor compiled kernels")
    sys.exit(1)
PY
  then
    say "== stopped: no GPU or a library missing [$(elapsed) s]"
    exit 2
  fi
  # Every kernel and whole steps against the CPU, on the GPU only (the emulator's cases ran
  # in CI); the 200-step run and NCCL are steps of their own.
  # One test at a time: a test that captures a graph on the GPU must not share it with a
  # test that synchronises the device (a capture would be invalidated).
  run_step kernels 40 150 "cd '$ROOT/kernels' && LIGHTRNN_TEST_DEVICES=$DEVICES LIGHTRNN_REQUIRE_GPU=$((1 - DRY)) '$BIN/cuda-test' --test-threads 1 --skip emulator_ --skip two_hundred --skip nccl_"
  grep -hE "^test result" "$WORK/kernels.log" 2>/dev/null | tee -a "$LOG"
  run_step nccl 20 90 "LIGHTRNN_TEST_DEVICES=$DEVICES LIGHTRNN_REQUIRE_GPU=$((1 - DRY)) '$BIN/cuda-test' --exact ranks::nccl_at_world_size_one_sums_on_the_gpu --nocapture"
  grep -hE "^NCCL" "$WORK/nccl.log" 2>/dev/null | tee -a "$LOG"
  run_step goal-ours 30 120 "'$BIN/lightrnn' bench --backend cuda --precision tf32 $GOAL"
  if ((DRY == 0)) && have_torch; then
    run_step goal-torch 60 180 "python3 '$BIN/torch_bench_matrix.py' --peers '$BIN/peers' --work '$WORK/corpora' --configs $GV:$GN:$GB --layers 2 --bptt $GT --steps $GS --warmup $GW --tokens $CORPUS_TOKENS"
  else
    say "-- goal-torch: skipped, no PyTorch with CUDA here or no peers in the bundle"
    record goal-torch '{"skipped": "no PyTorch with CUDA"}'
  fi
  goal=$(python3 - "$WORK/goal-ours.log" "$WORK/goal-torch.log" 2>/dev/null <<'PY'
import json, sys
def last(path, key):
    try:
        rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    except OSError:
        return None
    rows = [r for r in rows if key in r]
    return rows[-1][key] if rows else None
ours, torch = last(sys.argv[1], "words_per_sec"), last(sys.argv[2], "words_per_s")
print(json.dumps({"ours_words_per_sec": ours, "torch_words_per_sec": torch,
                  "ratio": ours / torch if ours and torch else None,
                  "targets": {"words_per_sec": 1_000_000, "ratio": 1.5}}))
PY
  )
  [[ -n "$goal" ]] && say "   goal: $goal" && record goal "$goal"
  say "== tier 1 done [$(elapsed) s]"
fi

if want 2; then
  say "== tier 2: jobs [$(elapsed) s]"
  RUNS=$WORK/runs
  mkdir -p "$RUNS"
  DATA=$BIN/ptb
  if [[ $SIZE == tiny || ! -f "$DATA/ptb.train.txt" ]]; then
    DATA=$RUNS/zipf
    timeout "$(( $(left) < 60 ? ($(left) > 1 ? $(left) : 1) : 60 ))" "$PYTHON" "$BIN/peers/zipf_corpus.py" --out "$DATA" --vocab 2000 --tokens $CORPUS_TOKENS >/dev/null 2>&1 \
      || say "   no corpus: $DATA"
  fi
  JOB="--preset $JOB_PRESET --backend cuda --data '$DATA' --set epochs=1"
  run_step job-alone 40 180 "'$BIN/lightrnn' train $JOB --out '$RUNS/alone'"
  # At world size 1 the trainer has nothing to all-reduce: this compares the control
  # plane (coordinator, heartbeats, leases), not NCCL (tier 1's nccl step runs that).
  run_step job-coordinator 40 180 "'$BIN/lightrnn' train $JOB --workers 1 --out '$RUNS/nccl'"
  cva=$(python3 - "$WORK/job-alone.log" "$WORK/job-coordinator.log" 2>/dev/null <<'PY'
import json, sys
a, c = ([json.loads(l) for l in open(p) if l.startswith("{")][-1] for p in sys.argv[1:3])
print(json.dumps({"test_ppl": [c["test_ppl"], a["test_ppl"]], "words_per_sec": [c["words_per_sec"], a["words_per_sec"]],
                  "words_per_sec_ratio": c["words_per_sec"] / a["words_per_sec"]}))
PY
  )
  [[ -n "$cva" ]] && say "   coordinator vs alone: $cva" && record coordinator-vs-alone "$cva"
  SPARSE="--preset ${JOB_PRESET/ptb-small/ptb-small-realloc} --backend cuda --data '$DATA' --set epochs=2 --set realloc_every=1 --set realloc_sparse=16 --set realloc_solver=scalable"
  run_step sparse-alone 60 180 "'$BIN/lightrnn' train $SPARSE --out '$RUNS/sparse-alone'"
  run_step sparse-coordinator 60 180 "'$BIN/lightrnn' train $SPARSE --workers 1 --out '$RUNS/sparse-nccl'"
  # A worker SIGKILLed after the first checkpoint and replaced: the group re-forms with a
  # new NCCL id (generation 2). Every wait below is bounded; the step's limit kills the rest.
  cat >"$WORK/kill.sh" <<EOF
set -u
PORT=\$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
'$BIN/lightrnn' coordinator $JOB --set checkpoint_every=50 --world-size 1 --listen 127.0.0.1:\$PORT \
  --heartbeat-ms 500 --collective-timeout-s 20 --out '$RUNS/kill' >'$RUNS/kill.json' 2>'$RUNS/kill.log' &
COORD=\$!
'$BIN/lightrnn' worker --coordinator http://127.0.0.1:\$PORT --device 0 --connect-timeout-s 30 2>'$RUNS/w1.log' &
W1=\$!
for _ in \$(seq 600); do [[ -d '$RUNS/kill/checkpoints' ]] && break; sleep 0.2; done
kill -9 \$W1 2>/dev/null
'$BIN/lightrnn' worker --coordinator http://127.0.0.1:\$PORT --device 0 --connect-timeout-s 30 2>'$RUNS/w2.log' &
W2=\$!
wait \$COORD; rc=\$?
for _ in \$(seq 50); do kill -0 \$W2 2>/dev/null || break; sleep 0.2; done
kill -9 \$W2 2>/dev/null
tail -1 '$RUNS/kill.json'
grep -h "NCCL communicator formed" '$RUNS/w2.log' | tail -1 | cut -c1-300
[[ \$rc -eq 0 ]] && grep -q '"generation":2' '$RUNS/kill.json' || { echo "the killed job did not re-form and finish (status \$rc)"; tail -20 '$RUNS/kill.log'; exit 1; }
EOF
  run_step job-kill 60 240 "bash '$WORK/kill.sh'"
  run_step parity-200 30 120 "LIGHTRNN_TEST_DEVICES=$DEVICES LIGHTRNN_REQUIRE_GPU=$((1 - DRY)) '$BIN/cuda-test' --exact step::two_hundred_tiny_preset_steps_follow_the_cpu_backend --nocapture"
  grep -hE "steps: worst" "$WORK/parity-200.log" 2>/dev/null | tee -a "$LOG"
  say "== tier 2 done [$(elapsed) s]"
fi

if want 3; then
  say "== tier 3: the throughput table [$(elapsed) s]"
  run_step table-ours 120 300 "'$BIN/lightrnn' bench --backend cuda --precision tf32 ${TABLE[*]}"
  grep -hE '^\{"configs"' "$WORK/table-ours.log" 2>/dev/null | tee -a "$LOG"
  if ((DRY == 0)) && have_torch; then
    run_step table-torch 150 300 "python3 '$BIN/torch_bench_matrix.py' --peers '$BIN/peers' --work '$WORK/corpora' --configs '$TORCH_TABLE' --layers 2 --bptt 35 --steps 10 --warmup 2 --tokens $CORPUS_TOKENS"
  else
    say "-- table-torch: skipped, no PyTorch with CUDA here or no peers in the bundle"
    record table-torch '{"skipped": "no PyTorch with CUDA"}'
  fi
  say "== tier 3 done [$(elapsed) s]"
fi

status=0
((${#FAILED[@]})) && status=1
say "== done [$(elapsed) s]: ${#FAILED[@]} failed${FAILED[*]:+ (${FAILED[*]})}; results in $OUT"
exit $status
