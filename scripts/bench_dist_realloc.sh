#!/usr/bin/env bash
# A distributed reallocation on sparse tables at a large vocabulary (issue 17's
# distributed benchmark, docs/benchmarks.md section 13): a standalone coordinator and 2
# workers on loopback, the tiny preset on a corpus of V distinct words (each once, then a
# Zipf(1) stream of EXTRA more), 2 epochs with one sparse reallocation round after the
# first. Prints every process's peak RSS and wall time (GNU time) and the coordinator's
# summary line (`realloc_bytes_in`: what the round sent the coordinator).
#
# usage: scripts/bench_dist_realloc.sh V EXTRA K DIR [TABLE_GIB]
#
# K candidates per side (realloc_sparse), TABLE_GIB the bound on one range's dense tables
# (realloc_max_table_gib, default 1). LIGHTRNN (default target/release/lightrnn) names the
# binary. Run on a quiet machine: the figures include times.
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 9,13p "$0"; exit 2; }
V=$1 EXTRA=$2 K=$3 DIR=$4 GIB=${5:-1}
LIGHTRNN=${LIGHTRNN:-target/release/lightrnn}
[[ -x /usr/bin/time ]] || { echo "needs GNU time (/usr/bin/time; Debian: apt-get install time)" >&2; exit 2; }
mkdir -p "$DIR"
if [[ ! -f "$DIR/text/train.txt" ]]; then
  python3 - "$V" "$EXTRA" "$DIR/text" <<'PY'
import itertools, os, random, sys
v, extra, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(1)
os.makedirs(out, exist_ok=True)
cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(v)))
stream = lambda n: rng.choices(range(v), cum_weights=cum, k=n)
train = list(range(v)) + stream(extra)
rng.shuffle(train)
for name, toks in [("train.txt", train), ("valid.txt", stream(50000)), ("test.txt", stream(50000))]:
    with open(f"{out}/{name}", "w") as f:
        for i in range(0, len(toks), 20):
            f.write(" ".join(f"w{t}" for t in toks[i:i + 20]) + "\n")
PY
fi
rm -rf "$DIR/out"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
timed() { local name=$1; shift; /usr/bin/time -o "$DIR/$name.time" -f "%M %e" "$@"; }
timed coordinator "$LIGHTRNN" coordinator --preset tiny --data "$DIR/text" --out "$DIR/out" \
  --world-size 2 --listen "127.0.0.1:$PORT" --join-timeout-s 600 \
  --set vocab_size="$V" --set batch=64 --set epochs=2 --set threads=2 \
  --set realloc_every=1 --set realloc_rounds=1 --set realloc_sparse="$K" \
  --set realloc_max_table_gib="$GIB" > "$DIR/coordinator.json" 2> "$DIR/coordinator.log" &
for r in 0 1; do
  RANK=$r timed "worker$r" "$LIGHTRNN" worker --coordinator "http://127.0.0.1:$PORT" \
    --threads 1 > /dev/null 2> "$DIR/worker$r.log" &
done
wait
for p in coordinator worker0 worker1; do
  read -r kb secs < "$DIR/$p.time"
  echo "{\"process\": \"$p\", \"peak_rss_mib\": $((kb / 1024)), \"seconds\": $secs}"
done
grep -h 'allocation solved' "$DIR/coordinator.log" | tail -n 1
cat "$DIR/coordinator.json"
