"""llmis: a local LLM inference server for GGUF models with an OpenAI-compatible API."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
