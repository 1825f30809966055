"""WebSocket authentication before accept: a single-use ticket (`?ticket=`) or the session."""

from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import validate_host

from common import parsers
from realtime import protocol, services


class TicketAuthMiddleware(BaseMiddleware):
    """A `ticket` query parameter overrides the session user; a bad ticket means anonymous."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode("latin1"))
        tickets = query.get("ticket")
        if tickets:
            user = None
            try:
                raw = parsers.identifier(tickets[0], field="ticket", max_length=200)
            except parsers.InvalidValue:
                raw = None  # a malformed ticket is simply not a ticket: closed with 4401
            if raw is not None:
                # Off the single thread-sensitive thread: a reconnect storm claims tickets in
                # parallel.
                consume = database_sync_to_async(services.ticket_consume, thread_sensitive=False)
                user = await consume(raw=raw)
            scope = {**scope, "user": user or AnonymousUser()}
        return await super().__call__(scope, receive, send)


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
    host = dict(scope.get("headers", [])).get(b"host")
    if host is None:
        return False
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    own = protocol.host_origin(host.decode("latin1"), scheme)
    return own is not None and parsed == own and validate_host(own[1], settings.ALLOWED_HOSTS)


class OriginCheckMiddleware(BaseMiddleware):
    """Browsers always send Origin: it must be allowed (`_origin_allowed`), or the handshake is
    refused (close 4403 before accept: HTTP 403). Other clients send none and authenticate like
    everyone else, so a missing Origin is not a cross-site risk."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origin = dict(scope.get("headers", [])).get(b"origin")
        if origin is not None and not _origin_allowed(origin.decode("latin1"), scope):
            await send({"type": "websocket.close", "code": 4403})
            return None
        return await super().__call__(scope, receive, send)


def websocket_auth_stack(inner: Any) -> Any:
    return OriginCheckMiddleware(AuthMiddlewareStack(TicketAuthMiddleware(inner)))
