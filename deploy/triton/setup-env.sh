#!/usr/bin/env bash
# Build the side virtual environment that runs a real Triton server with the blip_itm model.
#
#   deploy/triton/setup-env.sh [VENV]        (default: .venv-triton in the repository root)
#
# Why a venv of its own: the Python backend's stub (bundled by nvidia-pytriton) is built with a
# pybind11 that reads numpy's pre-2.0 ABI, so the Python it embeds needs numpy<2, while the
# project's main venv has numpy 2. The stub's interpreter takes its packages from the first
# `python3` on PATH (a venv's pyvenv.cfg), so tritonserver runs with this venv's bin/ first
# on PATH (deploy/triton/tritonserver.sh does that); the venv therefore holds what model.py
# imports: torch (the CPU build on a CPU host: TORCH_INDEX_URL), transformers and the project itself (editable, no other deps).
# Only the nvidia-pytriton wheel's bundled tritonserver binary and Python backend are used, not
# its Python API, so it is installed without its dependencies.
#
# Idempotent: a finished venv has VENV/.installed and is left alone unless FORCE=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${1:-$ROOT/.venv-triton}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTRITON_VERSION=${PYTRITON_VERSION:-0.7.0}
STAMP=$VENV/.installed

if [[ -f $STAMP && ${FORCE:-0} != 1 ]]; then
  exit 0
fi
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, so that transformers keeps it. The build (CPU or CUDA) is the index's choice, not
# the version's: TORCH_INDEX_URL names one (empty: pip's configured index), as in the Makefile.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
"${PIP[@]}" "numpy<2" "transformers>=5.0,<6" "safetensors>=0.4" "tokenizers>=0.21" "pillow>=10.0"
"${PIP[@]}" --no-deps "nvidia-pytriton==$PYTRITON_VERSION"
"${PIP[@]}" --no-deps -e "$ROOT"

# The Python backend looks for its stub next to libtriton_python.so; the wheel ships one stub
# per Python version beside it (pytriton copies the matching one at run time; we do it once).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
VERSION=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SERVER=$SITE/pytriton/tritonserver
STUB=$SERVER/python_backend_stubs/$VERSION/triton_python_backend_stub
if [[ ! -x $STUB ]]; then
  echo "nvidia-pytriton $PYTRITON_VERSION has no Python backend stub for Python $VERSION" \
    "(it has: $(ls "$SERVER/python_backend_stubs" | tr '\n' ' '))" >&2
  exit 1
fi
cp "$STUB" "$SERVER/backends/python/triton_python_backend_stub"
"$VENV/bin/python" -c 'import numpy, torch, transformers, teacher_server.engine' >/dev/null
touch "$STAMP"
echo "Triton environment ready: $VENV (tritonserver: $SERVER/bin/tritonserver)"
