"""The `/ws/` WebSocket: one JSON frame per message, handlers chosen by `type`.

Frames in: messenger `sendMessage {text, room?, client_id?}`, `join {room}`, `leave {room}`,
`history {room, before_seq?, limit?}`, `sync {room, after_seq}`, `typing {room}`,
`read {room, seq}`; hub `subscribe {topic}`, `unsubscribe {topic}`; `ping`. Frames out:
`message`, `ack {ref, id, seq}`, `joined`, `left`, `presence {room, joined, left}`, `history`,
`sync`, `typing`, `read`, `sync_required`, `event {topic, payload}`, `subscribed`,
`unsubscribed`, `pong`, `error {code, detail, ref}`.

Bad input (`input-policy.md`): every frame is decoded by `common.parsers.json_document` and every
field by the shared parsers (`realtime.protocol`); a refusal is answered with
`error {code, detail, ref, field, reason}` and the connection stays open. Every frame costs a
token of the connection's bucket and a frame of the user's budget (one budget across all of the
user's sockets on every process, `realtime.fanout.limits`); a frame without both is answered
`error {code: "rate_limited"}` and not handled. A connection whose frames keep being refused
for `REALTIME_RATE_STRIKE_SECONDS` (no pause of a full second without a refused frame) is told
so (`error {code: "rate_limit_exceeded"}`) and closed with 1008 (policy violation). Any other
exception while handling a frame is answered with `error {code: "internal", request_id}` and
logged once with that correlation id; the socket stays usable. Whatever ends a connection
(client close or drop, a crash in connect, receive or disconnect, a failed write, overflow)
releases the gauge, the hub's indexes and presence once.

Every frame to the client goes through the connection's bounded outbox (realtime.fanout), the
same path room broadcasts take, so a client that stops reading is dropped alone; a write the
transport refuses closes the socket with 1011 so the client reconnects and syncs.
"""

import asyncio
import functools
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from prometheus_client import Gauge

from common.console import console_count
from common.exceptions import ApplicationError, RateLimited, ValidationFailed
from common.parsers import InvalidValue
from realtime import protocol, selectors, services
from realtime.fanout import (
    SLOW_CLIENTS,
    FanoutHub,
    Outbox,
    dumps,
    dumps_with_encoded,
    hub,
    presence_snapshot_frame,
)
from realtime.models import Room
from realtime.topics import topic_authorize

logger = structlog.get_logger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CONNECTIONS = Gauge("realtime_ws_connections", "Open WebSocket connections on this process")

Frame = dict[str, Any]
Ref = str | int | None

_NO_TOPICS: frozenset[str] = frozenset()

# Fire-and-forget cleanup tasks are kept referenced until done (the loop holds only weak refs).
_background: set[asyncio.Task[Any]] = set()


