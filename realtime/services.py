"""Realtime writes: the live-event hub (`publish`) and WebSocket tickets.

Other apps call `publish(topic, payload)` inside or outside a transaction; delivery happens after
commit and is at-most-once (a notification, never the only copy of a fact).
"""

import asyncio
import hashlib
import json
import secrets
from datetime import timedelta
from typing import Any

import structlog
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import User
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone
from prometheus_client import Counter

from realtime.models import ConnectionTicket
from realtime.topics import TopicAccess, topic_group, topic_rule_register, topic_validate

__all__ = ["TopicAccess", "apublish", "publish", "ticket_consume", "ticket_issue", "topic_register"]

logger = structlog.get_logger(__name__)

EVENTS_PUBLISHED = Counter(
    "realtime_events_published_total", "Hub events handed to the channel layer", ["outcome"]
)
HUB_EVENT_TYPE = "hub.event"


def topic_register(prefix: str, *, access: TopicAccess) -> None:
    """Declare a topic another app publishes (call from `AppConfig.ready`)."""
    topic_rule_register(prefix, access)


def _plain(payload: Any) -> Any:
    return json.loads(json.dumps(payload, cls=DjangoJSONEncoder))


async def apublish(topic: str, payload: Any) -> None:
    """Send now, from async code. Never raises: a lost notification must not break the caller."""
    try:
        layer = get_channel_layer()
        assert layer is not None
        await layer.group_send(
            topic_group(topic_validate(topic)),
            {"type": HUB_EVENT_TYPE, "topic": topic, "payload": _plain(payload)},
        )
    except Exception:
        EVENTS_PUBLISHED.labels("error").inc()
        logger.exception("realtime_publish_failed", topic=topic)
    else:
        EVENTS_PUBLISHED.labels("sent").inc()


_hub_loop: asyncio.AbstractEventLoop | None = None


def hub_loop_remember(loop: asyncio.AbstractEventLoop) -> None:
    """Record the loop serving WebSockets. The in-memory layer's queues belong to that loop, so
    publishes from plain threads (consumers, workers) are handed to it instead of a new loop."""
    global _hub_loop
    _hub_loop = loop


def _send_now(topic: str, payload: Any) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        loop.create_task(apublish(topic, payload))
    elif _hub_loop is not None and _hub_loop.is_running():
        asyncio.run_coroutine_threadsafe(apublish(topic, payload), _hub_loop)
    else:
        async_to_sync(apublish)(topic, payload)


def publish(topic: str, payload: Any) -> None:
    """Push `{"type": "event", "topic", "payload"}` to subscribers once the current transaction
    commits (at once outside a transaction). Payload must be JSON-serialisable (Django encoder)."""
    topic_validate(topic)
    transaction.on_commit(lambda: _send_now(topic, payload))


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def ticket_issue(*, user: User) -> tuple[str, int]:
    """Create a single-use WebSocket ticket; returns the raw ticket (never stored) and its TTL."""
    raw = secrets.token_urlsafe(32)
    ttl = settings.REALTIME_TICKET_TTL_SECONDS
    ConnectionTicket.objects.create(
        key_hash=_hash(raw), user=user, expires_at=timezone.now() + timedelta(seconds=ttl)
    )
    return raw, ttl


@transaction.atomic
def ticket_consume(*, raw: str) -> User | None:
    """Claim a ticket once (conditional UPDATE); None when unknown, used or expired."""
    if not raw or len(raw) > 200:
        return None
    key_hash = _hash(raw)
    claimed = ConnectionTicket.objects.filter(
        key_hash=key_hash, used_at__isnull=True, expires_at__gt=timezone.now()
    ).update(used_at=timezone.now())
    if claimed != 1:
        return None
    ticket = ConnectionTicket.objects.select_related("user").get(key_hash=key_hash)
    return ticket.user if ticket.user.is_active else None


def tickets_purge() -> int:
    """Delete used and expired tickets; returns how many."""
    deleted, _ = ConnectionTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return deleted
