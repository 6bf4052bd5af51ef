#!/usr/bin/env bash
# The test command: installs the S3-compatible test server (moto, from PyPI, into
# .venv-test/, with numpy, safetensors and PyYAML for the export and deploy tests), starts it on 127.0.0.1, runs the workspace tests against it, stops it.
# Extra arguments go to `cargo test`. The TLS tests make their certificates with the
# openssl command line tool.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { echo "scripts/test.sh: the openssl command line tool is needed (apt-get install openssl)" >&2; exit 1; }
MOTO_VERSION=5.2.5
NUMPY_VERSION=2.4.6
SAFETENSORS_VERSION=0.8.0
PYYAML_VERSION=6.0.4
VENV=.venv-test
if ! "$VENV/bin/python" -c "import moto, flask, numpy, safetensors, yaml" 2>/dev/null; then
  python3 -m venv "$VENV"
  # moto: the S3 tests' server; numpy + safetensors: the export round-trip test; PyYAML:
  # the deployment templates' test.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
    "numpy==$NUMPY_VERSION" "safetensors==$SAFETENSORS_VERSION" "pyyaml==$PYYAML_VERSION"
fi
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
cargo test --workspace --locked "$@"
