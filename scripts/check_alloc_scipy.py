#!/usr/bin/env python3
"""Compare lightrnn allocations with scipy's exact optimum (dense; V up to ~10k).

usage: check_alloc_scipy.py DIR NAME...   (DIR holds L_r.npy, L_c.npy and alloc-NAME.npy)
"""
import sys, time, json, numpy as np
from scipy.optimize import linear_sum_assignment
d = sys.argv[1]
Lr = np.load(f"{d}/L_r.npy").astype(np.float64); Lc = np.load(f"{d}/L_c.npy").astype(np.float64)
V, R = Lr.shape; C = Lc.shape[1]
t = time.time()
cost = (Lr[:, :, None] + Lc[:, None, :]).reshape(V, -1)
w, s = linear_sum_assignment(cost)
opt = float(cost[w, s].sum())
out = {"V": V, "scipy_optimum": opt, "scipy_seconds": time.time() - t}
for name in sys.argv[2:]:
    a = np.load(f"{d}/alloc-{name}.npy")
    assert len(set(a.tolist())) == V
    c = float(cost[np.arange(V), a].sum())
    out[name] = c; out[name + "_rel_gap"] = (c - opt) / opt
print(json.dumps(out))
