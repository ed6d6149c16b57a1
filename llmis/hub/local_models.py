"""``llmis models``: the local models, their GGUF metadata, and whether a server has them loaded.

Local models are the ones ``llmis serve`` would serve with the same config: each ``[[models]]``
entry of the config under its name, and each ``<models_dir>/*.gguf`` under its file stem (a
split model once, through its first part, with the size of all its parts). The "loaded"
column comes from ``GET /v1/models`` of the server at the config's host and port (or
``--url``) when one answers; otherwise it is unknown.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from dataclasses import replace as _replace
from pathlib import Path

from llmis.config import ModelSettings, Settings
from llmis.errors import ModelFileError
from llmis.models.files import safe_model_path
from llmis.models.gguf import GGUFInfoCache
from llmis.models.splits import is_continuation_part, split_part_paths

__all__ = ["LocalModel", "add_arguments", "fetch_states", "local_models", "run"]


@dataclass(frozen=True)
class LocalModel:
    name: str
    file: str | None
    path: str | None
    source: str  # "config" or "models_dir"
    size_bytes: int | None
    parts: int
    architecture: str | None = None
    parameters: int | None = None
    quant: str | None = None
    context_length: int | None = None
    has_chat_template: bool | None = None
    state: str | None = None  # as the server reports it; None when no server answered
    loaded: bool | None = None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--url",
        help="server to ask which models are loaded (default: the config's host and port)",
    )


def _resource_path(resource: str, models_dir: Path) -> Path:
    """The file of a package resource, without assembling anything (unlike ``serve``)."""
    dist_name, _, inner = resource.partition(":")
    assembled = models_dir / ".assembled" / Path(inner).name
    if assembled.is_file():
        return assembled
    try:
        files = importlib.metadata.distribution(dist_name).files or ()
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"package {dist_name!r} is not installed") from None
    for file in files:
        if str(file) == inner or str(file).endswith("/" + inner):
            return Path(str(file.locate()))
    raise ModelFileError(f"not assembled yet ({dist_name} builds it on first serve)")


def _config_path(model: ModelSettings, models_dir: Path) -> Path:
    if model.resource is not None:
        return _resource_path(model.resource, models_dir)
    if model.path is None:
        raise ModelFileError("names no file")
    return safe_model_path(model.path, models_dir)


def _describe(name: str, source: str, path: Path, cache: GGUFInfoCache) -> LocalModel:
    parts = split_part_paths(path)
    present = [p for p in parts if p.is_file()]
    size = sum(p.stat().st_size for p in present)
    base = LocalModel(name, path.name, str(path.resolve()), source, size, len(parts))
    if len(present) < len(parts):
        return _replace(base, error=f"split model has {len(present)} of {len(parts)} parts")
    try:
        info = cache.get(path)
    except ModelFileError as exc:
        return _replace(base, error=exc.message)
    return _replace(
        base,
        architecture=info.architecture,
        parameters=info.parameters,
        quant=info.quant,
        context_length=info.context_length,
        has_chat_template=info.has_chat_template,
    )


def local_models(settings: Settings) -> list[LocalModel]:
    """Every model ``llmis serve`` would offer with ``settings``, config entries first."""
    models_dir = settings.server.models_dir
    rows: list[LocalModel] = []
    cache = GGUFInfoCache()  # config entries often share a file
    for model in settings.models:
        try:
            path = _config_path(model, models_dir)
        except ModelFileError as exc:
            rows.append(LocalModel(model.name, None, None, "config", None, 0, error=exc.message))
            continue
        rows.append(_describe(model.name, "config", path, cache))
    names = {row.name for row in rows}
    if models_dir.is_dir():
        for path in sorted(models_dir.glob("*.gguf")):
            if path.stem in names or is_continuation_part(path) or not path.is_file():
                continue
            rows.append(_describe(path.stem, "models_dir", path, cache))
    return rows


def fetch_states(url: str, timeout: float = 2.0) -> dict[str, str | None] | None:
    """Model name -> state from ``GET {url}/v1/models``; None when no llmis server answers."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):  # URLError, refused, timeout, not JSON
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return {
        str(item["id"]): (str(item["state"]) if "state" in item else None)
        for item in data
        if isinstance(item, dict) and "id" in item
    }


def _with_states(rows: list[LocalModel], states: dict[str, str | None] | None) -> list[LocalModel]:
    if states is None:
        return rows
    out = []
    for row in rows:
        if row.name not in states:
            out.append(_replace(row, state="not served", loaded=False))
            continue
        state = states[row.name]
        out.append(_replace(row, state=state, loaded=None if state is None else state == "loaded"))
    return out


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _human_count(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(count)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def format_table(rows: list[LocalModel]) -> str:
    header = ("NAME", "FILE", "SIZE", "ARCH", "PARAMS", "QUANT", "CTX", "CHAT", "LOADED")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        file = row.file or "-"
        if row.parts > 1:
            file += f" (+{row.parts - 1} parts)"
        loaded = _yes_no(row.loaded)
        if row.loaded is False and row.state not in (None, "available"):
            loaded = f"no ({row.state})"
        lines.append(
            (
                row.name,
                file,
                _human_bytes(row.size_bytes),
                row.architecture or "-",
                _human_count(row.parameters),
                row.quant or "-",
                str(row.context_length) if row.context_length is not None else "-",
                _yes_no(row.has_chat_template),
                loaded,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    text.extend(f"{row.name}: error: {row.error}" for row in rows if row.error)
    return "\n".join(text)


def _server_url(settings: Settings, url: str | None) -> str:
    if url:
        return url
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}"


def run(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    url = _server_url(settings, args.url)
    states = fetch_states(url)
    rows = _with_states(local_models(settings), states)
    try:
        _print(settings, url, rows, states, as_json=args.json)
    except BrokenPipeError:  # `llmis models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print(
    settings: Settings,
    url: str,
    rows: list[LocalModel],
    states: dict[str, str | None] | None,
    *,
    as_json: bool,
) -> None:
    if as_json:
        body = {
            "models_dir": str(settings.server.models_dir),
            "server": {"url": url, "reachable": states is not None},
            "models": [asdict(row) for row in rows],
        }
        print(json.dumps(body, indent=2))
        return
    if not rows:
        print(f"no models in {settings.server.models_dir} or the config", file=sys.stderr)
    else:
        print(format_table(rows))
    if states is None:
        print(f"(no llmis server answered at {url}: LOADED unknown)", file=sys.stderr)
