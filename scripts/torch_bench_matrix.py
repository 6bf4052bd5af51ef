"""The PyTorch reference's throughput (peers/bench.py, LightRNN on CUDA with TF32) for many
configurations in one Python process: torch is imported and CUDA initialised once. For each
vocabulary a Zipf corpus is written once (peers/zipf_corpus.py); each configuration prints
bench.py's JSON line, or, when it fails, a line {"failed": ..., "error": ...} with the
traceback on stderr, and the next one runs.

    python3 torch_bench_matrix.py --peers DIR --work DIR --configs V:n:B[,V:n:B...] \
        [--layers 2 --bptt 35 --steps 10 --warmup 2 --tokens 1000000]

scripts/gpu-check.sh runs it (tiers 1 and 3); bench.py is the reference's own, unchanged.
"""
import argparse
import json
import os
import sys
import traceback


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", required=True, help="the PyTorch reference (bench.py, zipf_corpus.py)")
    ap.add_argument("--work", required=True, help="where the corpora are written")
    ap.add_argument("--configs", required=True, help="V:n:B,... (vocabulary, emb = hidden, streams)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    a = ap.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",") if c]
    sys.path.insert(0, a.peers)
    import torch  # noqa: E402 (after the peers' path)
    import bench
    import zipf_corpus

    failed = 0
    for vocab, n, batch in configs:
        need = (a.warmup + a.steps + 1) * batch * a.bptt
        tokens = max(a.tokens, need)
        corpus = os.path.join(a.work, f"zipf{vocab}-{tokens}")
        try:
            if not os.path.exists(os.path.join(corpus, "test.txt")):
                sys.argv = ["zipf_corpus.py", "--out", corpus, "--vocab", str(vocab), "--tokens", str(tokens)]
                zipf_corpus.main()
            sys.argv = ["bench.py", "--corpus", corpus, "--model", "lightrnn", "--vocab", str(vocab),
                        "--emb", str(n), "--hidden", str(n), "--layers", str(a.layers), "--batch", str(batch),
                        "--bptt", str(a.bptt), "--device", "cuda", "--tf32", "--steps", str(a.steps),
                        "--warmup", str(a.warmup)]
            bench.main()
        except BaseException as e:  # a failed configuration (SystemExit from argparse too)
            failed += 1
            traceback.print_exc(file=sys.stderr)
            print(json.dumps({"failed": {"vocab": vocab, "emb": n, "hidden": n, "batch": batch},
                              "error": f"{type(e).__name__}: {e}"}))
        finally:
            sys.stdout.flush()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(json.dumps({"configs": len(configs), "failed": failed}))
    return 1 if failed == len(configs) else 0


if __name__ == "__main__":
    sys.exit(main())
