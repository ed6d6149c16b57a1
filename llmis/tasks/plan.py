"""A chat request addressed to a preset, turned into an ordinary generation plus task fields.

:func:`plan_chat` reads the raw request body: when its ``model`` names a preset (see
:mod:`llmis.tasks.presets`), the preset's system prompt goes first, its sampling values fill the
fields the request left out, and its task shapes the request:

* ``summarize``: ``length`` (tokens, default 128) becomes ``max_tokens``, so the summary never
  exceeds it (a smaller ``max_tokens`` in the request wins);
* ``classify``: ``labels`` (and ``multi_label``) become a llama.cpp grammar, so the output is
  exactly one label (or a JSON list of labels); afterwards each label's token sequence is
  scored on the model's logits after the same prompt, and the softmax over those scores is
  reported as the label probabilities;
* ``answer``: the last user message is searched in an index (``index``, ``rows``) with
  ``/v1/search``'s code; the rows go into the system prompt with their ids, and a grammar makes
  the answer start with the ids it cites, in brackets (``[bread-baking] ...``);
* ``extract``: the output follows the JSON ``schema`` (a grammar), and is parsed.

Responses carry the task's results in a ``task`` object (on the last stream event, and what is
known before generating, such as the retrieved rows, on the first).

:func:`plan_task` is the planning itself, on an OpenAI chat body: chat and the WebSocket reach
it through :func:`plan_chat`, ``/v1/completions`` through :func:`plan_completion` (the prompt
is the user message), Ollama and Anthropic with the chat body their request translates to and
the task fields from where that API carries them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from llmis.config import PresetSettings
from llmis.errors import BadRequestError
from llmis.index.search import IndexCache, search_index
from llmis.models.manager import ModelManager
from llmis.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LenientModel,
    ResponseFormat,
)
from llmis.tasks.presets import Presets

__all__ = [
    "MAX_LABELS",
    "TASK_FIELDS",
    "TaskPlan",
    "TaskServices",
    "plan_chat",
    "plan_completion",
    "plan_task",
]

MAX_LABELS = 64
MAX_LABEL_CHARS = 100
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
_CITE = re.compile(r"\[([^\[\]\n]{1,200})\]")

Finish = Callable[[str], Awaitable[dict[str, Any]]]


class TaskOptions(LenientModel):
    """The task fields a request may send next to OpenAI's (null = the preset's)."""

    labels: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LABELS)
    multi_label: bool | None = None
    length: int | None = Field(default=None, ge=1, le=1_048_576)
    index: str | None = Field(default=None, min_length=1)
    rows: int | None = Field(default=None, ge=1, le=20)
    output_schema: dict[str, Any] | None = Field(default=None, alias="schema")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for label in value:
            if not label.strip() or len(label) > MAX_LABEL_CHARS or "\n" in label:
                raise ValueError(
                    f"each label must be 1 to {MAX_LABEL_CHARS} characters on one line"
                )
        if len(set(value)) != len(value):
            raise ValueError("labels must be different from each other")
        return value


# the task fields' names as a client sends them (outside OpenAI's own fields)
TASK_FIELDS = tuple(f.alias or name for name, f in TaskOptions.model_fields.items())


@dataclass
class TaskPlan:
    """What a preset adds to a chat request's response."""

    preset: PresetSettings
    model_id: str  # the id the response reports: "preset@model"
    fields: dict[str, Any] = field(default_factory=dict)  # known before generating
    finish: Finish | None = None  # more fields from the generated text

    def first(self) -> dict[str, Any]:
        return {"task": {"preset": self.preset.name, **self.fields}}

    async def result(self, text: str) -> dict[str, Any]:
        extra = await self.finish(text) if self.finish is not None else {}
        return {"task": {"preset": self.preset.name, **self.fields, **extra}}


def _gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a GBNF string literal escapes as JSON does


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise BadRequestError("the preset needs a user message", param="messages")


@dataclass(frozen=True)
class TaskServices:
    """What the presets work with: the models, the presets, and the search indexes."""

    manager: ModelManager
    presets: Presets
    indexes: IndexCache


async def plan_chat(
    services: TaskServices, body: Any
) -> tuple[ChatCompletionRequest, TaskPlan | None]:
    """Validate a chat body; when its model is a preset, rewrite it and plan the task."""
    request = ChatCompletionRequest.model_validate(body)  # the fields, as for any model
    planned = await plan_task(services, body)
    return planned if planned is not None else (request, None)


