"""What the corpus fetchers share: a checked download from a registry, and the PTB-style
files (the most frequent training words kept, the rest <unk>, one sentence per line)."""
import base64
import collections
import hashlib
import os
import urllib.request


def fetch_checked(url: str, sha512_b64: str) -> bytes:
    """The bytes at `url`, which must have the registry's SHA-512 (base64, as npm's
    `dist.integrity` gives it)."""
    data = urllib.request.urlopen(url, timeout=120).read()
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != sha512_b64:
        raise SystemExit(f"{url}: SHA-512 {got}, expected {sha512_b64}")
    return data


def split_of(i: int) -> str:
    """Files by their index in name order: 8 of every 10 to train, the 9th to valid, the
    10th to test."""
    return "valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"


def write_splits(out: str, name: str, splits: dict, vocab: int) -> None:
    """Write NAME.{train,valid,test}.txt under `out` from lists of sentences (lists of
    words), keeping the `vocab` most frequent training words, and print their counts
    and MD5 sums."""
    counts = collections.Counter(w for s in splits["train"] for w in s)
    keep = {w for w, _ in counts.most_common(vocab)}
    os.makedirs(out, exist_ok=True)
    for split, sents in splits.items():
        lines = [" ".join(w if w in keep else "<unk>" for w in s) for s in sents]
        body = ("\n".join(lines) + "\n").encode()
        path = os.path.join(out, f"{name}.{split}.txt")
        with open(path, "wb") as f:
            f.write(body)
        tokens = sum(len(s) + 1 for s in sents)  # with one <eos> per sentence
        print(f"{path}: {len(sents)} sentences, {tokens} tokens with <eos>, md5 {hashlib.md5(body).hexdigest()}")
