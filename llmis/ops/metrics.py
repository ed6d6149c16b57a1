"""Prometheus metrics on ``GET /metrics``, named as llama-server and vLLM name theirs.

Each application owns one :class:`Metrics` with its own ``CollectorRegistry`` (never the
global default one). Per-model series are labelled ``model_name``, as vLLM labels them, so
dashboards built for vLLM (``vllm:*``) or llama-server (``llamacpp:*``) work unchanged; what
neither has is named ``llmis:*``. Gauges that describe the models (running and waiting
requests, loaded models, model memory) are read from the model manager at scrape time.

Contract with the model manager (duck-typed, read at scrape time, absent = not exported):
``ModelEntry.predicted_bytes`` / ``ModelEntry.measured_bytes`` (``int | None``) and
``ModelManager.evictions`` (a mapping model name -> evictions so far).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmis.models.manager import ModelManager

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_MODEL = ["model_name"]


class _ManagerCollector(Collector):
    """Gauges read from the model manager when Prometheus scrapes."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests being generated now.", labels=_MODEL
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting in a model's queue.", labels=_MODEL
        )
        memory = GaugeMetricFamily(
            "llmis:model_memory_bytes",
            "Model memory: predicted before loading, measured (RSS change) after.",
            labels=["model_name", "kind"],
        )
        cached = CounterMetricFamily(
            "llmis:prompt_tokens_cached",
            "Prompt tokens reused from the KV cache instead of evaluated (since the model loaded).",
            labels=_MODEL,
        )
        kv_tokens = GaugeMetricFamily(
            "llamacpp:kv_cache_tokens", "Tokens held in the KV cache, all slots.", labels=_MODEL
        )
        busy_slots = GaugeMetricFamily(
            "llmis:slots_busy", "Generation slots running a job now.", labels=_MODEL
        )
        embedded = CounterMetricFamily(
            "llmis:embedding_rows",
            "Inputs embedded (since the model loaded).",
            labels=_MODEL,
        )
        embed_decodes = CounterMetricFamily(
            "llmis:embedding_decodes",
            "llama_decode calls of embedding batches, each holding rows of one or more requests.",
            labels=_MODEL,
        )
        loaded = 0
        for entry in self.manager.entries():
            worker = entry.worker
            if worker is not None:
                loaded += 1
                running.add_metric([entry.name], worker.running)
                waiting.add_metric([entry.name], worker.queued)
                cached.add_metric([entry.name], worker.cached_tokens_total)
                slots = worker.slot_stats()
                kv_tokens.add_metric([entry.name], sum(s.kv_tokens for s in slots))
                busy_slots.add_metric([entry.name], sum(s.job_id is not None for s in slots))
                embedder = getattr(worker, "embedder", None)
                if embedder is not None:
                    embedded.add_metric([entry.name], embedder.rows_total)
                    embed_decodes.add_metric([entry.name], embedder.decodes_total)
            for kind in ("predicted", "measured"):
                value = getattr(entry, f"{kind}_bytes", None)
                if isinstance(value, int):
                    memory.add_metric([entry.name, kind], value)
        yield running
        yield waiting
        yield memory
        yield cached
        yield kv_tokens
        yield busy_slots
        yield embedded
        yield embed_decodes
        yield GaugeMetricFamily("llmis:models_loaded", "Models loaded now.", value=loaded)
        evictions = getattr(self.manager, "evictions", None)
        if isinstance(evictions, Mapping):
            family = CounterMetricFamily(
                "llmis:model_evictions", "Models evicted to make room.", labels=_MODEL
            )
            for name, count in evictions.items():
                family.add_metric([str(name)], count)
            yield family


class Metrics:
    """Every llmis metric, registered in a registry of its own."""

    def __init__(self, manager: ModelManager | None = None) -> None:
        self.registry = reg = CollectorRegistry()

        def counter(name: str, doc: str, labels: Sequence[str] = _MODEL) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, _MODEL, buckets=buckets, registry=reg)

        self.requests = counter(
            "llmis:requests",
            "HTTP requests by route, model, status and API family (openai, ollama, anthropic).",
            ["endpoint", "model_name", "status", "api"],
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "vllm:request_success",
            "Generations that finished, by finish reason.",
            ["model_name", "finished_reason"],
        )
        self.llamacpp_prompt_tokens = counter("llamacpp:prompt_tokens", "Prompt tokens processed.")
        self.llamacpp_prompt_seconds = counter("llamacpp:prompt_seconds", "Prompt evaluation time.")
        self.llamacpp_predicted_tokens = counter("llamacpp:tokens_predicted", "Tokens generated.")
        self.llamacpp_predicted_seconds = counter(
            "llamacpp:tokens_predicted_seconds", "Token generation time."
        )
        self.cancellations = counter(
            "llmis:request_cancellations",
            "Generations stopped early, by reason (client, timeout, shutdown, content_filter).",
            ["model_name", "reason"],
        )
        self.rate_limited = counter(
            "llmis:rate_limited_requests",
            "Requests refused with 429 by a rate limit, by limit (requests, tokens).",
            ["limit"],
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "From request arrival to the first generated text.",
            _LATENCY_BUCKETS,
        )
        self.inter_token = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive pieces of streamed text.",
            _TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "From request arrival to the end of its generation.",
            _LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Time a generation waited in its model's queue.",
            _LATENCY_BUCKETS,
        )
        ProcessCollector(registry=reg)  # process_resident_memory_bytes and friends
        if manager is not None:
            reg.register(_ManagerCollector(manager))

    def count_request(
        self, endpoint: str, model: str | None, status: int, api: str = "openai"
    ) -> None:
        self.requests.labels(endpoint, model or "", str(status), api).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handler(self, request: web.Request) -> web.Response:
        """``GET /metrics`` in the Prometheus text format."""
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
