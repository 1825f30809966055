"""The node-local fan-out hub of the messenger.

Each process keeps its own sockets indexed by room and by user. A room event (message, presence,
typing) is published once: with REDIS_URL to one Redis pub/sub channel that every process
subscribes to once, so every process receives it exactly once and writes it to its own sockets;
without Redis straight to this process's sockets. The frame is encoded once per event, and
writing to a socket only appends to that connection's bounded outbox, so one slow client never
delays the others (Channels' group_send would cost one channel-layer message per socket).

Redis pub/sub is at-most-once: messages published while the subscription is down are lost. They
are in the database with a gap-free `seq`; clients notice the gap and `sync`, and the hub tells
its sockets to `sync` when its subscription comes back.
"""

import asyncio
import json
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import structlog
from django.conf import settings
from prometheus_client import Counter

from realtime.protocol import TokenBucket

logger = structlog.get_logger(__name__)

DELIVERIES = Counter("realtime_fanout_deliveries_total", "Frames queued to local sockets")
EVENTS = Counter("realtime_fanout_events_total", "Room events published", ["outcome"])
SLOW_CLIENTS = Counter("realtime_slow_clients_dropped_total", "Sockets dropped on overflow")

T = TypeVar("T")
Send = Callable[[dict[str, Any]], Awaitable[None]]


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class Outbox:
    """A connection's bounded outgoing buffer, drained by a writer task that exists only while
    frames are pending. Overflow calls `on_overflow` once and drops everything after. A write
    that raises (the transport refused the frame) closes the outbox and awaits `on_failure`
    with the exception, which must close the transport so the client reconnects and recovers
    (`input-policy.md`); it must not raise."""

    __slots__ = ("_on_failure", "_on_overflow", "_queue", "_send", "_writer", "closed", "limit")

    def __init__(
        self,
        send: Send,
        limit: int,
        on_overflow: Callable[[], None],
        on_failure: Callable[[Exception], Awaitable[None]] | None = None,
    ) -> None:
        self._send = send
        self._queue: deque[str | int] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._on_overflow = on_overflow
        self._on_failure = on_failure
        self.limit = limit
        self.closed = False

    def push(self, text: str) -> None:
        if self.closed:
            return
        if len(self._queue) >= self.limit:
            self.close()
            self._on_overflow()
            return
        self._append(text)

    def push_close(self, code: int) -> None:
        """Close the socket after the frames already queued; nothing is queued after it."""
        if not self.closed:
            self._append(code)
            self.closed = True

    def _append(self, item: str | int) -> None:
        self._queue.append(item)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def close(self) -> None:
        self.closed = True
        self._queue.clear()

    async def _drain(self) -> None:
        try:
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, int):
                    await self._send({"type": "websocket.close", "code": item})
                    self._queue.clear()
                else:
                    await self._send({"type": "websocket.send", "text": item})
        except Exception as error:
            self.close()
            if self._on_failure is not None:
                await self._on_failure(error)
        finally:
            self._writer = None


class Connection(Protocol):
    user_id: int
    username: str
    outbox: Outbox

    def hub_kicked(self, room_id: int) -> None: ...


class MemoryPresence:
    """Per-room count of processes where a user is online (just this one without Redis)."""

    def __init__(self) -> None:
        self.rooms: dict[int, dict[str, int]] = {}

    async def add(self, room_id: int, member: str) -> bool:
        room = self.rooms.setdefault(room_id, {})
        room[member] = room.get(member, 0) + 1
        return room[member] == 1

    async def remove(self, room_id: int, member: str) -> bool:
        room = self.rooms.get(room_id, {})
        count = room.get(member, 0) - 1
        if count > 0:
            room[member] = count
            return False
        room.pop(member, None)
        if not room:
            self.rooms.pop(room_id, None)
        return count == 0

    async def members(self, room_id: int) -> list[str]:
        return list(self.rooms.get(room_id, {}))

    def members_sync(self, room_id: int) -> list[str]:
        return list(self.rooms.get(room_id, {}))


_INCR = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