def _spawn(coroutine: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _transport_of(send: Any) -> Any:
    """The server transport behind an ASGI `send` (uvicorn), through Channels' wrappers.

    ASGI offers no way to drop a client that stopped reading: `websocket.close` waits until the
    stuck write buffer drains, which it never does. Aborting the transport is the only exit."""
    target = send
    for _ in range(6):
        owner = getattr(target, "__self__", None)
        if owner is None:
            return None
        transport = getattr(owner, "transport", None)
        if transport is not None:
            return transport
        target = getattr(owner, "real_send", None) or getattr(owner, "send", None)
    return None


# Frame type -> handler method; a class-level table keeps per-connection memory down.
HANDLERS = {
    "sendMessage": "on_send_message",
    "join": "on_join",
    "leave": "on_leave",
    "history": "on_history",
    "sync": "on_sync",
    "typing": "on_typing",
    "read": "on_read",
    "subscribe": "on_subscribe",
    "unsubscribe": "on_unsubscribe",
    "ping": "on_ping",
}

# Reads run on the shared thread pool, in parallel (a reconnect storm is mostly reads). Writes
# stay on Channels' single thread-sensitive thread: a process then commits and publishes one
# message at a time, so its broadcasts leave in seq order.
read_db = functools.partial(database_sync_to_async, thread_sensitive=False)


class HubConsumer(AsyncWebsocketConsumer):
    # No channel-layer channel per socket: room messages and hub events arrive through the
    # process's fan-out hub. A per-socket channel would cost a layer receive loop per socket and
    # tie every socket's life to Redis (channels_redis raises out of the consumer when it goes).
    channel_layer = None
    groups: tuple[str, ...] = ()  # shared, so Channels does not give every socket a list

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_id = uuid.uuid4().hex[:16]
        self.frames_received = 0
        self.user: Any = None
        self.user_id = 0  # no user has id 0: the hub's per-user index ignores it
        self.username = ""
        self.hub: FanoutHub = hub()
        # A shared empty frozenset until the first subscribe: most sockets never subscribe.
        self.topics: set[str] | frozenset[str] = _NO_TOPICS
        self.rooms: dict[str, int] = {}
        self.attached = False
        self.counted = False
        self.released = False
        self.closing = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The connection's catch-all: an exception that escapes connect, a frame's own
        catch-all or disconnect is logged once (with the connection's correlation id), the
        socket is closed with 1011, and `_release` runs on every exit path.

        Replaces Channels' `AsyncConsumer.__call__`, whose `await_many_dispatch` keeps a task,
        a future and an `asyncio.wait` frame per socket to wait on one source (this consumer
        has no channel-layer channel). The log context is bound in the server's per-connection
        task, where it ends with the connection (no context-manager generator kept alive)."""
        self.scope = scope
        self.base_send = send
        self.outbox = Outbox(
            send, settings.REALTIME_SEND_BUFFER_FRAMES, self._overflow, self._outbox_failed
        )
        structlog.contextvars.bind_contextvars(ws_connection=self.connection_id)
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        except Exception as error:
            if isinstance(error, OSError):  # the client went away (ClientDisconnected)
                logger.info("realtime_ws_client_gone", error=str(error))
            else:
                logger.exception("realtime_ws_consumer_failed")
                console_count("realtime.socket_errors")
            await self._close_transport(CLOSE_INTERNAL_ERROR)
        finally:
            await self._release()

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale DB connections before every frame with a thread hop; the
        # handlers reach the database only through database_sync_to_async, which does it there.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        await self.accept()
        if self.user is None or not self.user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user_id = self.user.pk
        self.username = self.user.username
        self.bucket = protocol.TokenBucket(
            settings.REALTIME_RATE_PER_SECOND, settings.REALTIME_RATE_BURST
        )
        self.violation = protocol.Violation()
        CONNECTIONS.inc()
        self.counted = True
        await self.hub.start()
        self.hub.attach(self)
        self.attached = True
        if settings.REALTIME_AUTOJOIN_DEFAULT_ROOM:
            try:
                await self._join(settings.REALTIME_DEFAULT_ROOM, ref=None, announce=False)
            except ApplicationError:
                logger.exception("realtime_default_room_join_failed")

    async def disconnect(self, code: int) -> None:
        await self._release()

    # --- cleanup: the same on every exit path -------------------------------------------------

    def _release_local(self) -> list[int]:
        """Drop the connection from this process's state once: the gauge, the outbox, the hub's
        user, topic and room indexes. Returns the rooms whose presence is still to be left."""
        if self.released:
            return []
        self.released = True
        self.attached = False
        if self.counted:
            self.counted = False
            CONNECTIONS.dec()
        self.outbox.close()
        room_ids = list(self.rooms.values())
        self.hub.release(self, room_ids, self.topics)
        self.rooms.clear()
        self.topics = _NO_TOPICS
        return room_ids

    async def _presence_release(self, room_ids: list[int]) -> None:
        for room_id in room_ids:
            try:
                await self.hub.room_remove(room_id, self)
            except Exception:
                logger.exception("realtime_ws_presence_release_failed", room_id=room_id)

    async def _release(self) -> None:
        """Everything `_release_local` does, then leave presence; idempotent. Shielded, so a
        cancelled consumer still leaves presence (the user must not stay online forever)."""
        room_ids = self._release_local()
        if room_ids:
            await asyncio.shield(self._presence_release(room_ids))

    async def _close_transport(self, code: int) -> None:
        """Send a close frame with `code`; abort the transport when even that fails."""
        self.outbox.close()
        send = getattr(self, "base_send", None)  # unset if Channels failed before dispatching
        if send is None:
            return
        try:
            await send({"type": "websocket.close", "code": code})
        except Exception:
            transport = _transport_of(send)
            if transport is not None:
                transport.abort()

    async def _outbox_failed(self, error: Exception) -> None:
        """A frame could not be written: close with 1011 so the client reconnects and syncs."""
        # The writer task inherited the context of whoever queued first (a frame, the hub).
        structlog.contextvars.unbind_contextvars("request_id")
        structlog.contextvars.bind_contextvars(ws_connection=self.connection_id)
        try:
            if isinstance(error, OSError):  # the client is gone (uvicorn's ClientDisconnected)
                logger.info("realtime_ws_send_failed_disconnected", error=str(error))
            else:
                logger.error("realtime_ws_send_failed", exc_info=error)
                console_count("realtime.socket_errors")
            room_ids = self._release_local()
            await self._close_transport(CLOSE_INTERNAL_ERROR)
            if room_ids:
                await asyncio.shield(self._presence_release(room_ids))
        except Exception:
            logger.exception("realtime_ws_send_failure_cleanup_failed")

    def __hash__(self) -> int:
        return id(self)

    # --- receiving: the one place a frame's failures become an error frame -------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Parse, rate-check and handle one frame. A refusal (`ApplicationError`) is answered
        with `error {code, detail, ref}` (plus `field` and `reason` for a refused value); any
        other exception with `error {code: "internal"}` and the frame's `request_id`, logged
        once. Either way the socket stays open."""
        if not self.attached or self.closing:
            return  # refused (4401), closing, dropped or released: frames in flight are ignored
        self.frames_received += 1
        request_id = f"ws-{self.connection_id}-{self.frames_received}"
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            ref: str | int | None = None
            try:
                refused: ApplicationError | None = None
                try:
                    raw = text_data if text_data is not None else (bytes_data or b"")
                    frame = protocol.frame_decode(raw, max_bytes=settings.REALTIME_MAX_FRAME_BYTES)
                    ref = protocol.ref_field(frame)
                except ApplicationError as error:
                    refused = error
                    if isinstance(error, InvalidValue) and error.reason in ("encoding", "control"):
                        ref = protocol.ref_salvage(raw)
                # Every frame costs a token, a refused one too, so bad frames are rate-limited.
                await self._rate_check()
                if refused is not None:
                    raise refused
                handler = protocol.frame_type(frame, choices=HANDLERS)
                await getattr(self, handler)(frame, ref)
            except ApplicationError as error:
                self._refuse(error, ref)
            except Exception:
                logger.exception("realtime_ws_frame_failed")
                console_count("realtime.socket_errors")
                await self.send_frame(
                    {
                        "type": "error",
                        "code": "internal",
                        "detail": "internal error",
                        "request_id": request_id,
                        "ref": ref,
                    }
                )

    def _refuse(self, error: ApplicationError, ref: str | int | None) -> None:
        frame: Frame = {"type": "error", "code": error.code, "detail": error.message, "ref": ref}
        if isinstance(error, InvalidValue):
            frame["field"] = error.field
            frame["reason"] = error.reason
        self.outbox.push(dumps(frame))

    async def _rate_check(self) -> None:
        """Charge one token of the connection's bucket and one frame of the user's budget
        (global across processes with Redis); raise `RateLimited` without both. A violation that
        has lasted `REALTIME_RATE_STRIKE_SECONDS` queues the closing error frame and close 1008
        instead."""
        # The user's budget is charged too, so that opening more tabs, here or on another
        # process, does not multiply a user's rate; only for frames the connection admits, so a
        # flood on one socket neither spends the user's budget on frames it refuses nor costs
        # a Redis reservation per frame.
        allowed = self.bucket.take() and await self.hub.user_frame_allowed(self.user_id)
        if allowed:
            return
        lasted = self.violation.refused()
        limit = settings.REALTIME_RATE_STRIKE_SECONDS
        if lasted >= limit:
            self.closing = True
            logger.warning("realtime_ws_rate_limit_closed", user_id=self.user_id, seconds=lasted)
            detail = (
                f"frames were rate-limited for {limit:g} s in a row "
                f"(at most {settings.REALTIME_RATE_PER_SECOND:g} frames/s per connection): closing"
            )
            self.outbox.push(
                dumps({"type": "error", "code": "rate_limit_exceeded", "detail": detail})
            )
            self.outbox.push_close(CLOSE_POLICY_VIOLATION, reason="rate limit exceeded")
        raise RateLimited("slow down", code="rate_limited")

    # --- sending ----------------------------------------------------------------------------

    async def send_frame(self, frame: Frame) -> None:
        self.outbox.push(dumps(frame))

    def _overflow(self) -> None:
        """The client stopped reading and its outbox is full: drop it, and it alone."""
        SLOW_CLIENTS.inc()
        console_count("realtime.socket_errors")
        logger.warning(
            "realtime_slow_client_dropped", user_id=self.user_id, ws_connection=self.connection_id
        )
        room_ids = self._release_local()
        if room_ids:
            _spawn(self._presence_release(room_ids))
        # A close frame would wait behind the full buffer forever: abort.
        transport = _transport_of(self.base_send)
        if transport is not None:
            transport.abort()
        else:
            _spawn(self.close(code=1013))

    def hub_kicked(self, room_id: int) -> None:
        for slug, joined_id in list(self.rooms.items()):
            if joined_id == room_id:
                del self.rooms[slug]
                self.outbox.push(dumps({"type": "left", "room": slug, "reason": "removed"}))
                _spawn(self._presence_release([room_id]))

    # --- messenger: handlers get a parsed-on-demand frame and its already validated ref --------

    async def on_send_message(self, frame: Frame, ref: Ref) -> None:
        slug = protocol.room_field(frame, required=False)
        text = protocol.text_field(frame, max_chars=settings.REALTIME_MAX_MESSAGE_CHARS)
        client_id = protocol.client_id_field(frame)
        room, message, created = await database_sync_to_async(services.room_message_send)(
            user=self.user, slug=slug, text=text, client_id=client_id
        )
        ack = {"type": "ack", "ref": ref, "room": room.slug, "id": message.pk}
        await self.send_frame({**ack, "seq": message.seq, "duplicate": not created})

    async def on_join(self, frame: Frame, ref: Ref) -> None:
        slug = protocol.room_field(frame)
        assert slug is not None
        await self._join(slug, ref=ref)

    async def _join(self, slug: str, *, ref: Ref, announce: bool = True) -> None:
        """Start delivering the room and count the user present in it. The automatic join of
        the default room on connect sends this socket no frames (`announce=False`: the client
        joins it explicitly to get `joined` and the snapshot), but the user is online there
        for everyone else at once."""
        room: Room = await read_db(services.room_resolve)(user=self.user, slug=slug)
        if room.slug not in self.rooms:
            if len(self.rooms) >= settings.REALTIME_MAX_ROOMS_PER_CONNECTION:
                raise ValidationFailed("too many rooms", code="too_many_rooms")
            self.rooms[room.slug] = room.pk
        online, partial = await self.hub.room_add(room.pk, room.slug, self, watch=announce)
        if not announce:
            return
        await self.send_frame(
            {"type": "joined", "room": room.slug, "last_seq": room.last_seq, "ref": ref}
        )
        # `partial`: Redis is unreachable, the snapshot has this server's users only.
        await self.send_frame(presence_snapshot_frame(room.slug, online, partial=partial))

    def _joined_room(self, frame: Frame) -> tuple[str, int]:
        slug = protocol.room_field(frame)
        assert slug is not None
        room_id = self.rooms.get(slug)
        if room_id is None:
            raise ValidationFailed("join the room first", code="not_joined")
        return slug, room_id

    async def on_leave(self, frame: Frame, ref: Ref) -> None:
        slug, room_id = self._joined_room(frame)
        del self.rooms[slug]
        await self.hub.room_remove(room_id, self)
        await self.send_frame({"type": "left", "room": slug, "ref": ref})

    async def on_history(self, frame: Frame, ref: Ref) -> None:
        slug = protocol.room_field(frame)
        before_seq = protocol.seq_field(frame, "before_seq", required=False)
        limit = protocol.limit_field(frame, maximum=settings.REALTIME_HISTORY_LIMIT)
        assert slug is not None
        batch = await read_db(services.room_history)(
            user=self.user, slug=slug, before_seq=before_seq, limit=limit
        )
        await self.send_frame({"type": "history", **batch, "ref": ref})

    async def on_sync(self, frame: Frame, ref: Ref) -> None:
        slug = protocol.room_field(frame)
        after_seq = protocol.seq_field(frame, "after_seq", required=True)
        assert slug is not None and after_seq is not None
        room: Room = await read_db(services.room_resolve)(user=self.user, slug=slug)
        missed = room.last_seq - after_seq
        if missed <= settings.REALTIME_SYNC_LIMIT:
            cached = self.hub.recent_range(room.pk, after_seq + 1, room.last_seq)
            if cached is not None:
                head = {"type": "sync", "room": room.slug, "last_seq": room.last_seq}
                head |= {"reset_required": False, "ref": ref}
                self.outbox.push(dumps_with_encoded(head, "messages", cached))
                return
        batch = await read_db(selectors.messages_sync)(
            room=room, after_seq=after_seq, bound=settings.REALTIME_SYNC_LIMIT
        )
        await self.send_frame({"type": "sync", **batch, "ref": ref})

    async def on_typing(self, frame: Frame, ref: Ref) -> None:
        slug, room_id = self._joined_room(frame)
        typing = {"type": "typing", "room": slug, "user": self.username, "user_id": self.user_id}
        await self.hub.apublish(
            {"room": room_id, "frame": dumps(typing), "skip_user": self.user_id}
        )

    async def on_read(self, frame: Frame, ref: Ref) -> None:
        slug = protocol.room_field(frame)
        seq = protocol.seq_field(frame, "seq", required=True)
        assert slug is not None and seq is not None
        marker = await database_sync_to_async(services.room_read_mark)(
            user=self.user, slug=slug, seq=seq
        )
        await self.send_frame({"type": "read", "room": slug, "seq": marker, "ref": ref})

    # --- live-event hub -----------------------------------------------------------------------

    async def on_ping(self, frame: Frame, ref: Ref) -> None:
        await self.send_frame({"type": "pong", "ref": ref})

    async def on_subscribe(self, frame: Frame, ref: Ref) -> None:
        topic = protocol.topic_field(frame)
        topic_authorize(user=self.user, topic=topic)
        if topic not in self.topics:
            if len(self.topics) >= settings.REALTIME_MAX_TOPICS_PER_CONNECTION:
                raise ValidationFailed("too many subscriptions", code="too_many_topics")
            self.hub.topic_add(topic, self)
            if isinstance(self.topics, frozenset):
                self.topics = set()
            self.topics.add(topic)
        await self.send_frame({"type": "subscribed", "topic": topic, "ref": ref})

    async def on_unsubscribe(self, frame: Frame, ref: Ref) -> None:
        topic = protocol.topic_field(frame)
        if topic not in self.topics:
            raise ValidationFailed("not subscribed to that topic", code="not_subscribed")
        self.hub.topic_remove(topic, self)
        assert isinstance(self.topics, set)
        self.topics.discard(topic)
        await self.send_frame({"type": "unsubscribed", "topic": topic, "ref": ref})
