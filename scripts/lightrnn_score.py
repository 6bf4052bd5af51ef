"""Score text with a model written by `lightrnn export`, using only numpy and safetensors.

    python3 scripts/lightrnn_score.py EXPORT_DIR FILE      # prints {"loss", "ppl", "words"}

The model (docs/export.md): words sit in an R x C table (word w -> row[w], col[w]); the
LSTM (gates i, f, g, o, as torch.nn.LSTM) reads each word as two steps, its row vector
emb_r[row[w]] then its column vector emb_c[col[w]]. The state after the column step of
the previous word predicts the next word's row (softmax of out_r), the state after its
row step predicts its column (softmax of out_c). A file is one stream of words with
<eos> after every line; the first word is context only, as in `lightrnn eval --batch 1`.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file


def load(d):
    t = load_file(f"{d}/model.safetensors")
    with open(f"{d}/model.json", encoding="utf-8") as f:
        info = json.load(f)
    with open(f"{d}/vocab.txt", encoding="utf-8") as f:
        words = [line.rsplit(" ", 1)[0] for line in f.read().split("\n") if line]
    return t, info, {w: i for i, w in enumerate(words)}


def log_softmax(z):
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


class Lstm:
    def __init__(self, t, layers, hidden):
        self.t, self.layers = t, layers
        self.h = [np.zeros(hidden, np.float64) for _ in range(layers)]
        self.c = [np.zeros(hidden, np.float64) for _ in range(layers)]

    def step(self, x):
        for l in range(self.layers):
            g = (
                self.t[f"lstm.weight_ih_l{l}"] @ x
                + self.t[f"lstm.bias_ih_l{l}"]
                + self.t[f"lstm.weight_hh_l{l}"] @ self.h[l]
                + self.t[f"lstm.bias_hh_l{l}"]
            )
            i, f, gg, o = np.split(g, 4)
            sig = lambda v: 1.0 / (1.0 + np.exp(-v))
            self.c[l] = sig(f) * self.c[l] + sig(i) * np.tanh(gg)
            self.h[l] = sig(o) * np.tanh(self.c[l])
            x = self.h[l]
        return x


def score(d, path):
    t, info, ids = load(d)
    t = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in t.items()}
    row, col = t["row"], t["col"]
    unk, eos = ids[info["unk"]], ids[info["eos"]]
    stream = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if info["lowercase"]:
                line = line.lower()
            stream += [ids.get(w, unk) for w in line.split()] + [eos]
    lstm = Lstm(t, info["layers"], info["hidden"])
    h = lstm.step(t["emb_c.weight"][col[stream[0]]])
    nll = 0.0
    for w in stream[1:]:
        nll -= log_softmax(t["out_r.weight"] @ h + t["out_r.bias"])[row[w]]
        h = lstm.step(t["emb_r.weight"][row[w]])
        nll -= log_softmax(t["out_c.weight"] @ h + t["out_c.bias"])[col[w]]
        h = lstm.step(t["emb_c.weight"][col[w]])
    n = len(stream) - 1
    return {"loss": nll / n, "ppl": math.exp(nll / n), "words": n}


if __name__ == "__main__":
    print(json.dumps(score(sys.argv[1], sys.argv[2])))
