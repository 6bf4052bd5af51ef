#!/usr/bin/env bash
# CI's dry run of scripts/gpu-check.sh on the emulated device (LIGHTRNN_CUDA_EMULATOR=1,
# SIZE=tiny), over the bundle scripts/build-gpu-bundle.sh built, so that the first GPU loan
# finds a script that works:
#  1. the whole run: every tier passes; $OUT holds gpu-check.log and results.jsonl with a
#     line for every step (PyTorch's say they were skipped); tier 1 takes under 60 s; what
#     it prints stays under the 12,000 characters the device tool returns.
#  2. a deadline too short for every step: the steps that no longer fit are skipped with a
#     line saying so, the log and the JSON come back, and the run ends by its deadline.
#  3. every step capped at 2 s (STEP_CAP): a step that needs longer is killed at its limit,
#     however it waits and whatever it started, and its log comes back packed in
#     failed-logs.tar.gz.
# Usage: scripts/gpu-check-dry-run.sh [BUNDLE]   (default target/gpu-bin)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-target/gpu-bin}
[[ -x "$BUNDLE/lightrnn" && -x "$BUNDLE/cuda-test" ]] || { echo "no bundle in $BUNDLE (scripts/build-gpu-bundle.sh)" >&2; exit 1; }
export LIGHTRNN_CUDA_EMULATOR=1 SIZE=tiny PYTHON=${PYTHON:-$PWD/.venv-test/bin/python}
"$PYTHON" -c "import numpy" || { echo "$PYTHON has no numpy (scripts/test.sh installs it)" >&2; exit 1; }
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
fail() { echo "gpu-check dry run: $*" >&2; exit 1; }

echo "== 1. the whole run"
t=$(date +%s)
OUT=$D/full scripts/gpu-check.sh "$BUNDLE" 600 >"$D/full.txt" 2>&1 || { tail -40 "$D/full.txt"; fail "the whole run failed"; }
echo "   $(($(date +%s) - t)) s, $(wc -c <"$D/full.txt") characters printed"
python3 - "$D/full" "$D/full.txt" <<'PY' || { tail -40 "$D/full.txt"; fail "the whole run's output"; }
import json, re, sys
out, printed = sys.argv[1], open(sys.argv[2]).read()
log = open(f"{out}/gpu-check.log").read()
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
steps = {r["step"] for r in rows}
want = {"devices", "kernels", "nccl", "goal-ours", "goal-torch", "goal", "job-alone", "job-coordinator",
        "coordinator-vs-alone", "sparse-alone", "sparse-coordinator", "job-kill", "parity-200",
        "table-ours", "table-torch"}
assert want <= steps, f"steps without a result line: {sorted(want - steps)}"
failed = [r for r in rows if r.get("failed")]
assert not failed, failed
for tier in (1, 2, 3):
    assert f"== tier {tier} done" in log, f"tier {tier} did not finish"
tier1 = int(re.search(r"== tier 1 done \[(\d+) s\]", log).group(1))
assert tier1 < 60, f"tier 1 took {tier1} s at tiny sizes on the emulator"
assert any(r["step"] == "goal-torch" and r.get("skipped") for r in rows), "PyTorch's goal step says it was skipped"
passed = {r["step"]: r.get("tests_passed", 0) for r in rows if r.get("ok")}
assert passed["kernels"] >= 14 and passed["parity-200"] == 1 and passed["nccl"] == 1, passed
ours = [r for r in rows if r["step"] == "goal-ours" and "words_per_sec" in r]
assert ours and ours[0]["device_per_step"]["syncs"] == 1.0, ours
table = [r for r in rows if r["step"] == "table-ours" and "words_per_sec" in r]
assert len(table) == 8, f"{len(table)} configurations in the table"
assert len(printed) < 12000, f"{len(printed)} characters printed"
assert printed.strip() == log.strip(), "the log holds what was printed"
print(f"   ok: {len(rows)} result lines, tier 1 in {tier1} s, per step {ours[0]['device_per_step']}")
PY

echo "== 2. a short deadline"
t=$(date +%s)
OUT=$D/short scripts/gpu-check.sh "$BUNDLE" 60 >"$D/short.txt" 2>&1 || true
took=$(($(date +%s) - t))
# The deadline, and the grace a step cut at it gets to stop (TERM, then KILL after 5 s).
((took <= 70)) || fail "a 60 s deadline ran $took s"
grep -q "skipped, needs" "$D/short.txt" || { tail -20 "$D/short.txt"; fail "no step was skipped"; }
grep -q -- "-- kernels: ok" "$D/short.txt" || { tail -20 "$D/short.txt"; fail "tier 1 did not run first"; }
grep -q '"skipped": "deadline"' "$D/short/results.jsonl" || fail "no skipped line in the results"
[[ -s "$D/short/gpu-check.log" ]] || fail "no log"
echo "   ok: $took s, $(grep -c 'skipped, needs' "$D/short.txt") steps skipped"

echo "== 3. every step capped at 2 s (the jobs: each needs more)"
t=$(date +%s)
if OUT=$D/capped STEP_CAP=2 TIERS=2 scripts/gpu-check.sh "$BUNDLE" 600 >"$D/capped.txt" 2>&1; then
  fail "steps that need more than 2 s passed"
fi
took=$(($(date +%s) - t))
((took < 120)) || fail "the capped run took $took s"
grep -q "killed at its limit of 2 s" "$D/capped.txt" || { tail -20 "$D/capped.txt"; fail "no step was killed at its limit"; }
tar -tzf "$D/capped/failed-logs.tar.gz" | grep -q job-kill.log || fail "the killed steps' logs are not packed"
# Nothing a killed step started outlives it (the coordinator and workers of the kill job).
sleep 1
if pgrep -f "$(cd "$BUNDLE" && pwd)/lightrnn" >/dev/null; then
  pgrep -af "$(cd "$BUNDLE" && pwd)/lightrnn" >&2
  fail "processes of a killed step are still running"
fi
echo "   ok: $took s, killed: $(grep -o -- '-- [a-z0-9-]*: FAILED (killed' "$D/capped.txt" | cut -d' ' -f2 | tr -d : | tr '\n' ' ')"
