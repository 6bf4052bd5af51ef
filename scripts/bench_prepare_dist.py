#!/usr/bin/env python3
"""How a distributed job's preparation of its text scales with its workers: `lightrnn
coordinator` with N `lightrnn worker` processes (each with --threads T) on a text
directory of many gzipped JSON-lines objects, the preparation's wall time read from the
summary (`prepare_seconds`), and the bytes each process read from files (`rchar` of
/proc/PID/io, sampled until it exits): the coordinator's against the workers'.

usage: scripts/bench_prepare_dist.py --bin target/release/lightrnn [--dir /tmp/bench-dist]
           [--reps 3] [--files 16] [--configs 1x1,2x1,1x2] [--shard-tokens 1048576]

The text: the Penn Treebank's sentences (scripts/fetch_ptb.py) in `--files` training
objects, each two random orders of all of them in documents of 20 sentences as JSON lines
(`{"text", "id"}`, Python's gzip at level 6), valid and test as PTB's own files. A config
WxT is W workers of T threads. Configs run in turn within each rep (so a slow spell of
the machine hits all alike); each run starts from an empty run directory (nothing
cached). Shards of 2^20 tokens (4 MiB) by default, so that each part holds many whole
shards and shares a few, as parts of a web-scale corpus do with the default 16M. Prints one JSON line per run, then the medians.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time


def make_corpus(root, ptb, files):
    done = os.path.join(root, ".done")
    if os.path.exists(done):
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(ptb, "ptb.train.txt"), encoding="utf-8") as f:
        sents = [line.strip() for line in f if line.strip()]
    for k in range(files):
        rng = random.Random(k)
        lines = []
        for _ in range(2):
            order = sents[:]
            rng.shuffle(order)
            lines += order
        docs = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
        body = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
        with open(os.path.join(root, f"web.train.{k:03d}.jsonl.gz"), "wb") as f:
            f.write(gzip.compress(body.encode(), compresslevel=6, mtime=0))
    for split in ("valid", "test"):
        shutil.copy(os.path.join(ptb, f"ptb.{split}.txt"), os.path.join(root, f"ptb.{split}.txt"))
    open(done, "w").close()


def rchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(binary, data, out, workers, threads, shard_tokens):
    shutil.rmtree(out, ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, RUST_LOG="warn")
    coord = subprocess.Popen(
        [binary, "coordinator", "--preset", "tiny", "--set", "max_steps=1",
         "--set", f"shard_tokens={shard_tokens}",
         "--set", f"threads={threads}", "--data", data, "--out", out,
         "--world-size", str(workers), "--listen", f"127.0.0.1:{port}",
         "--prepare-by", "workers"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    ws = [subprocess.Popen(
        [binary, "worker", "--coordinator", url, "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(workers)]
    seen = {p.pid: 0 for p in [coord] + ws}
    while coord.poll() is None:
        for p in [coord] + ws:
            r = rchar(p.pid)
            if r is not None:
                seen[p.pid] = max(seen[p.pid], r)
        time.sleep(0.02)
    for w in ws:
        w.wait()
    line = coord.stdout.read().decode().strip().splitlines()
    if coord.returncode != 0 or not line:
        sys.exit(f"coordinator failed ({coord.returncode})")
    s = json.loads(line[-1])
    return {
        "workers": workers, "threads": threads,
        "prepare_s": s["prepare_seconds"],
        "coordinator_read_mb": seen[coord.pid] / 1e6,
        "workers_read_mb": sum(seen[w.pid] for w in ws) / 1e6,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", default="/tmp/bench-dist")
    ap.add_argument("--ptb", default="data/ptb")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--configs", default="1x1,2x1,1x2")
    ap.add_argument("--shard-tokens", type=int, default=1 << 20)
    a = ap.parse_args()
    data = os.path.join(a.dir, "text")
    make_corpus(data, a.ptb, a.files)
    input_mb = sum(os.path.getsize(os.path.join(data, n)) for n in os.listdir(data) if not n.startswith(".")) / 1e6
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    rows = []
    for rep in range(a.reps):
        for w, t in configs:
            r = run(a.bin, data, os.path.join(a.dir, "run"), w, t, a.shard_tokens)
            r.update(rep=rep, input_mb=round(input_mb, 1))
            print(json.dumps(r), flush=True)
            rows.append(r)
    summary = {}
    for w, t in configs:
        mine = [r for r in rows if (r["workers"], r["threads"]) == (w, t)]
        summary[f"{w}x{t}"] = {
            "prepare_s": statistics.median(r["prepare_s"] for r in mine),
            "coordinator_read_mb": statistics.median(r["coordinator_read_mb"] for r in mine),
            "workers_read_mb": statistics.median(r["workers_read_mb"] for r in mine),
        }
    if "1x1" in summary and "2x1" in summary:
        summary["speedup_2x1_over_1x1"] = summary["1x1"]["prepare_s"] / summary["2x1"]["prepare_s"]
    print(json.dumps({"summary": summary, "input_mb": round(input_mb, 1)}))


if __name__ == "__main__":
    main()
