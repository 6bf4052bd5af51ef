#!/usr/bin/env bash
# The test command: installs the S3-compatible test server (moto, from PyPI, into
# .venv-test/, with numpy, safetensors, PyYAML and kubernetes-validate for the export and
# deploy tests, tensorboard for the event files' test, and the CUDA 13.0 NVRTC that
# compiles the CUDA kernels with no GPU),
# starts it on 127.0.0.1,
# runs the workspace tests against it, stops it.
# Extra arguments go to `cargo test` (e.g. `-p lightrnn-kernels --features cuda`: the CUDA
# backend's tests on the emulated device, and its kernels through NVRTC). The TLS tests make their certificates with the
# openssl command line tool.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { echo "scripts/test.sh: the openssl command line tool is needed (apt-get install openssl)" >&2; exit 1; }
MOTO_VERSION=5.2.5
NUMPY_VERSION=2.4.6
SAFETENSORS_VERSION=0.8.0
PYYAML_VERSION=6.0.4
KUBERNETES_VALIDATE_VERSION=1.37.0
TENSORBOARD_VERSION=2.20.0
# The CUDA 13.0 NVRTC, pinned in scripts/nvrtc-lib.sh.
NVRTC_VERSION=$(scripts/nvrtc-lib.sh --version)
VENV=.venv-test
NVRTC_LIB() { ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1; }
if ! "$VENV/bin/python" -c "import moto, flask, numpy, safetensors, yaml, kubernetes_validate, tensorboard" 2>/dev/null || [[ -z "$(NVRTC_LIB)" ]]; then
  python3 -m venv "$VENV"
  # moto: the S3 tests' server; numpy + safetensors: the export round-trip test; PyYAML
  # and kubernetes-validate (the Kubernetes API's schemas, offline): the deployment
  # templates' tests; tensorboard: its own reader of the runs' event files.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
    "numpy==$NUMPY_VERSION" "safetensors==$SAFETENSORS_VERSION" "pyyaml==$PYYAML_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
    "tensorboard==$TENSORBOARD_VERSION"
fi
# NVRTC needs its lib directory on the library path (for libnvrtc-builtins); the CUDA
# tests must find it (tests/nvrtc.rs fails instead of skipping).
export LD_LIBRARY_PATH="$PWD/$(NVRTC_LIB)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIGHTRNN_REQUIRE_NVRTC=1
export LIGHTRNN_TEST_PYTHON="$PWD/$VENV/bin/python"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" > "$VENV/moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null; then
    break
  fi
  sleep 0.2
done
export LIGHTRNN_TEST_S3_ENDPOINT="http://127.0.0.1:$PORT"
# The whole workspace, unless the arguments name packages.
SCOPE=--workspace
for a in "$@"; do [[ "$a" == -p || "$a" == --package || "$a" == --package=* ]] && SCOPE=; done
cargo test $SCOPE --locked "$@"
