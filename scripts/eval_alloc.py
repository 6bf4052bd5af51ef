#!/usr/bin/env python3
"""The cost of an allocation on dense loss tables (float64 sums), to compare solutions
found from different tables (e.g. sparse ones) on the same dense truth.

usage: eval_alloc.py DENSE_DIR alloc.npy [alloc2.npy ...]   (DENSE_DIR: L_r.npy, L_c.npy)
"""
import json
import sys

import numpy as np


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    lr = np.load(f"{sys.argv[1]}/L_r.npy", mmap_mode="r")
    lc = np.load(f"{sys.argv[1]}/L_c.npy", mmap_mode="r")
    v, c = lr.shape[0], lc.shape[1]
    for path in sys.argv[2:]:
        cells = np.load(path).astype(np.int64)
        if cells.shape != (v,) or len(np.unique(cells)) != v or cells.min() < 0 or cells.max() >= lr.shape[1] * c:
            sys.exit(f"{path}: not a complete allocation of {v} words")
        cost = 0.0
        for s in range(0, v, 65536):
            w = np.arange(s, min(v, s + 65536))
            cost += float(lr[w, cells[w] // c].astype(np.float64).sum() + lc[w, cells[w] % c].astype(np.float64).sum())
        print(json.dumps({"alloc": path, "cost": cost}))


if __name__ == "__main__":
    main()
