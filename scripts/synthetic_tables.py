#!/usr/bin/env python3
"""Synthetic LightRNN loss tables with realistic structure, for allocation benchmarks.

usage: synthetic_tables.py --vocab V --out DIR [--sparse K] [--rank 16] [--tokens 1e9]
                           [--seed 1] [--jobs N]

L_r[w, i] = n_w * -log softmax(u_w . a_i + pop_i + noise)_i and likewise L_c with column
factors, where n_w are Zipf(1) counts of --tokens words over V words (so costs span
orders of magnitude), u_w a random rank-r word factor shared by the row and column
sides, pop a per-row (per-column) popularity every word shares, and a small per-entry
noise. Rows/columns whose factors align with many words are contested, as in trained
tables. R = C = ceil(sqrt(V)).

Dense (default): L_r.npy and L_c.npy (float32, [V, R] and [V, C]), written chunk by
chunk through memory maps.

Sparse (--sparse K): the tables `lightrnn allocate --tables DIR` reads without the
dense arrays (docs/allocation.md, "Sparse tables"): rows.npy / cols.npy (int32 [V, K],
each word's K cheapest rows / columns, cheapest first), row_loss.npy / col_loss.npy
(float32 [V, K], their losses), row_sum.npy / col_sum.npy (float64 [V], the sum of the
word's whole row / column table, in float64 over the float32 entries) and tables.json
(vocab, rows, cols, k). Memory is O(chunk x R) whatever V is.

The values depend on --seed and --chunk only (each chunk of words draws from its own
stream), not on --jobs: the sparse tables are exactly those of the dense tables of the
same seed, as `lightrnn tables --sparse` would cut them.
"""
import argparse
import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

G = {}


def setup(a):
    v = a.vocab
    side = math.isqrt(v - 1) + 1
    rng = np.random.default_rng(a.seed)
    counts = a.tokens / (np.arange(1, v + 1) * np.log(v))  # Zipf(1): n_w ~ N / (rank H_V)
    counts = np.maximum(np.round(counts), 1.0).astype(np.float32)
    row_f = (rng.normal(size=(side, a.rank)) * 1.5).astype(np.float32)
    col_f = (rng.normal(size=(side, a.rank)) * 1.5).astype(np.float32)
    # Popularity: some rows and columns are preferred by every word (congestion).
    row_pop = rng.normal(size=side).astype(np.float32)
    col_pop = rng.normal(size=side).astype(np.float32)
    return dict(v=v, side=side, counts=counts, sides=((row_f, row_pop), (col_f, col_pop)), a=a)


def chunk_tables(g, s):
    """The row and column tables of words [s, s + chunk): two float32 [n, side] arrays."""
    a = g["a"]
    e = min(g["v"], s + a.chunk)
    rng = np.random.default_rng([a.seed, 1 + s // a.chunk])
    u = rng.standard_normal(size=(e - s, a.rank), dtype=np.float32) / np.float32(math.sqrt(a.rank))
    out = []
    for f, pop in g["sides"]:
        z = u @ f.T
        z += pop
        # Noise of standard deviation 0.3, uniform (4x cheaper to draw than normal).
        noise = rng.random(size=z.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(0.3 * math.sqrt(12.0))
        z += noise
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
        z -= lse  # log-probabilities
        z *= -g["counts"][s:e, None]
        out.append(z)
    return s, out


def sparse_of(table, k):
    """Each row's k smallest entries (ascending; ties by index) and the row's float64 sum."""
    idx = np.argpartition(table, k - 1, axis=1)[:, :k] if k < table.shape[1] else np.tile(
        np.arange(table.shape[1]), (table.shape[0], 1))
    val = np.take_along_axis(table, idx, axis=1)
    order = np.lexsort((idx, val), axis=1)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int32)
    val = np.take_along_axis(val, order, axis=1)
    return idx, val, table.sum(axis=1, dtype=np.float64)


def work(s):
    g = G["g"]
    _, (lr, lc) = chunk_tables(g, s)
    k = g["a"].sparse
    if k:
        return s, (sparse_of(lr, k), sparse_of(lc, k))
    G["lr"][s:s + len(lr)] = lr
    G["lc"][s:s + len(lc)] = lc
    return s, None


def init(g, paths):
    G["g"] = g
    if paths:
        G["lr"] = np.load(paths[0], mmap_mode="r+")
        G["lc"] = np.load(paths[1], mmap_mode="r+")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparse", type=int, default=0, metavar="K",
                    help="write sparse tables with each word's K best rows and columns")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    a = ap.parse_args()
    if a.vocab < 2:
        sys.exit("synthetic_tables.py: --vocab must be at least 2")
    g = setup(a)
    v, side = g["v"], g["side"]
    if a.sparse < 0 or a.sparse > side:
        sys.exit(f"synthetic_tables.py: --sparse must be between 1 and R = {side}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    starts = range(0, v, a.chunk)
    if a.sparse:
        k = a.sparse
        arrays = {
            "rows": np.lib.format.open_memmap(os.path.join(a.out, "rows.npy"), "w+", np.int32, (v, k)),
            "row_loss": np.lib.format.open_memmap(os.path.join(a.out, "row_loss.npy"), "w+", np.float32, (v, k)),
            "cols": np.lib.format.open_memmap(os.path.join(a.out, "cols.npy"), "w+", np.int32, (v, k)),
            "col_loss": np.lib.format.open_memmap(os.path.join(a.out, "col_loss.npy"), "w+", np.float32, (v, k)),
        }
        row_sum = np.zeros(v, np.float64)
        col_sum = np.zeros(v, np.float64)
        paths = None
    else:
        paths = [os.path.join(a.out, n) for n in ("L_r.npy", "L_c.npy")]
        for p in paths:
            np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(v, side)).flush()
    done = 0
    with Pool(a.jobs, initializer=init, initargs=(g, paths)) as pool:
        for s, res in pool.imap_unordered(work, starts):
            if res is not None:
                (ri, rv, rs), (ci, cv, cs) = res
                e = s + len(ri)
                arrays["rows"][s:e], arrays["row_loss"][s:e], row_sum[s:e] = ri, rv, rs
                arrays["cols"][s:e], arrays["col_loss"][s:e], col_sum[s:e] = ci, cv, cs
            done += 1
            if done % 50 == 0 or done == len(starts):
                el = time.time() - t0
                print(f"{min(v, done * a.chunk)}/{v} words, {el:.0f} s, "
                      f"{el / done * (len(starts) - done):.0f} s left", file=sys.stderr, flush=True)
    if a.sparse:
        for m in arrays.values():
            m.flush()
        np.save(os.path.join(a.out, "row_sum.npy"), row_sum)
        np.save(os.path.join(a.out, "col_sum.npy"), col_sum)
        with open(os.path.join(a.out, "tables.json"), "w") as f:
            json.dump({"format": "lightrnn-sparse-tables", "version": 1, "vocab": v,
                       "rows": side, "cols": side, "k": a.sparse}, f)
            f.write("\n")
        print(f"wrote sparse tables to {a.out}: V={v}, R=C={side}, k={a.sparse}, rank {a.rank}")
    else:
        print(f"wrote {a.out}/L_r.npy and L_c.npy: V={v}, R=C={side}, rank {a.rank}")


if __name__ == "__main__":
    main()
