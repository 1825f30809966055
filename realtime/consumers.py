"""The `/ws/` WebSocket: one JSON frame per message, handlers chosen by `type`.

Frames in: `subscribe {topic}`, `unsubscribe {topic}`, `ping`. Frames out: `event {topic,
payload}`, `subscribed`, `unsubscribed`, `pong`, `error {code, detail, ref}`. A bad frame gets an
error frame and the connection stays open.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from prometheus_client import Gauge

from common.exceptions import ApplicationError, ValidationFailed
from realtime.services import hub_loop_remember
from realtime.topics import topic_authorize, topic_group

CLOSE_UNAUTHENTICATED = 4401
CONNECTIONS = Gauge("realtime_ws_connections", "Open WebSocket connections on this process")

Frame = dict[str, Any]


class HubConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        hub_loop_remember(asyncio.get_running_loop())
        self.user = self.scope.get("user")
        self.topics: set[str] = set()
        await self.accept()
        if self.user is None or not self.user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        CONNECTIONS.inc()
        self.handlers: dict[str, Callable[[Frame], Awaitable[None]]] = {
            "subscribe": self.on_subscribe,
            "unsubscribe": self.on_unsubscribe,
            "ping": self.on_ping,
        }

    async def disconnect(self, code: int) -> None:
        if self.user is None or not self.user.is_authenticated:
            return
        CONNECTIONS.dec()
        for topic in list(self.topics):
            await self.channel_layer.group_discard(topic_group(topic), self.channel_name)
        self.topics.clear()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        ref: Any = None
        try:
            frame = self._decode(text_data, bytes_data)
            ref = frame.get("ref")
            handler = self.handlers.get(frame.get("type"))  # type: ignore[arg-type]
            if handler is None:
                raise ValidationFailed(f"unknown type {frame.get('type')!r}", code="unknown_type")
            await handler(frame)
        except ApplicationError as error:
            await self.send_frame(
                {"type": "error", "code": error.code, "detail": error.message, "ref": ref}
            )

    def _decode(self, text_data: str | None, bytes_data: bytes | None) -> Frame:
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw.encode()) > settings.REALTIME_MAX_FRAME_BYTES:
            raise ValidationFailed("frame too large", code="frame_too_large")
        try:
            frame = json.loads(raw)
        except ValueError as exc:
            raise ValidationFailed("frame is not valid JSON", code="bad_json") from exc
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ValidationFailed("frame must be an object with a string type", code="bad_frame")
        return frame

    async def send_frame(self, frame: Frame) -> None:
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def on_ping(self, frame: Frame) -> None:
        await self.send_frame({"type": "pong", "ref": frame.get("ref")})

    async def on_subscribe(self, frame: Frame) -> None:
        topic = frame.get("topic")
        topic_authorize(user=self.user, topic=topic)  # type: ignore[arg-type]
        assert isinstance(topic, str)
        if topic not in self.topics:
            if len(self.topics) >= settings.REALTIME_MAX_TOPICS_PER_CONNECTION:
                raise ValidationFailed("too many subscriptions", code="too_many_topics")
            await self.channel_layer.group_add(topic_group(topic), self.channel_name)
            self.topics.add(topic)
        await self.send_frame({"type": "subscribed", "topic": topic, "ref": frame.get("ref")})

    async def on_unsubscribe(self, frame: Frame) -> None:
        topic = frame.get("topic")
        if not isinstance(topic, str) or topic not in self.topics:
            raise ValidationFailed("not subscribed to that topic", code="not_subscribed")
        await self.channel_layer.group_discard(topic_group(topic), self.channel_name)
        self.topics.discard(topic)
        await self.send_frame({"type": "unsubscribed", "topic": topic, "ref": frame.get("ref")})

    async def hub_event(self, event: dict[str, Any]) -> None:
        if event["topic"] in self.topics:
            await self.send_frame(
                {"type": "event", "topic": event["topic"], "payload": event["payload"]}
            )
