"""WebSocket admission before accept: the Origin check, then the user from a single-use ticket
(`?ticket=`) or else the Django session cookie.

One flat middleware instead of Channels' stack (cookies, session, auth, ticket, origin): each
layer of that stack copied the scope and kept its coroutine frame suspended for the socket's
whole life, which is a fifth of the Python memory an idle socket costs. Here the lookups run in
helpers whose locals die before the consumer starts, the scope is copied once with just the
user in it (no cookies, no session object), and the only frame left is `__call__`'s.
"""

from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

from channels.auth import get_user
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http import parse_cookie
from django.http.request import validate_host

from common import parsers
from realtime import protocol, services

CLOSE_FORBIDDEN_ORIGIN = 4403


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _origin_allowed(origin: str, scope: dict[str, Any]) -> bool:
    """Scheme, host and port all count: the same origin as the request (its Host, an allowed
    host, under the socket's scheme) or one listed exactly in WS_ALLOWED_ORIGINS (`*`: any)."""
    allowed = settings.WS_ALLOWED_ORIGINS
    if "*" in allowed:
        return True
    parsed = protocol.origin_parse(origin)
    if parsed is None:
        return False
    if parsed in {protocol.origin_parse(entry) for entry in allowed}:
        return True
    host = _header(scope, b"host")
    if host is None:
        return False
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    own = protocol.host_origin(host.decode("latin1"), scheme)
    return own is not None and parsed == own and validate_host(own[1], settings.ALLOWED_HOSTS)


def origin_refused(scope: dict[str, Any]) -> bool:
    """Browsers always send Origin: it must be allowed (`_origin_allowed`). Other clients send
    none and authenticate like everyone else, so a missing Origin is not a cross-site risk."""
    origin = _header(scope, b"origin")
    return origin is not None and not _origin_allowed(origin.decode("latin1"), scope)


async def _ticket_user(raw: str) -> Any:
    """The ticket's user, or anonymous for a malformed, unknown, used or expired ticket."""
    try:
        ticket = parsers.identifier(raw, field="ticket", max_length=200)
    except parsers.InvalidValue:
        return AnonymousUser()  # a malformed ticket is simply not a ticket: closed with 4401
    # Off the single thread-sensitive thread: a reconnect storm claims tickets in parallel.
    consume = database_sync_to_async(services.ticket_consume, thread_sensitive=False)
    return await consume(raw=ticket) or AnonymousUser()


async def _session_user(scope: dict[str, Any]) -> Any:
    """The user of the session cookie (Django's own checks: backend, session hash), or
    anonymous. The session object is not kept: the consumer needs only the user."""
    cookie = _header(scope, b"cookie")
    if cookie is None:
        return AnonymousUser()
    key = parse_cookie(cookie.decode("latin1")).get(settings.SESSION_COOKIE_NAME)
    if not key:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(key)
    return await get_user({"session": store})


async def connection_user(scope: dict[str, Any]) -> Any:
    """A `ticket` query parameter decides alone (a bad ticket means anonymous, whatever the
    cookie says); without one, the session cookie."""
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if tickets:
        return await _ticket_user(tickets[0])
    return await _session_user(scope)


class WebSocketAdmission:
    """ASGI middleware for `websocket` scopes: a refused Origin is closed with 4403 before
    accept (the handshake gets HTTP 403); otherwise `inner` gets the scope plus `user` (a
    `User`, or `AnonymousUser`, which the consumer closes with 4401)."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if origin_refused(scope):
            await send({"type": "websocket.close", "code": CLOSE_FORBIDDEN_ORIGIN})
            return None
        return await self.inner({**scope, "user": await connection_user(scope)}, receive, send)


def websocket_auth_stack(inner: Any) -> Any:
    return WebSocketAdmission(inner)
