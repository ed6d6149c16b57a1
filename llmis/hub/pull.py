"""``llmis pull SOURCE``: bring a GGUF model into the models dir, where ``llmis serve`` finds it.

SOURCE is one of:

- ``owner/repo[:QUANT|:FILE]`` on the Hugging Face hub (see :mod:`llmis.hub.client`);
- a local ``.gguf`` path;
- a package resource ``dist-name:path/in/dist.gguf`` (the bundled SmolLM2, say).

The model lands as ``<models_dir>/<file name>.gguf`` and is served under its file stem. A
split model lands as all its parts side by side under their original names; llama.cpp loads
it from the first part (``...-00001-of-0000N.gguf``), which names it. Nothing reaches the
models dir before it is complete and checked (sha256 when the hub publishes one, then a GGUF
header read); a file that fails is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llmis.config import Settings
from llmis.errors import ModelFileError
from llmis.models.files import resolve_resource
from llmis.models.gguf import GGUFInfo, read_gguf_info
from llmis.models.splits import parse_split_name, split_part_paths

__all__ = ["PullError", "add_arguments", "pull_remote", "run"]

PARTIAL_DIR = ".partial"


class PullError(Exception):
    """A pull that cannot complete; the message is for the user."""


@dataclass(frozen=True)
class _Staged:
    """A complete file waiting in the staging area, and where it goes."""

    staged: Path
    target: Path
    owned: bool  # the staged file is ours to move (not the user's source file)


@dataclass(frozen=True)
class _Pulled:
    paths: list[Path]  # in the models dir; the first names the model
    info: GGUFInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="owner/repo[:QUANT|:FILE] on the Hugging Face hub, a local .gguf path, "
        "or a package resource 'dist-name:path/in/dist.gguf'",
    )
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument(
        "--force", action="store_true", help="replace a different file of the same name"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _is_hub_repo(text: str) -> bool:
    repo = text.partition(":")[0]
    owner, slash, name = repo.partition("/")
    return bool(slash and owner and name and "/" not in name and not repo.startswith("."))


def _check_target(staged: Path, target: Path, force: bool) -> bool:
    """True if ``target`` already holds these bytes; raise if it holds others."""
    if not target.exists():
        return False
    if filecmp.cmp(staged, target, shallow=False):
        return True
    if force:
        return False
    raise PullError(f"{target} exists and differs; pass --force to replace it")


def _same_as_published(target: Path, size: int | None, sha256: str | None) -> bool:
    """True if ``target`` holds the file the hub publishes (checked by sha256)."""
    if sha256 is None or not target.is_file() or target.stat().st_size != size:
        return False
    from llmis.hub.client import file_sha256

    return file_sha256(target) == sha256


def _verify_gguf(path: Path, shown: str) -> GGUFInfo:
    try:
        return read_gguf_info(path)
    except ModelFileError as exc:
        raise PullError(f"{shown}: {exc.message}") from None


def _place(files: list[_Staged], force: bool) -> list[Path]:
    """Move (or copy) every staged file to its target, all checked first."""
    same = [_check_target(f.staged, f.target, force) for f in files]
    for item, unchanged in zip(files, same, strict=True):
        if unchanged:
            if item.owned:
                item.staged.unlink()
            continue
        item.target.parent.mkdir(parents=True, exist_ok=True)
        if item.owned:
            os.replace(item.staged, item.target)
        else:
            tmp = item.target.with_name(item.target.name + ".copying")
            try:
                shutil.copyfile(item.staged, tmp)
                os.replace(tmp, item.target)
            finally:
                tmp.unlink(missing_ok=True)
    return [f.target for f in files]


def _pull_local(source: Path, models_dir: Path, force: bool) -> _Pulled:
    split = parse_split_name(source.name)
    if split is not None and split.index != 1:
        source = source.with_name(split.part_name(1))
    parts = split_part_paths(source)
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise PullError(f"{source}: missing split parts: {', '.join(missing)}")
    info = _verify_gguf(parts[0], str(parts[0]))
    if parts[0].resolve().parent == models_dir.resolve():
        return _Pulled(parts, info)  # already in the models dir
    staged = [_Staged(p, models_dir / p.name, owned=False) for p in parts]
    return _Pulled(_place(staged, force), info)


def _pull_hub(args: argparse.Namespace, models_dir: Path) -> _Pulled:
    from llmis.hub import client as hub

    repo_id, _, selector = str(args.source).partition(":")
    downloading = False
    try:
        listing = hub.list_repo(repo_id, args.revision)
        chosen = hub.choose(listing, selector or None)
        where = f"{repo_id}@{listing.commit[:12]}"
        size = f"{chosen.size / 1e6:.1f} MB" if chosen.size is not None else "size unknown"
        print(f"pulling {chosen.label} from {where} ({size})", file=sys.stderr)
        staged: list[_Staged] = []
        downloading = True
        for part in chosen.parts:
            target = models_dir / part.name
            if not args.force and _same_as_published(target, part.size, part.sha256):
                print(f"{part.name}: already in {models_dir}, sha256 ok", file=sys.stderr)
                continue
            done = hub.download(listing, part, models_dir / PARTIAL_DIR, quiet=args.quiet)
            check = "sha256 ok" if done.checked else "no sha256 published by the hub"
            print(f"{part.name}: {check} ({done.sha256})", file=sys.stderr)
            staged.append(_Staged(done.path, models_dir / part.name, owned=True))
    except hub.HubError as exc:
        raise PullError(str(exc)) from None
    except Exception as exc:
        message = hub.hub_error_message(exc, repo_id, args.revision)
        if message is None:
            raise
        if downloading:
            message += "; the partial download is kept: run the same command again to resume"
        raise PullError(message) from None
    first = models_dir / chosen.parts[0].name
    checked = staged[0].staged if staged and staged[0].target == first else first
    try:
        info = _verify_gguf(checked, first.name)
    except PullError:
        for item in staged:
            item.staged.unlink(missing_ok=True)
        raise
    _place(staged, args.force)
    return _Pulled([models_dir / part.name for part in chosen.parts], info)


def _pull(args: argparse.Namespace, settings: Settings) -> _Pulled:
    models_dir = settings.server.models_dir
    source = str(args.source)
    local = Path(source).expanduser()
    if local.is_file():
        return _pull_local(local, models_dir, args.force)
    if _is_hub_repo(source):
        return _pull_hub(args, models_dir)
    if ":" in source and "/" not in source.partition(":")[0]:
        try:
            path = resolve_resource(source, models_dir)
        except ModelFileError as exc:
            raise PullError(exc.message) from None
        return _pull_local(path, models_dir, args.force)
    if source.lower().endswith(".gguf") and ":" not in source:
        raise PullError(f"no such file: {source}")
    raise PullError(
        f"{source!r} is not a file, a hub repository (owner/repo[:QUANT]) "
        f"or a package resource (dist-name:path/in/dist.gguf)"
    )


def pull_remote(source: str, settings: Settings) -> tuple[list[Path], GGUFInfo]:
    """Pull a hub repository or a package resource (never a local path: this is what a
    network client may ask for, ``POST /api/pull``). Blocking; raises :class:`PullError`."""
    local = source.lower().endswith(".gguf") and ":" not in source
    with contextlib.suppress(OSError, ValueError):  # a name the OS refuses is no file
        local = local or Path(source).expanduser().is_file()
    if local:
        raise PullError(f"{source!r}: local files cannot be pulled over the API")
    args = argparse.Namespace(source=source, revision=None, force=False, quiet=True)
    try:
        pulled = _pull(args, settings)
    except OSError as exc:
        raise PullError(f"{source}: {exc.strerror or exc}") from None
    return pulled.paths, pulled.info


def run(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    try:
        pulled = _pull(args, settings)
    except PullError as exc:
        print(f"llmis pull: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "llmis pull: interrupted; the partial download is kept, run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:
        print(f"llmis pull: error: {exc}", file=sys.stderr)
        return 1
    first, info = pulled.paths[0], pulled.info
    count = len(pulled.paths)
    parts = f" (+{count - 1} more parts)" if count > 1 else ""
    print(
        f"{first}{parts}: {info.architecture}, {info.parameters / 1e6:.0f}M parameters, "
        f"{info.quant}; served as model '{first.stem}'"
    )
    return 0
