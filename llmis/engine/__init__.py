"""The engine: llama.cpp models, contexts, sampling, and the per-model schedulers.

Holds the llama wrapper, the generation and embedding schedulers, jobs, sampling and logprobs.
It is the only package that touches ``llama_cpp``; it imports nothing of llmis but ``errors``.
"""
