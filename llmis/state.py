"""Typed keys for the objects an application shares between handlers (no module globals)."""

from __future__ import annotations

from aiohttp import web

from llmis.config import Settings
from llmis.models import ModelManager
from llmis.oversight import Oversight
from llmis.search import IndexCache

__all__ = ["INDEXES", "MANAGER", "OVERSIGHT", "SETTINGS"]

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", ModelManager)
OVERSIGHT = web.AppKey("oversight", Oversight)
INDEXES = web.AppKey("indexes", IndexCache)
