"""Typed keys for the objects an application shares between handlers (no module globals)."""

from __future__ import annotations

from aiohttp import web

from llmis.config import Settings
from llmis.index.search import IndexCache
from llmis.models.manager import ModelManager
from llmis.ops.policy import Oversight

__all__ = ["INDEXES", "MANAGER", "OVERSIGHT", "SETTINGS"]

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", ModelManager)
OVERSIGHT = web.AppKey("oversight", Oversight)
INDEXES = web.AppKey("indexes", IndexCache)
