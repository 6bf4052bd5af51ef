#!/usr/bin/env bash
# The distributed trainer against the single-process one on the Penn Treebank: ptb-small
# for STEPS steps through the coordinator with 1 and 2 workers, each with the default
# gradient groups (one per worker) and with grad_groups=2 (the same summation order at
# any worker count). Prints per-step loss agreement, the summaries' agreement, parameter
# checksums and the share of training time spent in coordinator RPCs.
# Usage: scripts/check-distributed.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200}
OUT=${OUT:-target/check-distributed}
python3 scripts/fetch_ptb.py data/ptb
cargo build --release --locked -p lightrnn-coordinator
rm -rf "$OUT" && mkdir -p "$OUT"
for g in 0 2; do
  for n in 1 2; do
    target/release/lightrnn train --preset ptb-small --set max_steps="$STEPS" --set log_every=1 \
      --set grad_groups="$g" --data data/ptb --out "$OUT/w$n-g$g" --workers "$n" > "$OUT/w$n-g$g.json"
  done
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
keys = ["train_loss", "valid_loss", "test_loss", "train_ppl", "valid_ppl", "test_ppl"]
def run(name):
    s = json.load(open(f"{out}/{name}/summary.json"))
    line = json.load(open(f"{out}/{name}.json"))
    losses = [json.loads(l)["loss"] for l in open(f"{out}/{name}/metrics.jsonl")
              if json.loads(l)["kind"] == "train"]
    return s, line, losses
def compare(x, y):
    (s1, l1, a), (s2, l2, b) = run(x), run(y)
    rel = [abs(p - q) / max(abs(p), abs(q)) for p, q in zip(a, b)]
    first = next((i + 1 for i, r in enumerate(rel) if r > 1e-4), None)
    return {
        "runs": [x, y],
        "steps": len(a),
        "max_step_loss_rel_diff": max(rel),
        "first_step_above_1e-4": first,
        "summary_max_rel_diff": max(abs(s1[k] - s2[k]) / abs(s1[k]) for k in keys),
        "test_ppl": [s1["test_ppl"], s2["test_ppl"]],
        "same_params_sha256": l1["params_sha256"] == l2["params_sha256"],
    }
s2, l2, _ = run("w2-g0")
report = {
    "two_vs_one_worker_default_groups": compare("w1-g0", "w2-g0"),
    "two_vs_one_worker_grad_groups_2": compare("w1-g2", "w2-g2"),
    "control_one_process_groups_1_vs_2": compare("w1-g0", "w1-g2"),
    "words_per_sec": {n: run(n)[0]["words_per_sec"] for n in ["w1-g0", "w2-g0", "w1-g2", "w2-g2"]},
    "two_workers_control_seconds": s2["control_seconds"],
    "two_workers_train_seconds": s2["train_seconds"],
    "two_workers_control_share_of_train_time": s2["control_seconds"] / s2["train_seconds"],
    "two_workers_coordinator_rpcs": l2["coordinator_rpcs"],
}
print(json.dumps(report, indent=1))
PY
