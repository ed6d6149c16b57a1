"""Typed keys for the objects an application shares between handlers (no module globals)."""

from __future__ import annotations

from aiohttp import web

from llmis.config import Settings
from llmis.index.search import IndexCache
from llmis.models.manager import ModelManager
from llmis.ops.policy import Oversight
from llmis.tasks.plan import TaskServices
from llmis.tasks.presets import Presets

__all__ = ["INDEXES", "MANAGER", "OVERSIGHT", "PRESETS", "SETTINGS", "task_services"]

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", ModelManager)
OVERSIGHT = web.AppKey("oversight", Oversight)
INDEXES = web.AppKey("indexes", IndexCache)
PRESETS = web.AppKey("presets", Presets)


def task_services(app: web.Application) -> TaskServices:
    """What the task presets use, from ``app``."""
    return TaskServices(app[MANAGER], app[PRESETS], app[INDEXES])