async def plan_task(
    services: TaskServices, body: dict[str, Any], fields: Mapping[str, Any] | None = None
) -> tuple[ChatCompletionRequest, TaskPlan] | None:
    """When the ``model`` of ``body`` (an OpenAI chat body, already valid as one) names a
    preset: the rewritten request and its task; None for a real model. The task fields
    (``labels``, ``length``...) are read from ``fields`` (default: ``body`` itself), so that
    every API family can carry them where it likes (see :func:`plan_completion`,
    :mod:`llmis.api.ollama`, :mod:`llmis.api.anthropic`)."""
    manager = services.manager
    found = services.presets.lookup(body["model"], manager)
    if found is None:
        return None
    preset, model = found
    options = TaskOptions.model_validate(body if fields is None else fields)
    data: dict[str, Any] = {**body, "model": model}
    for key in _SAMPLING:
        value = getattr(preset, key)
        if data.get(key) is None and value is not None:
            data[key] = value
    if data.get("stop") is None and preset.stop:
        data["stop"] = list(preset.stop)
    plan = TaskPlan(preset, f"{preset.name}@{model}")
    system = preset.system
    schema = options.output_schema or preset.output_schema
    if preset.task == "summarize":
        length = options.length or preset.length or 128
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        limit = min(length, asked) if isinstance(asked, int) else length
        data["max_tokens"], data["max_completion_tokens"] = limit, None
        words = max(5, length * 3 // 4)
        system = system or (
            f"Summarize the user's text in at most {words} words. "
            "Reply with the summary only, no preamble."
        )
        plan.fields["length"] = length
    elif preset.task == "classify":
        system, finish = _classify(manager, data, preset, options, system)
        plan.finish = finish
        plan.fields["labels"] = list(options.labels or preset.labels)
        plan.fields["multi_label"] = bool(
            preset.multi_label if options.multi_label is None else options.multi_label
        )
    elif preset.task == "answer":
        system = await _answer(services, data, preset, options, system, plan)
    elif preset.task == "extract":
        if schema is None:
            raise BadRequestError(
                "the extract preset needs a JSON 'schema' of the fields to extract",
                param="schema",
                code="missing_required_parameter",
            )
        system = system or (
            "Extract the information the JSON schema below describes from the user's text. "
            "Reply with JSON only; use null for what the text does not say.\n\nSchema: "
            + json.dumps(schema)
        )
        plan.finish = _parse_json("extracted")
    if schema is not None and preset.task in ("chat", "extract"):
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": preset.name, "schema": schema},
        }
        if preset.task == "chat":
            plan.finish = _parse_json("parsed")
    if system:
        data["messages"] = [{"role": "system", "content": system}, *(body.get("messages") or [])]
    request = ChatCompletionRequest.model_validate(data)
    if isinstance(data.get("_grammar"), str):
        request.response_format = ResponseFormat.from_grammar(data["_grammar"])
    return request, plan


async def plan_completion(
    services: TaskServices, request: CompletionRequest, body: dict[str, Any]
) -> tuple[ChatCompletionRequest, TaskPlan] | None:
    """A ``/v1/completions`` request (``body``, valid as ``request``) addressed to a preset:
    its ``prompt`` (one string) is the user message of a chat request, which
    :func:`plan_task` plans as it plans chat (the preset's system prompt, sampling values and
    task; rendered with the model's chat template). ``logprobs: n`` asks the chat request
    for ``top_logprobs: n``. None for a real model."""
    if services.presets.lookup(request.model, services.manager) is None:
        return None
    prompts = request.prompts()
    if len(prompts) != 1 or not isinstance(prompts[0], str):
        raise BadRequestError(
            "prompt: a preset takes one prompt string, the text it works on",
            param="prompt",
            code="invalid_value",
        )
    chat = {k: v for k, v in body.items() if k not in ("prompt", "logprobs")}
    chat["messages"] = [{"role": "user", "content": prompts[0]}]
    if request.logprobs is not None:
        chat.update(logprobs=True, top_logprobs=request.logprobs)
    return await plan_task(services, chat)


def _parse_json(key: str) -> Finish:
    async def finish(text: str) -> dict[str, Any]:
        try:
            return {key: json.loads(text)}
        except ValueError:
            return {key: None}  # cut short by max_tokens

    return finish


