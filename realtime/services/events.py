"""The live-event hub's publishing side: other apps declare their topics (`topic_register`)
and publish events (`publish` after commit, `apublish` now). Delivery is at-most-once: an event
is a notification, never the only copy of a fact."""

import json
from typing import Any

import structlog
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from prometheus_client import Counter

from realtime.fanout import dumps, hub
from realtime.topics import TopicAccess, topic_rule_register, topic_validate

logger = structlog.get_logger(__name__)

EVENTS_PUBLISHED = Counter(
    "realtime_events_published_total", "Hub events handed to the fan-out hub", ["outcome"]
)


def topic_register(prefix: str, *, access: TopicAccess) -> None:
    """Declare a topic another app publishes, and who may subscribe (call from
    `AppConfig.ready`; registering a prefix again replaces its rule). Process-local state, no
    database."""
    topic_rule_register(prefix, access)


def _plain(payload: Any) -> Any:
    return json.loads(json.dumps(payload, cls=DjangoJSONEncoder))


def _event_envelope(topic: str, payload: Any) -> dict[str, Any]:
    frame = dumps({"type": "event", "topic": topic, "payload": _plain(payload)})
    # A lone surrogate in a payload would make every subscriber's socket refuse the frame;
    # refuse it here, once, so a poison event costs only itself.
    frame.encode("utf-8")
    return {"topic": topic, "frame": frame}


async def apublish(topic: str, payload: Any) -> None:
    """Send `{"type": "event", "topic", "payload"}` now, from async code (no transaction to wait
    for). Never raises, a bad topic or payload included (counted and logged): a lost
    notification must not break the caller."""
    try:
        envelope = _event_envelope(topic_validate(topic), payload)
    except Exception:
        EVENTS_PUBLISHED.labels("error").inc()
        logger.exception("realtime_publish_failed", topic=topic)
        return
    await hub().apublish(envelope)
    EVENTS_PUBLISHED.labels("sent").inc()


def _send_now(topic: str, payload: Any) -> None:
    try:
        envelope = _event_envelope(topic, payload)
    except Exception:
        EVENTS_PUBLISHED.labels("error").inc()
        logger.exception("realtime_publish_failed", topic=topic)
        return
    hub().publish_threadsafe(envelope)
    EVENTS_PUBLISHED.labels("sent").inc()


def publish(topic: str, payload: Any) -> None:
    """Push `{"type": "event", "topic", "payload"}` to subscribers once the current transaction
    commits (at once outside a transaction); at-most-once, nothing if it rolls back. Payload
    must be JSON-serialisable (Django encoder): a payload that is not is logged and dropped at
    commit, never raised. Raises `InvalidValue` (`bad_topic`) for a malformed topic, now."""
    topic_validate(topic)
    transaction.on_commit(lambda: _send_now(topic, payload))
