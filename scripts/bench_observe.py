#!/usr/bin/env python3
"""What watching a run costs: the phase timers, a trace and TensorBoard's event files.

Usage: bench_observe.py [--bin target/release/lightrnn] [--data data/ptb] [--reps 5]
                        [--train-reps 3] [--steps 300]

1. `lightrnn bench` (the ptb-small model: V = 10k, n = m = 200, 2 layers, B = 20,
   T = 35) with the phase timers off (`--profile false`), on (the default) and keeping
   every span as a trace does (`--trace`), the three interleaved rep by rep: seconds per
   step, medians.
2. `lightrnn train --preset ptb-small` on PTB for `--steps` steps, logging every 10 steps
   (ten times the preset's rate, so the per-window work weighs more than it would):
   with TensorBoard and the phase timers off, both on (the defaults), and with the
   steps traced as well; interleaved; the training words per second of each run's
   summary and the `log` phase's seconds per step of its profile lines, medians.

The modes run in turn, each rep starting with the next one.

Prints one JSON line per measurement, then a summary line with the costs relative to
everything off.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def rotated(modes, rep):
    """The modes in turn, starting one later each rep: no mode always runs first."""
    k = rep % len(modes)
    return modes[k:] + modes[:k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/lightrnn")
    ap.add_argument("--data", default="data/ptb")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    bench = [a.bin, "bench", "--vocab", "10000", "--emb", "200", "--hidden", "200",
             "--layers", "2", "--batch", "20", "--bptt", "35", "--threads", str(a.threads),
             "--steps", "60", "--warmup", "5"]
    modes = {"off": ["--profile", "false"], "on": [], "trace": ["--trace"]}
    per_step = {m: [] for m in modes}
    for rep in range(a.reps):
        for m in rotated(list(modes), rep):
            r = run(bench + modes[m])
            per_step[m].append(r["s_per_step_median"])
            print(json.dumps({"what": "bench", "mode": m, "rep": rep,
                              "s_per_step_median": r["s_per_step_median"],
                              "phases_s_per_step": r["phases_s_per_step"],
                              "trace_spans": r["trace_spans"]}), flush=True)
    train_modes = {
        "off": ["--set", "tensorboard=false", "--set", "profile=false"],
        "on": [],
        "traced": ["--profile-steps", f"1:{a.steps}"],
    }
    wps = {m: [] for m in train_modes}
    log = {m: [] for m in train_modes}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.train_reps):
            for m in rotated(list(train_modes), rep):
                extra = train_modes[m]
                out = os.path.join(tmp, f"{m}-{rep}")
                r = run([a.bin, "train", "--preset", "ptb-small", "--data", a.data,
                         "--out", out, "--set", f"max_steps={a.steps}", "--set", "log_every=10",
                         "--set", f"threads={a.threads}"] + extra)
                wps[m].append(r["words_per_sec"])
                lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
                prof = [l["seconds_per_step"] for l in lines if l.get("kind") == "profile"]
                log_s = statistics.median(p.get("log", 0.0) for p in prof) if prof else None
                step_s = statistics.median(p["step"] for p in prof) if prof else None
                log[m].append(log_s)
                tb = os.path.join(out, "tb")
                tb_bytes = sum(os.path.getsize(os.path.join(tb, f)) for f in os.listdir(tb)) \
                    if os.path.isdir(tb) else 0
                print(json.dumps({"what": "train", "mode": m, "rep": rep,
                                  "words_per_sec": r["words_per_sec"],
                                  "log_s_per_step": log_s, "step_s": step_s,
                                  "tb_bytes": tb_bytes}), flush=True)
    med = {m: statistics.median(v) for m, v in per_step.items()}
    wmed = {m: statistics.median(v) for m, v in wps.items()}
    print(json.dumps({
        "what": "summary",
        "bench_s_per_step": med,
        "bench_cost_on": med["on"] / med["off"] - 1,
        "bench_cost_trace": med["trace"] / med["off"] - 1,
        "train_words_per_sec": wmed,
        "train_cost_on": wmed["off"] / wmed["on"] - 1,
        "train_cost_traced": wmed["off"] / wmed["traced"] - 1,
        "train_log_s_per_step_on": statistics.median(x for x in log["on"] if x is not None),
    }))


if __name__ == "__main__":
    main()
