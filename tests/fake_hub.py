"""A local stand-in for the Hugging Face hub, enough for ``huggingface_hub`` 2.4.0 downloads.

Two ``http.server`` servers on 127.0.0.1: the hub and a "CDN" on another port (another
origin, as the real hub's LFS redirects go to another host). The hub answers:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes and LFS sha256):
  ``HfApi.model_info``;
- ``GET /api/models/{repo}/tree/{rev}``: ``HfApi.list_repo_tree``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: 302 to the CDN with ``X-Repo-Commit``,
  ``X-Linked-Etag``, ``X-Linked-Size`` and ``ETag``, as the hub does for LFS files.

The CDN serves ``/cdn/{sha256}`` with ``Range`` support. Errors carry ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the hub's do. Knobs for tests:
``cut_after`` (send that many bytes of the next GET of a file, then drop the connection),
``fail_after_cut`` (answer 503 to later GETs of that file), ``corrupt`` (serve the file with
one byte changed), ``private`` (repos that need ``Authorization: Bearer <token>``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import gguf

__all__ = ["FakeHub", "HubFile", "sha256_of", "smollm_split", "write_split_gguf"]

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_split_gguf(source: Path, out_dir: Path, stem: str, parts: int = 2) -> list[Path]:
    """Rewrite ``source`` as a split model ``{stem}-0000i-of-0000N.gguf`` (as gguf-split does)."""
    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    per_part = -(-len(reader.tensors) // parts)
    writer = gguf.GGUFWriter(out_dir / f"{stem}.gguf", arch.contents(), split_max_tensors=per_part)
    for item in reader.fields.values():
        if item.name == gguf.Keys.General.ARCHITECTURE or item.name.startswith("GGUF."):
            continue
        kind = item.types[0]
        sub = item.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(item.name, item.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return [out_dir / f"{stem}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]


@functools.cache
def smollm_split(source: Path, out_dir: Path) -> tuple[Path, ...]:
    """The bundled SmolLM2 as a two-part split model in ``out_dir``, written once per run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return tuple(write_split_gguf(source, out_dir, "SmolLM2-135M-Instruct-Q4_1", parts=2))


@dataclass
class HubFile:
    source: Path
    size: int
    sha256: str


@dataclass
class FakeHub:
    token: str = "hf_test_token"
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)
    cut_after: dict[str, int] = field(default_factory=dict)  # sha256 -> bytes before the cut
    fail_after_cut: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)
    _cut_done: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ----- setup -----

    def add_file(self, repo: str, path: str, source: Path, sha256: str | None = None) -> HubFile:
        file = HubFile(source, source.stat().st_size, sha256 or sha256_of(source))
        self.repos.setdefault(repo, {})[path] = file
        self.commits.setdefault(repo, hashlib.sha1(repo.encode()).hexdigest())
        return file

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            handler = type(f"{role}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def gets(self, prefix: str = "/cdn/") -> list[tuple[str, str, dict[str, str]]]:
        with self._lock:
            return [r for r in self.requests if r[0] == "GET" and r[1].startswith(prefix)]

    # ----- lookups -----

    def by_sha(self, sha256: str) -> HubFile | None:
        for files in self.repos.values():
            for file in files.values():
                if file.sha256 == sha256:
                    return file
        return None

    def take_cut(self, sha256: str) -> int | None:
        with self._lock:
            if sha256 in self.cut_after and sha256 not in self._cut_done:
                self._cut_done.add(sha256)
                return self.cut_after[sha256]
            return None

    def is_failing(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._cut_done and sha256 in self.fail_after_cut


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ----- plumbing -----

    def _record(self) -> None:
        with self.hub._lock:
            self.hub.requests.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self, repo: str) -> bool:
        if repo not in self.hub.private:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _repo(self, repo: str, revision: str) -> dict[str, HubFile] | None:
        """The repo's files, or None after answering with the hub's error."""
        files = self.hub.repos.get(repo)
        if files is None or not self._authorized(repo):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", self.hub.commits[repo]):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return files

    # ----- routes -----

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self._record()
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if self.role == "cdn":
            if len(parts) == 2 and parts[0] == "cdn":
                return self._serve_blob(parts[1])
            return self._error(404, "EntryNotFound", "no such blob")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest:
                return self._model_info(repo, "main", parse_qs(url.query))
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo, rest[1], parse_qs(url.query))
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._error(404, "EntryNotFound", "unknown route")

    def _model_info(self, repo: str, revision: str, query: dict[str, list[str]]) -> None:
        files = self._repo(repo, revision)
        if files is None:
            return
        blobs = query.get("blobs") == ["True"] or query.get("blobs") == ["true"]
        siblings: list[dict[str, Any]] = []
        for path, file in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(
                    size=file.size,
                    blobId=hashlib.sha1(file.sha256.encode()).hexdigest(),
                    lfs={"sha256": file.sha256, "size": file.size, "pointerSize": 134},
                )
            siblings.append(sibling)
        body = {
            "_id": repo,
            "id": repo,
            "modelId": repo,
            "sha": self.hub.commits[repo],
            "private": repo in self.hub.private,
            "tags": ["gguf"],
            "siblings": siblings,
        }
        self._send(200, json.dumps(body).encode())

    def _tree(self, repo: str, revision: str) -> None:
        files = self._repo(repo, revision)
        if files is None:
            return
        entries = [
            {
                "type": "file",
                "path": path,
                "size": file.size,
                "oid": hashlib.sha1(file.sha256.encode()).hexdigest(),
                "lfs": {"oid": file.sha256, "size": file.size, "pointerSize": 134},
            }
            for path, file in sorted(files.items())
        ]
        self._send(200, json.dumps(entries).encode())

    def _resolve(self, repo: str, revision: str, path: str) -> None:
        files = self._repo(repo, revision)
        if files is None:
            return
        commit = self.hub.commits[repo]
        file = files.get(path)
        if file is None:
            body = json.dumps({"error": "Entry not found"}).encode()
            self._send(
                404,
                body,
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
            )
            return
        self._send(
            302,
            headers={
                "Location": f"{self.hub.cdn_url}/cdn/{file.sha256}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(file.size),
                "ETag": f'"{hashlib.sha1(file.sha256.encode()).hexdigest()}"',
                "Accept-Ranges": "bytes",
            },
        )

    def _serve_blob(self, sha256: str) -> None:
        file = self.hub.by_sha(sha256)
        if file is None:
            return self._error(404, "EntryNotFound", "no such blob")
        if self.command == "GET" and self.hub.is_failing(sha256):
            return self._error(503, "ServiceUnavailable", "try again later")
        start, end = 0, file.size - 1
        status = HTTPStatus.OK
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
        range_header = self.headers.get("Range")
        if range_header:
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start = int(first)
            end = int(last) if last else file.size - 1
            if start >= file.size or end < start:
                return self._send(416, b"", {"Content-Range": f"bytes */{file.size}"})
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = self.hub.take_cut(sha256)
        budget = length if cut is None else max(0, cut - start)
        sent = 0
        with file.source.open("rb") as handle:
            handle.seek(start)
            while sent < min(budget, length):
                chunk = handle.read(min(_CHUNK, length - sent, budget - sent))
                if not chunk:
                    break
                at = 4096 - (start + sent)  # one changed byte, same size: only sha256 can tell
                if sha256 in self.hub.corrupt and 0 <= at < len(chunk):
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                sent += len(chunk)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
