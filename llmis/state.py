"""Typed keys for the objects an application shares between handlers (no module globals)."""

from __future__ import annotations

from aiohttp import web

from llmis.config import Settings
from llmis.models import ModelManager

__all__ = ["MANAGER", "SETTINGS"]

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", ModelManager)
