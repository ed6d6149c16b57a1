"""Optional API keys, sent as ``Authorization: Bearer <key>``.

Keys come from ``[auth]`` in the config and from ``LLMIS_API_KEYS`` / ``LLMIS_ADMIN_KEYS``
(comma-separated). With no key configured, auth is off. Otherwise every route needs a key,
except the configured ``open_paths``; ``/admin/*`` needs an admin key (an admin key is also
good everywhere else). Missing or bad key: 401; a user key on an admin route: 403.

Keys are compared in constant time (``hmac.compare_digest`` on SHA-256 digests, against
every configured key) and never logged: a client is known by a short digest, its key id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from enum import Enum

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmis.config import AuthSettings
from llmis.errors import APIError

__all__ = [
    "KEYRING",
    "KEY_ID",
    "WS_BEARER_PREFIX",
    "WS_PROTOCOL",
    "AuthenticationError",
    "KeyRing",
    "PermissionDeniedError",
    "Role",
    "auth_middleware",
    "is_admin_request",
    "key_id",
]

logger = logging.getLogger(__name__)

KEY_ID = web.RequestKey("llmis_key_id", str)  # the key id of an authenticated request


class Role(str, Enum):
    USER = "user"
    ADMIN = "admin"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(APIError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """A stable, non-secret name for ``key`` (for rate limits and logs)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class KeyRing:
    """The configured keys and their roles."""

    def __init__(self, user_keys: Iterable[str], admin_keys: Iterable[str]) -> None:
        self._keys = [(_digest(k), Role.USER) for k in user_keys]
        self._keys += [(_digest(k), Role.ADMIN) for k in admin_keys]
        self.has_admin = any(role is Role.ADMIN for _, role in self._keys)

    @classmethod
    def from_settings(cls, settings: AuthSettings, environ: Mapping[str, str]) -> KeyRing:
        users = [k.get_secret_value() for k in settings.api_keys]
        admins = [k.get_secret_value() for k in settings.admin_keys]
        return cls(
            users + _split(environ.get("LLMIS_API_KEYS")),
            admins + _split(environ.get("LLMIS_ADMIN_KEYS")),
        )

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def role(self, presented: str) -> Role | None:
        """The role of ``presented``; every key is compared, so timing says nothing."""
        digest = _digest(presented)
        found: Role | None = None
        for known, role in self._keys:
            if hmac.compare_digest(digest, known) and found is not Role.ADMIN:
                found = role
        return found


KEYRING = web.AppKey("keyring", KeyRing)


WS_PROTOCOL = "llmis.v1"  # the WebSocket subprotocol /v1/ws answers with
WS_BEARER_PREFIX = "llmis.bearer."  # + base64url(key): a browser's key, offered as a protocol


def _protocol_key(request: web.Request) -> str | None:
    """A key offered in ``Sec-WebSocket-Protocol`` as ``llmis.bearer.<base64url>``: browsers
    cannot set ``Authorization`` on a WebSocket, and a key in the URL would end up in logs."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return None
    for offered in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        offered = offered.strip()
        if offered.startswith(WS_BEARER_PREFIX):
            encoded = offered[len(WS_BEARER_PREFIX) :]
            try:
                key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            return key.strip() or None
    return None


def _bearer(request: web.Request) -> str | None:
    """The key sent as ``Authorization: Bearer <key>``, or as ``x-api-key`` (Anthropic's)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        return token
    return request.headers.get("x-api-key", "").strip() or _protocol_key(request)


def is_admin_request(ring: KeyRing, request: web.Request) -> bool:
    """True for a request with an admin key; with auth off, for a loopback client."""
    if not ring.enabled:
        remote = request.remote or ""
        try:
            return ipaddress.ip_address(remote.split("%")[0]).is_loopback
        except ValueError:
            return False
    key = _bearer(request)
    return key is not None and ring.role(key) is Role.ADMIN


PAGE_PATHS = frozenset({"/"})  # the chat page and its assets hold no data: always open


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def auth_middleware(ring: KeyRing, open_paths: Iterable[str]) -> Middleware:
    """Paths in ``open_paths`` need no key; an entry ending in ``*`` is a prefix."""
    paths = list(open_paths)
    exact = frozenset(p for p in paths if not p.endswith("*"))
    prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not ring.enabled or path in exact or (prefixes and path.startswith(prefixes)):
            return await handler(request)
        if path in PAGE_PATHS or path.startswith("/static/"):  # the chat page asks for a key
            return await handler(request)
        key = _bearer(request)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(or 'x-api-key: <key>').",
                "missing_api_key",
            )
        role = ring.role(key)
        if role is None:
            raise AuthenticationError("Incorrect API key provided.", "invalid_api_key")
        if is_admin_path(path) and role is not Role.ADMIN:
            detail = "" if ring.has_admin else " (none is configured)"
            raise PermissionDeniedError(f"This endpoint needs an admin API key{detail}.")
        request[KEY_ID] = key_id(key)
        return await handler(request)

    return middleware
