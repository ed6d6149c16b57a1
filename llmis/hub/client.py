"""The Hugging Face hub side of ``llmis pull``: list, choose and download GGUF files.

Built on ``huggingface_hub``: ``HfApi.model_info(files_metadata=True)`` lists a repository's
files at one commit with the sha256 the hub publishes for LFS files; ``get_hf_file_metadata``
(HEAD on ``/resolve``) gives the download location; ``http_get`` streams the bytes. Files are
downloaded from the resolved commit, so every part of a split model comes from the same one.

Downloads resume. ``http_get`` itself re-requests the rest with a ``Range`` header when the
connection breaks mid-file (up to 5 times without progress), and the bytes live in a
``.part`` file under ``<models_dir>/.partial/`` named after the file's sha256, so a later
``llmis pull`` of the same file (after Ctrl-C, or after the retries ran out) continues
where the last one stopped. ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` work as in
every ``huggingface_hub`` tool.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import (  # type: ignore[attr-defined]  # lazy exports
    WeakFileLock,
    build_hf_headers,
)
from tqdm.auto import tqdm

from llmis.models.splits import parse_split_name

__all__ = [
    "Candidate",
    "HubError",
    "RemoteFile",
    "RepoListing",
    "checked_sha256",
    "choose",
    "download",
    "file_sha256",
    "group_models",
    "hub_error_message",
    "list_repo",
]

DEFAULT_TAG = "Q4_K_M"  # what llama.cpp's ``-hf`` and ollama pick when no tag is given
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class HubError(Exception):
    """A hub repository or selection that cannot give the file asked for."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository
    size: int | None
    sha256: str | None  # published by the hub for LFS files

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class Candidate:
    """One model in a repository: a single file, or every part of a split file in order."""

    parts: tuple[RemoteFile, ...]

    @property
    def label(self) -> str:
        first = self.parts[0].path
        return first if len(self.parts) == 1 else f"{first} (+{len(self.parts) - 1} more parts)"

    @property
    def size(self) -> int | None:
        sizes = [p.size for p in self.parts]
        return None if None in sizes else sum(s or 0 for s in sizes)


def list_repo(repo_id: str, revision: str | None) -> RepoListing:
    """The repository's files at ``revision`` (default branch if None), pinned to its commit."""
    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = tuple(
        RemoteFile(
            s.rfilename,
            s.lfs.size if s.lfs is not None else s.size,
            checked_sha256(s.lfs.sha256, s.rfilename) if s.lfs is not None else None,
        )
        for s in info.siblings or ()
    )
    if not info.sha:
        raise HubError(f"the hub gave no commit for {repo_id}@{revision or 'main'}")
    return RepoListing(repo_id, info.sha, files)


def group_models(files: Iterable[RemoteFile]) -> list[Candidate]:
    """The GGUF models among ``files``: split parts grouped, projector files left out."""
    singles: list[Candidate] = []
    splits: dict[tuple[str, str, int], dict[int, RemoteFile]] = {}
    for file in files:
        if not file.name.lower().endswith(".gguf") or file.name.lower().startswith("mmproj"):
            continue
        split = parse_split_name(file.name)
        if split is None:
            singles.append(Candidate((file,)))
            continue
        folder = str(PurePosixPath(file.path).parent)
        splits.setdefault((folder, split.prefix, split.count), {})[split.index] = file
    groups = [
        Candidate(tuple(parts[i] for i in sorted(parts)))
        for (_, _, count), parts in splits.items()
        if sorted(parts) == list(range(1, count + 1))  # incomplete splits cannot load
    ]
    return sorted(singles + groups, key=lambda c: c.parts[0].path)


def _tag_pattern(tag: str) -> re.Pattern[str]:
    # Q4_K matches "model.Q4_K.gguf" and "model-Q4_K-00001-of-00002.gguf", never "Q4_K_M".
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)


def _describe(candidates: Sequence[Candidate]) -> str:
    return "\n".join(f"  {c.label}" for c in candidates) or "  (none)"


