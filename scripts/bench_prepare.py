#!/usr/bin/env python3
"""What decoding costs a corpus's preparation: `lightrnn vocab` and `lightrnn shard` on
the same text as plain files, gzip, zstd, JSON lines in gzip and zstd, and Parquet
(snappy and zstd pages), in tokens per CPU-second (user + system time of the process,
every thread counted, so a decoder thread beside the tokeniser costs what it uses); and
how preparation in parts scales (`--part`, one process per part, then `--merge`).

usage: scripts/bench_prepare.py --bin target/release/lightrnn [--dir /tmp/bench-prepare]
           [--reps 5] [--files 8] [--parallel 1]

The text: the Penn Treebank's sentences (scripts/fetch_ptb.py), each file four different
random orders of all of them (~24 MB, ~4.2M tokens with <eos>): real English sentences,
no repeat within a compressor's window. JSON lines and Parquet rows hold documents of 20
sentences, as web corpora do. Compressed at the tools' default levels: Python's gzip
(zlib level 6, gzip's default), zstandard (level 3, zstd's), pyarrow (snappy, and
zstd at pyarrow's default level).
Prints one JSON line per run, then a summary line with the medians and each format's
cost against plain text.
"""
import argparse
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

FORMATS = ["txt", "txt.gz", "txt.zst", "jsonl.gz", "jsonl.zst", "parquet", "parquet.zst"]


def sentences(ptb):
    out = []
    for split in ("train", "valid", "test"):
        with open(os.path.join(ptb, f"ptb.{split}.txt"), encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    return out


def make_corpus(root, ptb, files):
    """The same documents in every format, one folder per format."""
    done = os.path.join(root, ".done")
    if os.path.exists(done):
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    sents = sentences(ptb)
    for fmt in FORMATS:
        os.makedirs(os.path.join(root, fmt), exist_ok=True)
    for k in range(files):
        rng = random.Random(k)
        lines = []
        for _ in range(4):
            order = sents[:]
            rng.shuffle(order)
            lines += order
        docs = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
        text = "".join(d + "\n" for d in docs).encode()
        jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
        name = f"part-{k:03d}"
        write = lambda fmt, body: open(os.path.join(root, fmt, f"{name}.{fmt}"), "wb").write(body)
        write("txt", text)
        write("txt.gz", gzip.compress(text, compresslevel=6, mtime=0))
        write("txt.zst", zstandard.ZstdCompressor(level=3).compress(text))
        write("jsonl.gz", gzip.compress(jsonl, compresslevel=6, mtime=0))
        write("jsonl.zst", zstandard.ZstdCompressor(level=3).compress(jsonl))
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, os.path.join(root, "parquet", f"{name}.parquet"), compression="snappy")
        pq.write_table(table, os.path.join(root, "parquet.zst", f"{name}.parquet"), compression="zstd")
    open(done, "w").close()


def run(cmd):
    """Run `cmd`; its summary line, wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {p.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, cpu


def run_parallel(cmds):
    """Run `cmds` at once; wall seconds and CPU seconds of them all."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(err)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--ptb", default="data/ptb")
    ap.add_argument("--dir", default="/tmp/bench-prepare")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--files", type=int, default=8)
    # One input at a time: the tokeniser and, for a compressed or structured input, its
    # decoding thread; their CPU time is what a token costs.
    ap.add_argument("--parallel", type=int, default=1)
    a = ap.parse_args()
    corpus = os.path.join(a.dir, "corpus")
    make_corpus(corpus, a.ptb, a.files)
    out = os.path.join(a.dir, "out")
    results = {}
    reference = None
    for rep in range(a.reps):
        # Interleaved: every format once per repetition.
        for fmt in FORMATS:
            src = os.path.join(corpus, fmt)
            size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
            dest = os.path.join(out, fmt.replace(".", "-"))
            par = ["--parallel", str(a.parallel)]
            v, v_wall, v_cpu = run([a.bin, "vocab", "--input", src, "--out", dest, "--size", "10000", *par])
            s, s_wall, s_cpu = run([a.bin, "shard", "--input", src, "--vocab", dest, "--out", dest, "--split", "train", *par])
            if reference is None:
                reference = v["tokens"]
            assert v["tokens"] == reference and s["tokens"] == reference, (fmt, v["tokens"], reference)
            line = {
                "format": fmt, "rep": rep, "input_mb": round(size / 1e6, 1), "tokens": v["tokens"],
                "vocab_wall_s": round(v_wall, 3), "vocab_cpu_s": round(v_cpu, 3),
                "vocab_tokens_per_cpu_s": round(v["tokens"] / v_cpu),
                "shard_wall_s": round(s_wall, 3), "shard_cpu_s": round(s_cpu, 3),
                "shard_tokens_per_cpu_s": round(s["tokens"] / s_cpu),
            }
            print(json.dumps(line), flush=True)
            results.setdefault(fmt, []).append(line)
    # Parts: the plain text counted in 1 and in 2 parts (one process each, one thread
    # each, at once), then merged.
    src = os.path.join(corpus, "txt")
    parts = {}
    for rep in range(a.reps):
        for n in (1, 2):
            dest = os.path.join(out, f"parts-{n}")
            wall, cpu = run_parallel([
                [a.bin, "vocab", "--input", src, "--out", dest, "--parallel", "1", "--part", f"{i}/{n}"]
                for i in range(n)
            ])
            m, m_wall, _ = run([a.bin, "vocab", "--input", src, "--out", dest, "--merge", "--size", "10000"])
            wall_s, cpu_s = run_parallel([
                [a.bin, "shard", "--input", src, "--vocab", dest, "--out", dest, "--parallel", "1", "--part", f"{i}/{n}"]
                for i in range(n)
            ])
            sm, sm_wall, _ = run([a.bin, "shard", "--input", src, "--vocab", dest, "--out", dest, "--merge"])
            line = {"parts": n, "rep": rep, "count_wall_s": round(wall, 3), "merge_counts_s": round(m_wall, 3),
                    "shard_wall_s": round(wall_s, 3), "merge_shards_s": round(sm_wall, 3),
                    "tokens": sm["tokens"]}
            print(json.dumps(line), flush=True)
            parts.setdefault(n, []).append(line)
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    plain_v = med(results["txt"], "vocab_tokens_per_cpu_s")
    plain_s = med(results["txt"], "shard_tokens_per_cpu_s")
    summary = {
        "summary": {
            fmt: {
                "input_mb": rows[0]["input_mb"],
                "vocab_tokens_per_cpu_s": med(rows, "vocab_tokens_per_cpu_s"),
                "shard_tokens_per_cpu_s": med(rows, "shard_tokens_per_cpu_s"),
                "vocab_cost_vs_plain": round(plain_v / med(rows, "vocab_tokens_per_cpu_s"), 3),
                "shard_cost_vs_plain": round(plain_s / med(rows, "shard_tokens_per_cpu_s"), 3),
            }
            for fmt, rows in results.items()
        },
        "parts": {
            n: {k: med(rows, k) for k in ("count_wall_s", "merge_counts_s", "shard_wall_s", "merge_shards_s")}
            for n, rows in parts.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
