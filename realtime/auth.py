"""WebSocket authentication before accept: a single-use ticket (`?ticket=`) or the session."""

from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.utils.http import url_has_allowed_host_and_scheme

from common import parsers
from realtime import services


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


def _origin_allowed(origin: str) -> bool:
    if origin in settings.WS_ALLOWED_ORIGINS or "*" in settings.WS_ALLOWED_ORIGINS:
        return True
    parsed = urlparse(origin)
    if not parsed.scheme or not parsed.netloc:
        return False
    return url_has_allowed_host_and_scheme(
        origin, allowed_hosts=set(settings.ALLOWED_HOSTS) | {parsed.netloc}
    ) and _host_allowed(parsed.hostname or "")


def _host_allowed(hostname: str) -> bool:
    for pattern in settings.ALLOWED_HOSTS:
        if pattern == "*" or hostname == pattern.strip("[]"):
            return True
        if pattern.startswith(".") and (hostname == pattern[1:] or hostname.endswith(pattern)):
            return True
    return False


class OriginCheckMiddleware(BaseMiddleware):
    """Browsers always send Origin: it must be an allowed host. Other clients send none and
    authenticate like everyone else, so a missing Origin is not a cross-site risk."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origin = dict(scope.get("headers", [])).get(b"origin")
        if origin is not None and not _origin_allowed(origin.decode("latin1")):
            await send({"type": "websocket.close", "code": 4403})
            return None
        return await super().__call__(scope, receive, send)


def websocket_auth_stack(inner: Any) -> Any:
    return OriginCheckMiddleware(AuthMiddlewareStack(TicketAuthMiddleware(inner)))
