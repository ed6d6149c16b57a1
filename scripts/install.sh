#!/usr/bin/env bash
# Create the virtualenv (if missing) and install llmis with its dev/test extras into it.
#
# llama-cpp-python is built from source. The default CMAKE_ARGS turn off AMX tile instructions,
# which crash on some CPUs that advertise them (SIGILL in ggml_backend_amx_mul_mat). A user's
# own CMAKE_ARGS (e.g. -DGGML_CUDA=on, -DGGML_METAL=on) replace the default entirely.
# Built wheels are kept in a cache keyed by CMAKE_ARGS, so the next install takes seconds and
# a CUDA build is never confused with a CPU one.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
DEFAULT_CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
export CMAKE_ARGS=${CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}
EXTRAS=${EXTRAS:-dev}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip wheel

key=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
cache=${LLMIS_WHEEL_CACHE:-$HOME/.cache/llmis/wheels}/$key
wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$CMAKE_ARGS); this takes minutes once" >&2
    mkdir -p "$cache"
    $PIP wheel --no-deps --no-cache-dir --wheel-dir "$cache" "llama-cpp-python==$LLAMA_VERSION"
    wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)
fi
$PIP install --quiet "$wheel"
$PIP install --quiet -e ".[$EXTRAS]"
touch "$VENV/.installed"
