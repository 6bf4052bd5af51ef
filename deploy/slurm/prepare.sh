#!/bin/bash
# Prepare a dataset with SLURM arrays, no coordinator: the vocabulary counted in PARTS
# parts and merged, then each split tokenised in PARTS parts and merged, each phase a
# job that starts when the one before it succeeded. The dataset is the same, byte for
# byte, as `lightrnn vocab` and `lightrnn shard` write in one process.
#   PARTS=16 OUT=s3://corpora/c4 INPUT_train=s3://c4/en/train/ INPUT_valid=s3://c4/en/valid/ \
#     INPUT_test=s3://c4/en/test/ SIZE=100000 deploy/slurm/prepare.sh --partition=cpu
# Settings: those of deploy/slurm/prepare.sbatch, and
#   PARTS    parts per phase (array tasks; default 8)
#   SPLITS   the splits (default: "train valid test")
# Arguments: more sbatch options for every job (partition, account, time ...).
# Prints the jobs' ids as one JSON line; the last jobs are the splits' merges.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fail() { echo "prepare.sh: error: $*" >&2; exit 1; }
export PARTS=${PARTS:-8}
[[ $PARTS =~ ^[1-9][0-9]*$ ]] || fail "PARTS=$PARTS: a positive count"
[[ -n ${OUT:-} ]] || fail "set OUT (the dataset's location)"
read -ra splits <<< "${SPLITS:-train valid test}"
[[ ${#splits[@]} -gt 0 ]] || fail "SPLITS names no split"
for s in "${splits[@]}"; do
  v=INPUT_$s
  [[ -n ${!v:-} ]] || fail "set $v (the $s split's inputs)"
done
submit() { sbatch --parsable --export=ALL "$@" | cut -d';' -f1; }
array=(--array="0-$((PARTS - 1))")
vp=$(submit "${array[@]}" "$@" "$here/prepare.sbatch" vocab-part)
vm=$(submit --dependency="afterok:$vp" "$@" "$here/prepare.sbatch" vocab-merge)
ids="\"vocab_parts\":\"$vp\",\"vocab_merge\":\"$vm\""
for s in "${splits[@]}"; do
  sp=$(submit "${array[@]}" --dependency="afterok:$vm" "$@" "$here/prepare.sbatch" shard-part "$s")
  sm=$(submit --dependency="afterok:$sp" "$@" "$here/prepare.sbatch" shard-merge "$s")
  ids+=",\"${s}_parts\":\"$sp\",\"${s}_merge\":\"$sm\""
done
echo "{$ids}"