class RedisPresence:
    """The same counts in one Redis hash per room, shared by every process."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._client: aioredis.Redis | None = None

    def key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}"

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(self.url, decode_responses=True)
        return self._client

    async def add(self, room_id: int, member: str) -> bool:
        return int(await self.client.eval(_INCR, 1, self.key(room_id), member, "1")) == 1  # type: ignore[misc]

    async def remove(self, room_id: int, member: str) -> bool:
        return int(await self.client.eval(_INCR, 1, self.key(room_id), member, "-1")) == 0  # type: ignore[misc]

    async def members(self, room_id: int) -> list[str]:
        return list(await self.client.hkeys(self.key(room_id)))  # type: ignore[misc]

    def members_sync(self, room_id: int) -> list[str]:
        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            return list(client.hkeys(self.key(room_id)))  # type: ignore[arg-type]
        finally:
            client.close()


def member_key(user_id: int, username: str) -> str:
    # Django usernames cannot contain ':'.
    return f"{user_id}:{username}"


def member_parse(key: str) -> dict[str, Any]:
    user_id, _, username = key.partition(":")
    return {"id": int(user_id), "username": username}


class FanoutHub:
    """One per process. Runs on the loop that serves the WebSockets; `publish_threadsafe` may
    be called from any thread (e.g. a transaction's on_commit in a sync worker thread)."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.loop: asyncio.AbstractEventLoop | None = None
        self.by_room: dict[int, set[Connection]] = {}
        self.presence_conns: dict[int, set[Connection]] = {}
        self.by_topic: dict[str, set[Connection]] = {}
        self.recent: OrderedDict[int, dict[int, str]] = OrderedDict()
        self.by_user: dict[int, set[Connection]] = {}
        self.user_buckets: dict[int, TokenBucket] = {}
        self.room_slugs: dict[int, str] = {}
        self.presence: MemoryPresence | RedisPresence = (
            RedisPresence(redis_url, channel) if redis_url else MemoryPresence()
        )
        self._pending_presence: dict[int, tuple[set[str], set[str]]] = {}
        self._presence_flush: asyncio.TimerHandle | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._sync_client: redis.Redis | None = None
        self._async_client: aioredis.Redis | None = None
        self._lock = threading.Lock()
        self.resubscribed = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop; with Redis, wait (bounded) until subscribed."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self._rebind(loop)
        if self.redis_url:
            if self._listener is None or self._listener.done():
                self._listener = loop.create_task(self._listen())
            try:
                await asyncio.wait_for(self._listening.wait(), 5)
            except TimeoutError:
                logger.warning("realtime_fanout_not_subscribed")

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new loop (tests start a server per test): loop-bound state starts afresh.
        self.loop = loop
        self.by_room, self.by_user, self.presence_conns, self.by_topic = {}, {}, {}, {}
        self.recent = OrderedDict()
        if isinstance(self.presence, MemoryPresence):
            self.presence = MemoryPresence()
        self._listening = asyncio.Event()
        self._listener = None
        self._async_client = None
        self._presence_flush = None
        self._pending_presence = {}
        if isinstance(self.presence, RedisPresence):
            self.presence._client = None

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _listen(self) -> None:
        first = True
        backoff = 0.05
        while True:
            client = aioredis.Redis.from_url(self.redis_url, health_check_interval=5)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._listening.set()
                if not first:
                    self.resubscribed += 1
                    self._resync_all()
                first = False
                backoff = 0.05
                async for item in pubsub.listen():
                    if item["type"] == "message":
                        self.deliver(json.loads(item["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._listening.clear()
                logger.warning("realtime_fanout_subscription_lost", error=str(error))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:
                    logger.debug("realtime_fanout_close_failed")

    def _resync_all(self) -> None:
        """Tell every local socket that events may have been missed while unsubscribed."""
        rooms_of: dict[Connection, list[str]] = {}
        for room_id, connections in self.by_room.items():
            for connection in connections:
                rooms_of.setdefault(connection, []).append(self.room_slugs.get(room_id, ""))
        for connections in self.by_user.values():
            for connection in connections:
                connection.outbox.push(
                    dumps({"type": "sync_required", "rooms": rooms_of.get(connection, [])})
                )

    # --- registry --------------------------------------------------------------------------

    def attach(self, connection: Connection) -> None:
        self.by_user.setdefault(connection.user_id, set()).add(connection)

    def detach(self, connection: Connection) -> None:
        connections = self.by_user.get(connection.user_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_user[connection.user_id]
                self.user_buckets.pop(connection.user_id, None)

    def user_bucket(self, user_id: int) -> TokenBucket:
        bucket = self.user_buckets.get(user_id)
        if bucket is None:
            bucket = self.user_buckets[user_id] = TokenBucket(
                settings.REALTIME_USER_RATE_PER_SECOND, settings.REALTIME_USER_RATE_BURST
            )
        return bucket

    async def room_add(
        self, room_id: int, slug: str, connection: Connection, *, presence: bool = True
    ) -> list[str]:
        """Deliver the room's events to `connection`. With `presence`, the user counts as online
        there (once, however many of their sockets joined); returns the online members."""
        self.room_slugs[room_id] = slug
        self.by_room.setdefault(room_id, set()).add(connection)
        if not presence:
            return []
        present = self.presence_conns.setdefault(room_id, set())
        if connection not in present:
            first_here = not any(c.user_id == connection.user_id for c in present)
            present.add(connection)
            if first_here:
                member = member_key(connection.user_id, connection.username)
                if await self._presence_call(self.presence.add(room_id, member)):
                    self._presence_note(room_id, member, joined=True)
        return await self._presence_call(self.presence.members(room_id)) or []

    def room_stop_delivery(self, room_id: int, connection: Connection) -> None:
        connections = self.by_room.get(room_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_room[room_id]

    async def room_remove(self, room_id: int, connection: Connection) -> None:
        self.room_stop_delivery(room_id, connection)
        present = self.presence_conns.get(room_id)
        if present is None or connection not in present:
            return
        present.discard(connection)
        if not present:
            del self.presence_conns[room_id]
        if not any(c.user_id == connection.user_id for c in present):
            member = member_key(connection.user_id, connection.username)
            if await self._presence_call(self.presence.remove(room_id, member)):
                self._presence_note(room_id, member, joined=False)

    async def _presence_call(self, call: Awaitable[T]) -> T | None:
        """Presence is advisory: while Redis is unreachable joins and leaves still work."""
        try:
            return await call
        except Exception as error:
            logger.warning("realtime_presence_unavailable", error=str(error))
            return None

    def topic_add(self, topic: str, connection: Connection) -> None:
        self.by_topic.setdefault(topic, set()).add(connection)

    def topic_remove(self, topic: str, connection: Connection) -> None:
        connections = self.by_topic.get(topic)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_topic[topic]

    def presence_online(self, room_id: int) -> list[dict[str, Any]]:
        """Online users of a room, from any thread."""
        return [member_parse(m) for m in self.presence.members_sync(room_id)]

    # --- presence diffs, coalesced per room ------------------------------------------------

    def _presence_note(self, room_id: int, member: str, *, joined: bool) -> None:
        pending_joined, pending_left = self._pending_presence.setdefault(room_id, (set(), set()))
        arrived, departed = (
            (pending_joined, pending_left) if joined else (pending_left, pending_joined)
        )
        # The last change wins; a join and a leave must not cancel out, because a snapshot
        # taken in between (another user's join) already showed the member online (or not).
        departed.discard(member)
        arrived.add(member)
        if self._presence_flush is None:
            assert self.loop is not None
            self._presence_flush = self.loop.call_later(
                settings.REALTIME_PRESENCE_FLUSH_MS / 1000, self._presence_send
            )

    def _presence_send(self) -> None:
        self._presence_flush = None
        pending, self._pending_presence = self._pending_presence, {}
        for room_id, (joined, left) in pending.items():
            if not joined and not left:
                continue
            frame = {
                "type": "presence",
                "room": self.room_slugs.get(room_id, ""),
                "joined": [member_parse(m) for m in sorted(joined)],
                "left": [member_parse(m) for m in sorted(left)],
            }
            assert self.loop is not None
            self.loop.create_task(self.apublish({"room": room_id, "frame": dumps(frame)}))

    # --- publish ---------------------------------------------------------------------------

    def _redis_sync(self) -> redis.Redis:
        with self._lock:
            if self._sync_client is None:
                self._sync_client = redis.Redis.from_url(self.redis_url)
            return self._sync_client

    def publish_threadsafe(self, envelope: dict[str, Any]) -> None:
        """Publish from any thread; never raises (the fact is in the database)."""
        try:
            if self.redis_url:
                self._redis_sync().publish(self.channel, json.dumps(envelope))
            else:
                self._deliver_on_loop(envelope)
        except Exception:
            EVENTS.labels("error").inc()
            logger.exception("realtime_fanout_publish_failed", room=envelope.get("room"))
        else:
            EVENTS.labels("sent").inc()

    async def apublish(self, envelope: dict[str, Any]) -> None:
        """Publish from the hub's loop; never raises."""
        try:
            if self.redis_url:
                if self._async_client is None:
                    self._async_client = aioredis.Redis.from_url(self.redis_url)
                await self._async_client.publish(self.channel, json.dumps(envelope))
            else:
                self._deliver_on_loop(envelope)
        except Exception:
            EVENTS.labels("error").inc()
            logger.exception("realtime_fanout_publish_failed", room=envelope.get("room"))
        else:
            EVENTS.labels("sent").inc()

    # --- recent messages, so that a reconnect storm's `sync` is served from memory ------------

    def _remember(self, room_id: int, seq: int, frame: str) -> None:
        frames = self.recent.get(room_id)
        if frames is None:
            frames = self.recent[room_id] = {}
            if len(self.recent) > settings.REALTIME_RECENT_ROOMS:
                self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(room_id)
        frames[seq] = frame
        if len(frames) > settings.REALTIME_RECENT_PER_ROOM:
            # Oldest inserted first; a rare out-of-order arrival only sends a sync to the DB.
            del frames[next(iter(frames))]

    def recent_range(self, room_id: int, first: int, last: int) -> list[str] | None:
        """The encoded message frames `first..last` if this process holds every one of them
        (it may have missed some, e.g. while its Redis subscription was down); else None."""
        frames = self.recent.get(room_id)
        if last < first:
            return []
        if frames is None:
            return None
        out = []
        for seq in range(first, last + 1):
            frame = frames.get(seq)
            if frame is None:
                return None
            out.append(frame)
        return out

    def _deliver_on_loop(self, envelope: dict[str, Any]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            EVENTS.labels("no_sockets").inc()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.deliver(envelope)
        else:
            loop.call_soon_threadsafe(self.deliver, envelope)

    # --- delivery (on the hub's loop) ------------------------------------------------------

    def deliver(self, envelope: dict[str, Any]) -> None:
        """Queue the event's frame to every local socket it concerns.

        Envelope: `room` (id) or `topic` (live-event hub), `frame` (encoded once), optional
        `users` (also reach these users' sockets without a join: direct rooms), `skip_user`,
        `kick_user` (membership removed).
        """
        topic = envelope.get("topic")
        if topic is not None:
            for connection in list(self.by_topic.get(topic, ())):
                connection.outbox.push(envelope["frame"])
            return
        room_id = envelope["room"]
        seq = envelope.get("seq")
        if seq is not None:
            self._remember(room_id, seq, envelope["frame"])
        evict = envelope.get("evict_seq")
        if evict is not None:
            self.recent.get(room_id, {}).pop(evict, None)
        kick = envelope.get("kick_user")
        if kick is not None:
            for connection in list(self.by_room.get(room_id, ())):
                if connection.user_id == kick:
                    connection.hub_kicked(room_id)
            return
        text = envelope["frame"]
        targets: set[Connection] | list[Connection] = self.by_room.get(room_id, set())
        users = envelope.get("users")
        if users:
            targets = set(targets)
            for user_id in users:
                targets |= self.by_user.get(user_id, set())
        skip = envelope.get("skip_user")
        count = 0
        for connection in list(targets):
            if connection.user_id != skip:
                connection.outbox.push(text)
                count += 1
        DELIVERIES.inc(count)


_hub: FanoutHub | None = None
_hub_lock = threading.Lock()


def hub() -> FanoutHub:
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = FanoutHub(settings.REDIS_URL, settings.REALTIME_FANOUT_CHANNEL)
        return _hub