def choose(listing: RepoListing, selector: str | None) -> Candidate:
    """Pick the model named by ``selector``: a file name (exact) or a quant tag (any case).

    With no selector, the repository's only GGUF model, else the one tagged ``Q4_K_M``.
    Several matches, or none, raise :class:`HubError` listing the candidates.
    """
    candidates = group_models(listing.files)
    where = f"{listing.repo_id}@{listing.commit[:12]}"
    if not candidates:
        raise HubError(f"{where} has no GGUF files")
    if selector is None and len(candidates) == 1:
        return candidates[0]
    if selector is not None:
        by_name = [c for c in candidates if any(selector in (p.path, p.name) for p in c.parts)] or [
            c for c in candidates if any(selector.lower() == p.name.lower() for p in c.parts)
        ]
        if len(by_name) == 1:
            return by_name[0]
    tag = selector or DEFAULT_TAG
    pattern = _tag_pattern(tag.removesuffix(".gguf"))
    matches = [c for c in candidates if pattern.search(c.parts[0].path)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        asked = f"matches {selector!r}" if selector else f"is tagged {DEFAULT_TAG} (the default)"
        raise HubError(
            f"no GGUF file in {where} {asked}; name a quant or a file, one of:\n"
            + _describe(candidates)
        )
    raise HubError(
        f"{tag!r} is ambiguous in {where}: it matches {len(matches)} files; "
        f"name one exactly:\n" + _describe(matches)
    )


def checked_sha256(value: object, path: str) -> str | None:
    """The hub's sha256 for ``path`` in lower case, checked to be 64 hex digits before it
    is used in a file name; None if the hub gave none. :class:`HubError` if malformed."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _SHA256.match(value.lower()):
        raise HubError(
            f"the hub gave a malformed sha256 for {path} ({str(value)[:80]!r}); "
            "refusing to download it"
        )
    return value.lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    return parsed.scheme, (parsed.hostname or "").lower(), parsed.port


def _progress_class(quiet: bool) -> type[Any]:
    interval = 0.2 if sys.stderr.isatty() else 5.0

    class Progress(tqdm):  # type: ignore[misc]
        """A byte progress bar on stderr; in a log (no TTY) an update every few seconds."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, disable=quiet, mininterval=interval, **kwargs)

    return Progress


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    checked: bool  # the hub published a sha256 and the bytes matched it


def download(
    listing: RepoListing, file: RemoteFile, partial_dir: Path, *, quiet: bool = False
) -> Downloaded:
    """Download ``file`` into ``partial_dir``, resuming a ``.part`` left by an earlier try.

    Returns the complete, checked ``.part`` file. On a sha256 mismatch the file is deleted
    and :class:`HubError` raised.
    """
    published = checked_sha256(file.sha256, file.path)  # before it names a file
    url = hf_hub_url(listing.repo_id, file.path, revision=listing.commit)
    headers = build_hf_headers()  # HF_TOKEN / the saved token, user agent
    headers["Accept-Encoding"] = "identity"
    meta = get_hf_file_metadata(url, headers=headers)
    if _origin(meta.location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the hub
    etag = meta.etag or ""
    sha256 = published or (etag if _SHA256.match(etag) else None)
    size = file.size if file.size is not None else meta.size
    key = (sha256 or re.sub(r"[^0-9A-Za-z]", "", etag) or listing.commit)[:16]
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / f"{file.name}.{key}.part"
    with WeakFileLock(part.with_suffix(".lock")):  # one writer per .part file
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if have:
            print(f"resuming {file.name} at {have} of {size or '?'} bytes", file=sys.stderr)
        with part.open("ab") as out:
            http_get(
                meta.location,
                out,
                resume_size=have,
                headers=headers,
                expected_size=size,
                displayed_filename=file.name,
                tqdm_class=_progress_class(quiet),
            )
        actual = file_sha256(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise HubError(
            f"{file.name}: sha256 mismatch: the hub publishes {sha256}, the download has "
            f"{actual}; the file was deleted (run the command again to download it afresh)"
        )
    return Downloaded(part, actual, sha256 is not None)


def hub_error_message(exc: BaseException, repo_id: str, revision: str | None) -> str | None:
    """One line (or a few) for a hub or network failure; None if ``exc`` is not one."""
    endpoint = constants.ENDPOINT
    if isinstance(exc, HFValidationError):  # the name is not a repository id at all
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"{repo_id[:200]!r} is not a Hugging Face repository id ({detail})"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so the hub at {endpoint} is not contacted"
    if isinstance(exc, httpx2.ConnectError | httpx2.TimeoutException | httpx2.ProxyError):
        reason = str(exc).strip() or type(exc).__name__
        return (
            f"cannot reach the Hugging Face hub at {endpoint} ({reason}); check the network "
            f"or HF_ENDPOINT, or pull a local file instead"
        )
    if isinstance(exc, httpx2.TransportError):
        return f"the connection to {endpoint} broke off ({exc})"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo_id} on {endpoint}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"file not found in {repo_id} on {endpoint}: {exc.response.url}"
    if isinstance(exc, RepositoryNotFoundError | GatedRepoError):
        token_hint = (
            "the token in HF_TOKEN has no access to it"
            if build_hf_headers().get("authorization")
            else "set HF_TOKEN to a token that has access"
        )
        return (
            f"repository {repo_id} not found on {endpoint}, or it is private or gated "
            f"({token_hint})"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the hub at {endpoint} answered {status}: {first}"
    return None
