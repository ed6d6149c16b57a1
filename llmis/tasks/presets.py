"""Task presets: named system prompts, sampling defaults and tasks, addressable as model ids.

A preset comes from ``[[presets]]`` in the config or is built in (``summarize``,
``classify``, ``answer``, ``extract``; a config preset of the same name replaces the built-in
one). A request names it as its ``model``: ``"summarize"`` runs on the preset's ``model`` (or
the server's first chat model), ``"summarize@gemma3-270m"`` on that model. A real model or
alias of the same name always wins. :mod:`llmis.tasks.plan` turns such a request into a generation.
"""

from __future__ import annotations

from typing import Any

from llmis.config import PresetSettings, Settings
from llmis.errors import BadRequestError, ModelNotFoundError
from llmis.models.entry import ModelEntry
from llmis.models.manager import ModelManager

__all__ = ["BUILTIN_PRESETS", "Presets"]

BUILTIN_PRESETS = (
    PresetSettings(
        name="summarize",
        task="summarize",
        description="Summarize the text; 'length' caps the summary in tokens (default 128).",
        temperature=0.3,
        length=128,
    ),
    PresetSettings(
        name="classify",
        task="classify",
        description="Pick one of 'labels' (or several with 'multi_label'); gives each "
        "label's probability.",
        temperature=0.0,
    ),
    PresetSettings(
        name="answer",
        task="answer",
        description="Answer from the rows of an 'index' (llmis index), citing their ids.",
        temperature=0.2,
    ),
    PresetSettings(
        name="extract",
        task="extract",
        description="Extract the fields of a JSON 'schema' from the text.",
        temperature=0.0,
    ),
)


class Presets:
    """The presets of one server, by name."""

    def __init__(self, settings: Settings) -> None:
        self.by_name: dict[str, PresetSettings] = {p.name: p for p in BUILTIN_PRESETS}
        self.by_name.update({p.name: p for p in settings.presets})

    def lookup(self, model_id: str, manager: ModelManager) -> tuple[PresetSettings, str] | None:
        """``(preset, model)`` when ``model_id`` names a preset, None for a real model; a
        name that is neither is a 404."""
        try:
            manager.entry(model_id)
            return None
        except ModelNotFoundError:
            base, at, model = model_id.partition("@")
            preset = self.by_name.get(base)
            if preset is None:
                raise
        if at and not model:
            raise BadRequestError(
                f"'{model_id}': name a model after the '@'", param="model", code="invalid_value"
            )
        return preset, model or preset.model or default_model(manager)

    def openai_objects(self, manager: ModelManager) -> list[dict[str, Any]]:
        """Each preset as a model object (``"preset": true``) for ``GET /v1/models``."""
        try:
            default: str | None = default_model(manager)
        except BadRequestError:
            default = None
        return [
            {
                "id": p.name,
                "object": "model",
                "created": 0,
                "owned_by": "llmis",
                "preset": True,
                "task": p.task,
                "description": p.description,
                "model": p.model or default,
            }
            for p in self.by_name.values()
        ]


def _chat_model(entry: ModelEntry) -> bool:
    return not entry.embedding_only


def default_model(manager: ModelManager) -> str:
    """The model a preset without one runs on: the first configured chat model."""
    entries = sorted(manager.entries(), key=lambda e: e.source != "config")
    for entry in entries:
        if _chat_model(entry):
            return entry.name
    raise BadRequestError(
        "this server has no chat model for the preset; name one as 'preset@model'",
        param="model",
        code="model_not_found",
    )
