#!/usr/bin/env bash
# Run the tritonserver binary bundled by nvidia-pytriton on deploy/triton/model_repository.
#
#   deploy/triton/tritonserver.sh [tritonserver flags...]
#
# Flags are passed through (e.g. --grpc-port 8001 --http-port 8000 --metrics-port 8002); the
# model repository and backend directory are filled in unless given. The venv comes from
# deploy/triton/setup-env.sh (HOIDISTILL_TRITON_VENV, default .venv-triton in the repository).
# The blip_itm model reads HOIDISTILL_MODEL and the other HOIDISTILL_* variables (see the README).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${HOIDISTILL_TRITON_VENV:-$ROOT/.venv-triton}
if [[ ! -f $VENV/.installed ]]; then
  echo "no Triton environment at $VENV: run deploy/triton/setup-env.sh first" >&2
  exit 2
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
SERVER=$SITE/pytriton/tritonserver
# The stub embeds the venv's Python through libpython; prefer the one of the venv's own base
# interpreter (pyenv, python.org builds) over the distribution's, so the two always agree.
LIBPYTHON_DIR=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')

args=("$@")
has_flag() {
  local flag
  for flag in "${args[@]}"; do [[ $flag == "$1" || $flag == "$1="* ]] && return 0; done
  return 1
}
has_flag --model-repository || args+=("--model-repository=$ROOT/deploy/triton/model_repository")
has_flag --backend-directory || args+=("--backend-directory=$SERVER/backends")

# The stub's interpreter adopts the first python3 on PATH as its home, hence this venv's bin/.
export PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="$SITE/nvidia_pytriton.libs:$LIBPYTHON_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$SERVER/bin/tritonserver" "${args[@]}"
