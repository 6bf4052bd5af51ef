#!/usr/bin/env python3
"""Synthetic LightRNN loss tables with realistic structure, for allocation benchmarks.

usage: synthetic_tables.py --vocab V --out DIR [--rank 16] [--tokens 1e9] [--seed 1]

L_r[w, i] = n_w * -log softmax(u_w . a_i + noise)_i and likewise L_c with column
factors, where n_w are Zipf(1) counts of --tokens words over V words (so costs span
orders of magnitude), u_w a random rank-r word factor shared by the row and column
sides, and a small per-entry noise. Rows/columns whose factors align with many words
are contested, as in trained tables. Writes L_r.npy and L_c.npy (float32, [V, R] and
[V, C], R = C = ceil(sqrt(V))) chunk by chunk through memory maps (numpy only).
"""
import argparse
import math
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=20000)
    a = ap.parse_args()
    v = a.vocab
    side = math.isqrt(v - 1) + 1
    rng = np.random.default_rng(a.seed)
    counts = a.tokens / (np.arange(1, v + 1) * np.log(v))  # Zipf(1): n_w ~ N / (rank H_V)
    counts = np.maximum(np.round(counts), 1.0)
    row_f = rng.normal(size=(side, a.rank)) * 1.5
    col_f = rng.normal(size=(side, a.rank)) * 1.5
    # Popularity: some rows and columns are preferred by every word (congestion).
    row_pop = rng.normal(size=side) * 1.0
    col_pop = rng.normal(size=side) * 1.0
    os.makedirs(a.out, exist_ok=True)
    lr = np.lib.format.open_memmap(os.path.join(a.out, "L_r.npy"), mode="w+", dtype=np.float32, shape=(v, side))
    lc = np.lib.format.open_memmap(os.path.join(a.out, "L_c.npy"), mode="w+", dtype=np.float32, shape=(v, side))
    for s in range(0, v, a.chunk):
        e = min(v, s + a.chunk)
        u = rng.normal(size=(e - s, a.rank)) / math.sqrt(a.rank)
        for table, f, pop in ((lr, row_f, row_pop), (lc, col_f, col_pop)):
            z = u @ f.T + pop + 0.3 * rng.normal(size=(e - s, side))
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            table[s:e] = (-logp * counts[s:e, None]).astype(np.float32)
    lr.flush()
    lc.flush()
    print(f"wrote {a.out}/L_r.npy and L_c.npy: V={v}, R=C={side}, rank {a.rank}")


if __name__ == "__main__":
    main()
