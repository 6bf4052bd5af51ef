#!/usr/bin/env bash
# Behaviour fingerprint of the trainer: runs a fixed set of trainings on the Penn Treebank
# and prints, per run, the SHA-256 of every tensor object it wrote (checkpoints, best
# model) and of its summary.json and metrics.jsonl with the timing fields removed
# (seconds, words/s, backend name). Refactors must leave this output unchanged: run it
# before and after, and diff.
#
#   A: ptb-small, 200 steps, one process (dropout, SGD, clipping, periodic checkpoint)
#   B: tiny, 2 epochs, reallocation after epoch 1 (scalable solver, carried inputs,
#      measured loss after the move), Adam, one process
#   C: tiny, 2 worker processes with grad_groups=2, 2 epochs, reallocation after
#      epoch 1 through the coordinator, a checkpoint every 500 steps
#
# Usage: scripts/fingerprint.sh [OUT_DIR]   (default target/fingerprint; needs a release
# build: cargo build --release --locked)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/fingerprint}
BIN=${BIN:-target/release/lightrnn}
python3 scripts/fetch_ptb.py data/ptb >/dev/null
rm -rf "$OUT" && mkdir -p "$OUT"
run() {
  local name=$1
  shift
  "$BIN" train --data data/ptb --out "$OUT/$name" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
}
run A --preset ptb-small --set max_steps=200 --set checkpoint_every=100 --set log_every=20
run B --preset tiny --set epochs=2 --set realloc_every=1 --set realloc_rounds=1 \
  --set realloc_check=true --set optimizer=adam --set lr=0.003 --set log_every=500
run C --preset tiny --workers 2 --set grad_groups=2 --set epochs=2 --set realloc_every=1 \
  --set realloc_rounds=1 --set checkpoint_every=500 --set log_every=500
python3 - "$OUT" <<'PY'
import hashlib, json, os, sys

out = sys.argv[1]
# Timings (every key that starts or ends with "seconds") and the backend's description.
VOLATILE = {"words_per_sec", "global_words_per_sec", "backend"}

def volatile(k):
    return k in VOLATILE or k.startswith("seconds") or k.endswith("seconds")

def scrub(v):
    if isinstance(v, dict):
        return {k: scrub(x) for k, x in v.items() if not volatile(k)}
    if isinstance(v, list):
        return [scrub(x) for x in v]
    return v

def sha(b):
    return hashlib.sha256(b).hexdigest()

for run in sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))):
    root = os.path.join(out, run)
    for dirpath, _, files in sorted(os.walk(root)):
        rel = os.path.relpath(dirpath, root)
        if rel.startswith("data"):
            continue
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            name = os.path.join(run, rel, f).replace("/./", "/")
            if f.endswith(".safetensors") or f in ("vocab.txt", "config.toml"):
                print(name, sha(open(p, "rb").read()))
            elif f == "summary.json":
                print(name, sha(json.dumps(scrub(json.load(open(p))), sort_keys=True).encode()))
            elif f == "metrics.jsonl":
                lines = [json.dumps(scrub(json.loads(l)), sort_keys=True) for l in open(p) if l.strip()]
                print(name, sha("\n".join(lines).encode()), f"({len(lines)} lines)")
            elif f == "meta.json":
                m = scrub(json.load(open(p)))
                # The manifest lists the objects' hashes: its scrubbed form covers them.
                print(name, sha(json.dumps(m, sort_keys=True).encode()))
PY
