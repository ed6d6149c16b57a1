"""The model catalog: every configured model, then every ``<models_dir>/*.gguf`` under its
file stem (configured names win), and the aliases.

A name ``base@version`` is a version; an alias (``[aliases]`` in the config, or implicitly
``base`` -> the first version in catalog order) points at one version and is repointed
atomically by :meth:`llmis.models.manager.ModelManager.swap`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from llmis.config import ModelSettings, Settings
from llmis.errors import ModelNotFoundError
from llmis.models.entry import ModelEntry, ModelState
from llmis.models.splits import is_continuation_part

__all__ = ["Catalog", "valid_model_name"]

logger = logging.getLogger(__name__)

_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


def valid_model_name(name: str) -> bool:
    """A name a model file may be served under (its stem)."""
    return _STEM.fullmatch(name) is not None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS refuses (too long: ENAMETOOLONG)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


class Catalog:
    """The entries by name and the aliases; runs on the event loop (:meth:`list_dir` aside)."""

    def __init__(self, settings: Settings) -> None:
        self.models_dir = settings.server.models_dir
        self.by_name: dict[str, ModelEntry] = {m.name: ModelEntry(m) for m in settings.models}
        self.alias_map: dict[str, str] = dict(settings.aliases)
        self.add_dir_entries(self.list_dir())

    def entries(self) -> list[ModelEntry]:
        return list(self.by_name.values())

    def aliases(self) -> dict[str, str]:
        """Alias -> the model name it points at now."""
        return dict(self.alias_map)

    def openai_objects(self) -> list[dict[str, Any]]:
        """Every entry, then every alias whose target exists, as OpenAI model objects."""
        data = [e.openai_object() for e in self.by_name.values()]
        for alias, target in self.alias_map.items():
            if target in self.by_name:
                data.append(self.by_name[target].openai_object(alias))
        return data

    def resolve(self, name: str) -> str:
        return self.alias_map.get(name, name)

    def entry(self, name: str) -> ModelEntry:
        """The entry for ``name`` (an alias resolves to its current version).

        A name not in the catalog is looked up as ``<models_dir>/<name>.gguf`` once more, so a
        file dropped in since the last scan is found.
        """
        target = self.resolve(name)
        entry = self.by_name.get(target)
        dropped = self.models_dir / f"{target}.gguf"
        if (
            entry is None
            and _STEM.fullmatch(target)
            and _is_file(dropped)
            and not is_continuation_part(dropped)  # parts 2..N load through part 1
        ):
            self.add_dir_entries([dropped])
            entry = self.by_name.get(self.resolve(name))
        if entry is None:
            raise ModelNotFoundError(name)
        return entry

    def list_dir(self) -> list[Path]:
        """The model files in the models dir (first parts only); blocking."""
        try:
            found = self.models_dir.glob("*.gguf")
            return sorted(p for p in found if p.is_file() and not is_continuation_part(p))
        except OSError:
            return []

    def add_dir_entries(self, paths: list[Path]) -> None:
        for path in paths:
            name = path.stem
            if name in self.by_name or name in self.alias_map:
                continue
            if not _STEM.fullmatch(name):
                logger.warning("ignoring %s: its name is not a valid model name", path.name)
                continue
            model = ModelSettings(name=name, path=Path(path.name))
            self.by_name[name] = ModelEntry(model, source="models_dir")
        for name in self.by_name:
            base, at, _ = name.partition("@")
            if at and base and base not in self.by_name and base not in self.alias_map:
                self.alias_map[base] = name

    def forget_missing(self, found: list[Path]) -> None:
        """Drop models-dir entries whose file is gone (unless loading or loaded)."""
        names = {p.stem for p in found}
        for entry in list(self.by_name.values()):
            if (
                entry.source == "models_dir"
                and entry.name not in names
                and entry.state in (ModelState.AVAILABLE, ModelState.FAILED)
            ):
                del self.by_name[entry.name]
