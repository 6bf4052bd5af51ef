#!/usr/bin/env bash
# The CUDA 13.0 NVRTC of this repository (PyPI nvidia-cuda-nvrtc, pinned here once): prints
# the directory of libnvrtc, installing the wheel into .venv-test/ first when it is not
# there (scripts/test.sh installs it with the test tools; scripts/build-gpu-bundle.sh
# compiles the kernels ahead of time with it). `--version` prints the pinned version.
# The GPU machines run driver 580 (CUDA 13.0), which loads PTX ISA 9.0 (what NVRTC 13.0
# writes; 13.2's 9.2 it refuses) and CUBINs of the 13 line.
set -euo pipefail
NVRTC_VERSION=13.0.88
[[ "${1:-}" == --version ]] && { echo "$NVRTC_VERSION"; exit 0; }
cd "$(dirname "$0")/.."
VENV=.venv-test
lib() { ls -d "$PWD/$VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1; }
if [[ -z "$(lib)" ]]; then
  [[ -x "$VENV/bin/pip" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION" >&2
fi
lib
