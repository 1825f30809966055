"""The realtime app's part of the operator console (`shared/specs/console.md`): its panel, the
gauges each process reports in its heartbeat, and the live-event hub handed to the console.

Global numbers, whatever process serves the sockets: open sockets and topic subscriptions are
per-process gauges summed over the live processes (`console_gauge_totals`); messages and socket
errors are global counters (`console_count` at the point a message is stored or a socket
fails); rooms come from the database.
"""

from typing import Any

import structlog
from django.conf import settings
from django.urls import reverse

from common.console import (
    ConsoleHub,
    ConsolePanel,
    PanelSample,
    Row,
    console_count_totals,
    console_gauge_totals,
)
from realtime.fanout import dumps, hub
from realtime.models import Room
from realtime.services import TopicAccess, topic_register

logger = structlog.get_logger(__name__)

MESSAGES = "realtime.messages"
SOCKET_ERRORS = "realtime.socket_errors"
SOCKETS = "realtime.sockets"
TOPIC_SUBSCRIPTIONS = "realtime.topic_subscriptions"
BUSIEST_ROOMS = 5


def sockets_here() -> int:
    """Authenticated sockets this process holds (read from any thread: a list copy of the
    index's values is atomic under the GIL, so the loop may keep changing it)."""
    return sum(map(len, list(hub().by_user.values())))


def topic_subscriptions_here() -> int:
    """Topic subscriptions of this process's sockets (thread-safe read, as above)."""
    return sum(map(len, list(hub().by_topic.values())))


def realtime_sample() -> PanelSample:
    """Open sockets, topic subscriptions, rooms, messages and socket errors (counters), and the
    busiest rooms (by messages, linked to their admin page). Two small queries."""
    gauges = console_gauge_totals([SOCKETS, TOPIC_SUBSCRIPTIONS])
    totals = console_count_totals([MESSAGES, SOCKET_ERRORS])
    rows: list[Row] = [
        {
            "key": room.slug,
            "cells": [room.slug, room.kind, room.last_seq],
            "link": reverse("admin:realtime_room_change", args=[room.pk]),
        }
        for room in Room.objects.order_by("-last_seq", "pk")[:BUSIEST_ROOMS]
    ]
    return {
        "counters": {
            "messages": {"label": "chat messages", "value": totals[MESSAGES]},
            "socket_errors": {"label": "socket errors", "value": totals[SOCKET_ERRORS]},
        },
        "numbers": [
            {"key": "sockets", "label": "open sockets", "value": int(gauges[SOCKETS])},
            {
                "key": "topic_subscriptions",
                "label": "topic subscriptions",
                "value": int(gauges[TOPIC_SUBSCRIPTIONS]),
            },
            {
                "key": "rooms",
                "label": "rooms",
                "value": Room.objects.count(),
                "link": reverse("admin:realtime_room_changelist"),
            },
            {
                "key": "fanout",
                "label": "fan-out",
                "value": "Redis" if settings.REDIS_URL else "in-process",
            },
        ],
        "attention": [],
        "tables": [
            {
                "key": "busiest_rooms",
                "title": "Busiest rooms",
                "columns": ["room", "kind", "messages"],
                "rows": rows,
            }
        ],
    }


def _declare_staff_topic(topic: str) -> None:
    topic_register(topic, access=TopicAccess.STAFF)


def _publish_now(topic: str, payload: Any) -> None:
    """Send `{"type": "event", "topic", "payload"}` to the topic's subscribers now, on every
    process (through Redis when configured). Never raises: a console frame is a notification
    (the snapshot API holds the state)."""
    try:
        frame = dumps({"type": "event", "topic": topic, "payload": payload})
        frame.encode("utf-8")  # a lone surrogate would make every subscriber refuse the frame
        hub().publish_threadsafe({"topic": topic, "frame": frame})
    except Exception:
        logger.exception("console_publish_failed", topic=topic)


def console_hub() -> ConsoleHub:
    """The live-event hub as the console needs it. A console socket leaves the default room the
    hub joins every socket to, so it gets no chat traffic and shows no one online."""
    hello: list[dict[str, Any]] = []
    if settings.REALTIME_AUTOJOIN_DEFAULT_ROOM:
        hello.append({"type": "leave", "room": settings.REALTIME_DEFAULT_ROOM})
    return ConsoleHub(declare_staff_topic=_declare_staff_topic, publish=_publish_now, hello=hello)


REALTIME_PANEL = ConsolePanel(name="realtime", title="Realtime", sample=realtime_sample, order=60)
