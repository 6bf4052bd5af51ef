#!/usr/bin/env python3
"""Check a run's TensorBoard events against its metrics.jsonl with TensorBoard's own reader.

Usage: check_tensorboard.py RUN_DIR

Loads RUN_DIR/tb with tensorboard's EventAccumulator (every value kept) and checks that
each scalar tag holds exactly the steps and values the metrics lines give it (f32
rounding), that no (tag, step) appears twice in the files as written (what a reader
without TensorBoard's purge would see), that the config and each reallocation decision
are there as text, and an allocation image after each round. Prints a JSON summary;
exits 1 with the mismatches listed.
"""
import json
import math
import os
import sys
from collections import Counter, defaultdict

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def expected(lines):
    """tag -> {step: value} as the writer maps metrics lines to scalars."""
    want = defaultdict(dict)

    def put(tag, step, v):
        # A later line of the same step replaces an earlier one (the validation of an
        # epoch that ended where a stopped run resumed, after the stop's).
        if v is not None and math.isfinite(v):
            want[tag][step] = v

    rounds = 0
    decisions = 0
    for l in lines:
        k, s = l.get("kind"), l.get("step")
        if k == "train":
            for key, tag in [("loss", "train/loss"), ("ppl", "train/ppl"), ("lr", "train/lr"),
                             ("words_per_sec", "train/words_per_sec"),
                             ("grad_norm", "train/grad_norm")]:
                put(tag, s, l.get(key))
            for r, w in enumerate(l.get("rank_words_per_sec", [])):
                put(f"train/words_per_sec/rank{r}", s, w)
        elif k == "valid":
            put("valid/loss", s, l.get("loss"))
            put("valid/ppl", s, l.get("ppl"))
            put("train/epoch_loss", s, l.get("train_loss"))
        elif k == "test":
            put("test/loss", s, l.get("loss"))
            put("test/ppl", s, l.get("ppl"))
        elif k == "realloc":
            decisions += 1
            before = l.get("objective_before")
            for key in ["objective_before", "objective_after", "lower_bound",
                        "train_loss_before", "train_loss_after"]:
                put(f"realloc/{key}", s, l.get(key))
            if before is not None and math.isfinite(before):
                rounds += 1
                put("realloc/words_moved", s, float(l["words_moved"]))
            st, ss = l.get("seconds_tables"), l.get("seconds_solve")
            if st is not None and ss is not None:
                put("realloc/seconds", s, st + ss)
            auto = l.get("auto")
            if auto:
                put("realloc/predicted_gain", s, auto.get("predicted_gain"))
                put("realloc/realized_gain", s, auto.get("realized"))
        elif k == "profile":
            for phase, v in l["seconds_per_step"].items():
                put(f"time/{phase}", s, v)
            if "checkpoint" in l["seconds_per_step"]:
                put("checkpoint/seconds", s, l["seconds_per_step"]["checkpoint"] * l["steps"])
    return want, rounds, decisions


def close(a, b):
    # Scalars are stored as f32.
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-37


def main():
    run = sys.argv[1]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    want, rounds, decisions = expected(lines)
    tb = os.path.join(run, "tb")
    acc = ea.EventAccumulator(tb, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    errors = []
    for tag, steps in sorted(want.items()):
        if tag not in tags["scalars"]:
            errors.append(f"{tag}: missing")
            continue
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        if [s for s, _ in got] != sorted(steps):
            errors.append(f"{tag}: steps {[s for s, _ in got]} != {sorted(steps)}")
            continue
        for s, v in got:
            if not close(v, steps[s]):
                errors.append(f"{tag} at step {s}: {v} != {steps[s]}")
    extra = set(tags["scalars"]) - set(want)
    if extra:
        errors.append(f"scalars not in metrics.jsonl: {sorted(extra)}")
    # Every (tag, step) once in the files as written.
    seen = Counter()
    files = sorted(f for f in os.listdir(tb) if "tfevents" in f)
    for name in files:
        for ev in EventFileLoader(os.path.join(tb, name)).Load():
            for v in ev.summary.value:
                seen[(v.tag, ev.step)] += 1
    twice = sorted(k for k, n in seen.items() if n > 1)
    if twice:
        errors.append(f"(tag, step) written twice: {twice[:10]}")
    texts = tags["tensors"]
    if "config" not in texts:
        errors.append("no config text")
    else:
        body = acc.Tensors("config")[-1].tensor_proto.string_val[0].decode()
        if "vocab_size" not in body:
            errors.append("the config text has no vocab_size")
    n_decisions = len(acc.Tensors("realloc/decision")) if "realloc/decision" in texts else 0
    if n_decisions != decisions:
        errors.append(f"{n_decisions} decision texts for {decisions} realloc lines")
    images = acc.Images("realloc/allocation") if "realloc/allocation" in tags["images"] else []
    if len(images) != rounds:
        errors.append(f"{len(images)} allocation images for {rounds} rounds")
    for im in images:
        if not im.encoded_image_string.startswith(b"\x89PNG") or im.width <= 0:
            errors.append(f"allocation image at step {im.step} is not a PNG")
    out = {
        "files": len(files),
        "scalar_tags": len(tags["scalars"]),
        "scalars": sum(len(v) for v in want.values()),
        "rounds": rounds,
        "images": len(images),
        "decisions": n_decisions,
        "errors": errors,
    }
    print(json.dumps(out))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
