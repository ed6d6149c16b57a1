"""llmis: a local LLM inference server for GGUF models with an OpenAI-compatible API."""

from __future__ import annotations

import os

__all__ = ["OMP_DEFAULTS", "__version__"]

__version__ = "0.1.0"

# How llama.cpp's OpenMP threads wait at the barriers inside a decode (~1,750 per SmolLM2
# step, ~540 per MiniLM query). libgomp's default spins ~300,000 rounds before sleeping; when
# a team shares its cores with any other runnable thread (the event loop, a client, another
# process), the spinning thread keeps its teammate off the core until the next scheduler
# tick, and one decode takes a second or more instead of milliseconds. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) avoids that but costs a futex wake-up per barrier: generation
# ~2x slower on free cores. 1,000 rounds (~20 us) was as fast as the default on free cores
# and kept most of PASSIVE's gain on busy ones (measured side by side with
# `python -m scripts.bench_batching --llmis-env GOMP_SPINCOUNT=300000`). libgomp
# reads this once, when llama_cpp loads it, so it is set here, before any llmis module
# imports llama_cpp; OMP_WAIT_POLICY or GOMP_SPINCOUNT already in the environment wins.
OMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
if not any(key in os.environ for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    os.environ.update(OMP_DEFAULTS)
