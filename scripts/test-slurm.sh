#!/usr/bin/env bash
# The SLURM template's tests (coordinator/tests/slurm.rs) on a real SLURM: installs
# Debian's slurm-wlm and munge where they are missing, starts a one-node SLURM on this
# machine (scripts/slurm-local.sh: munged, slurmctld and slurmd run directly), runs the
# tests through scripts/test.sh, stops it. Where SLURM cannot be installed (no apt, or
# not root) it says so and skips. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "scripts/test-slurm.sh: skipped: SLURM is not installed and cannot be here (needs root and apt-get for slurm-wlm and munge)" >&2
    exit 0
  fi
fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/lightrnn-slurm.XXXXXX")
trap 'scripts/slurm-local.sh stop "$DIR"; rm -rf "$DIR"' EXIT
# Its own ports, so a SLURM already on this machine is left alone.
# The node offers 8 CPUs per core: every test's job (2 CPUs) can run at once, and the
# two-jobs test finds room for both.
CPUS=${CPUS:-8} SLURMCTLD_PORT=${SLURMCTLD_PORT:-16817} SLURMD_PORT=${SLURMD_PORT:-16818} \
  scripts/slurm-local.sh start "$DIR"
export SLURM_CONF=$DIR/slurm.conf LIGHTRNN_REQUIRE_SLURM=1 LIGHTRNN_SLURM_TEST_DIR=$DIR
# The jobs wait on SLURM more than on the CPUs: several tests at once.
scripts/test.sh -p lightrnn-coordinator --test slurm "$@" -- --test-threads 6 --nocapture
