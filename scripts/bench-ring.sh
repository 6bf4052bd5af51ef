#!/usr/bin/env bash
# What the ring's security costs (issue 37, docs/benchmarks.md section 17): 2-worker
# `ptb-small` throughput through `train --workers 2` (the coordinator in this process, two
# worker processes of one thread each on loopback), interleaved repetitions of
#
#   base       BASE, a build without the ring's handshake and frames (optional:
#              issue 36's tree, 6c32a63);
#   sealed     this build: every frame encrypted and authenticated (AES-256-GCM).
#
# One JSON line per run ({"variant","rep","words_per_sec",...}), then one line of
# medians and each variant's cost against `base`.
#
# usage: scripts/bench-ring.sh DATA DIR [REPS] [STEPS]
#
# DATA: a folder with PTB's ptb.{train,valid,test}.txt (scripts/fetch_ptb.py DATA).
# LIGHTRNN (default target/release/lightrnn) names this build, BASE the baseline binary.
# Run on a quiet machine: 2 workers on 2 cores measure the ring only when nothing else runs.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 12,17p "$0"; exit 2; }
DATA=$1 DIR=$2 REPS=${3:-3} STEPS=${4:-300}
LIGHTRNN=${LIGHTRNN:-target/release/lightrnn}
mkdir -p "$DIR"
variants=(sealed)
[[ -n "${BASE:-}" ]] && variants=(base "${variants[@]}")
for rep in $(seq 1 "$REPS"); do
  for v in "${variants[@]}"; do
    bin=$LIGHTRNN
    [[ $v == base ]] && bin=$BASE
    out="$DIR/$v-$rep"
    rm -rf "$out"
    "$bin" train --preset ptb-small --set max_steps="$STEPS" \
      --data "$DATA" --out "$out" --workers 2 > "$out.json" 2> "$out.log"
    python3 - "$v" "$rep" "$out.json" <<'PY'
import json, sys
v, rep, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = json.loads(open(path).read().strip().splitlines()[-1])
keep = {k: s[k] for k in ("words_per_sec", "train_seconds", "steps", "params_sha256") if k in s}
print(json.dumps({"variant": v, "rep": rep, **keep}))
PY
  done
done | tee "$DIR/runs.jsonl"
python3 - "$DIR/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for r in runs:
    med.setdefault(r["variant"], []).append(r["words_per_sec"])
med = {v: statistics.median(x) for v, x in med.items()}
line = {"median_words_per_sec": med}
if "base" in med:
    line["cost_vs_base"] = {v: round(1 - w / med["base"], 4) for v, w in med.items() if v != "base"}
print(json.dumps(line))
PY