def _classify(
    manager: ModelManager,
    data: dict[str, Any],
    preset: PresetSettings,
    options: TaskOptions,
    system: str | None,
) -> tuple[str, Finish]:
    labels = list(options.labels or preset.labels)
    if not labels:
        raise BadRequestError(
            "the classify preset needs 'labels': a list of the labels to choose from",
            param="labels",
            code="missing_required_parameter",
        )
    multi = preset.multi_label if options.multi_label is None else options.multi_label
    listed = ", ".join(labels)
    if multi:
        item = " | ".join(_gbnf_literal(json.dumps(label)) for label in labels)
        data["_grammar"] = f'root ::= "[" item ("," " "? item)* "]"\nitem ::= {item}\n'
        default = (
            f"Classify the user's text. Reply with a JSON list of every label that applies, "
            f"chosen from: {listed}."
        )
    else:
        data["_grammar"] = "root ::= " + " | ".join(_gbnf_literal(label) for label in labels)
        default = f"Classify the user's text. Reply with exactly one of these labels: {listed}."
    data["response_format"] = None
    if data.get("max_tokens") is None:
        data["max_tokens"] = 8 + sum(len(label) + 4 for label in labels)
    model = data["model"]
    system_text = system or default
    asked = [m for m in data.get("messages") or [] if isinstance(m, dict)]

    async def finish(text: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": system_text}, *asked]
        template = ChatCompletionRequest.model_validate({"model": model, "messages": messages})
        rendered = [m.as_template_message() for m in template.messages]
        async with manager.lease(model) as worker:

            def score(engine: Any) -> list[float]:
                prompt = engine.chat_prompt(rendered)
                tokens = [engine.tokenize(label, add_bos=False, special=False) for label in labels]
                return engine.score_continuations(prompt, tokens)  # type: ignore[no-any-return]

            scores = await worker.call(score)
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        probabilities = {label: w / total for label, w in zip(labels, weights, strict=True)}
        out: dict[str, Any] = {"probabilities": probabilities}
        if multi:
            try:
                chosen = json.loads(text)
            except ValueError:
                chosen = None
            out["chosen"] = list(dict.fromkeys(chosen)) if isinstance(chosen, list) else None
        else:
            out["label"] = text if text in labels else None
        return out

    return system_text, finish


async def _answer(
    services: TaskServices,
    data: dict[str, Any],
    preset: PresetSettings,
    options: TaskOptions,
    system: str | None,
    plan: TaskPlan,
) -> str:
    cache = services.indexes
    name = options.index or preset.index
    if name is None:
        manifests = await asyncio.get_running_loop().run_in_executor(None, cache.manifests)
        names = [m.name for m in manifests]
        if len(names) == 1 or "topics" in names:
            name = names[0] if len(names) == 1 else "topics"
        else:
            raise BadRequestError(
                "the answer preset needs an 'index' (GET /v1/indexes lists them)",
                param="index",
                code="missing_required_parameter",
            )
    question = _last_user_text(data)
    rows = options.rows or preset.rows
    _, _, hits = await search_index(services.manager, cache, name, question, rows)
    if not hits:
        raise BadRequestError(f"the index '{name}' has no rows", param="index")
    ids = [hit.row.id for hit in hits]
    plan.fields["index"] = name
    plan.fields["retrieved"] = [hit.as_dict() for hit in hits]
    cite = " | ".join(_gbnf_literal(f"[{i}]") for i in ids)
    data["_grammar"] = f'root ::= cite cite? cite? " " text\ncite ::= {cite}\ntext ::= [^\\x00]*\n'
    data["response_format"] = None
    sources = "\n".join(f"[{hit.row.id}] {hit.row.text}" for hit in hits)

    async def finish(text: str) -> dict[str, Any]:
        cited: list[str] = []
        rest = text
        while True:
            match = _CITE.match(rest)
            if match is None or match.group(1) not in ids:
                break
            if match.group(1) not in cited:
                cited.append(match.group(1))
            rest = rest[match.end() :]
        return {"citations": cited}

    plan.finish = finish
    return system or (
        "Answer the user's question using the sources below. Start the answer with the ids "
        "of the sources you used, in square brackets, then answer in one or two sentences.\n\n"
        f"Sources:\n{sources}"
    )
