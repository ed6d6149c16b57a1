"""Browser-origin safety: the ``Host`` check against DNS rebinding, and the ``Origin`` check
against cross-site requests, as Jupyter and llama-server's web UI do.

* ``Host``: a server bound to a loopback address (the default) or given
  ``[server] allowed_hosts`` answers only requests whose ``Host`` is an IP address, a
  loopback name (``localhost``, ``*.localhost``), the bound name, or an allowed host (a name,
  ``.domain`` for it and its subdomains, ``*`` for any). A DNS-rebinding page reaches the
  server under its own name, so it gets 403 ``host_not_allowed``. A server bound to every
  interface (``0.0.0.0``, ``::``) does not check unless ``allowed_hosts`` is set.
* ``Origin``: a WebSocket upgrade or a state-changing request (any method but GET, HEAD and
  OPTIONS) that carries an ``Origin`` must come from the same origin as the server (the chat
  page at ``/``) or from an origin ``[cors] allow_origins`` lists: otherwise 403
  ``origin_not_allowed``. Requests without ``Origin`` (curl, SDKs, servers) are not browser
  requests and pass, with or without ``Content-Type``.
* A browser request (with ``Origin``) that sends a body must send it as ``application/json``
  (415 ``unsupported_media_type`` otherwise), so no HTML form can post to the API even from
  an allowed origin.
"""

from __future__ import annotations

import ipaddress

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from llmis.config import ServerSettings
from llmis.errors import APIError
from llmis.ops.auth import PermissionDeniedError
from llmis.ops.cors import Cors

__all__ = ["OriginPolicy", "split_host"]

_SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
_BODY_METHODS = frozenset({hdrs.METH_POST, hdrs.METH_PUT, hdrs.METH_PATCH})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class UnsupportedMediaTypeError(APIError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a ``Host`` header value (name lower-cased, IPv6 unbracketed);
    None when it is malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if not _is_ip(name):
            return None
    else:
        name, sep, rest = value.partition(":")
        rest = sep + rest
    port: int | None = None
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            return None
        port = int(rest[1:])
    name = name.lower().rstrip(".")
    if not name:
        return None
    return name, port


class OriginPolicy:
    """The Host and Origin checks of one app (see the module docstring)."""

    def __init__(self, server: ServerSettings, cors: Cors) -> None:
        self.cors = cors
        allowed = {h.lower().rstrip(".") for h in server.allowed_hosts}
        bound = server.host.lower().strip("[]")
        self.any_host = "*" in allowed or (bound in _WILDCARDS and not allowed)
        self.names = {h for h in allowed if not h.startswith(".")}
        if bound not in _WILDCARDS and not _is_ip(bound):
            self.names.add(bound)
        self.domains = tuple(h for h in allowed if h.startswith("."))

    def host_allowed(self, host: str | None) -> bool:
        if self.any_host or host is None:  # HTTP/1.0 may omit Host: no name to rebind
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name = parsed[0]
        return (
            _is_ip(name)
            or _is_loopback_name(name)
            or name in self.names
            or any(name == d[1:] or name.endswith(d) for d in self.domains)
        )

    @staticmethod
    def same_origin(origin: str, host: str | None, scheme: str) -> bool:
        """True if ``origin`` is this server as the browser sees it (scheme-less compare of
        name and port with ``Host``, the origin's default port filling a missing one)."""
        if host is None:
            return False
        try:
            url = URL(origin)
        except ValueError:
            return False
        if url.scheme not in ("http", "https") or not url.host:
            return False
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if port is None:
            port = _DEFAULT_PORTS.get(scheme, 80)
        origin_port = url.explicit_port or _DEFAULT_PORTS[url.scheme]
        return url.host.lower().rstrip(".").strip("[]") == name and origin_port == port

    def check(self, request: web.Request) -> None:
        """Raise the 403 / 415 that ``request`` deserves, if any."""
        host = request.headers.get(hdrs.HOST)
        if not self.host_allowed(host):
            raise PermissionDeniedError(
                "This server does not answer requests for that host name (DNS-rebinding "
                "protection); add it to [server] allowed_hosts to allow it.",
                code="host_not_allowed",
            )
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return
        upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        if request.method in _SAFE_METHODS and not upgrade:
            return
        if not self.same_origin(origin, host, request.scheme) and not self.cors.allows(origin):
            raise PermissionDeniedError(
                "Cross-origin requests from this origin are not allowed; "
                "list it in [cors] allow_origins to allow it.",
                code="origin_not_allowed",
            )
        if request.method in _BODY_METHODS and request.content_type != "application/json":
            raise UnsupportedMediaTypeError(
                "A browser request must send its body as 'Content-Type: application/json'."
            )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.check(request)
        return await handler(request)
