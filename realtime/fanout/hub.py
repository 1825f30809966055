"""The fan-out hub: one per process, it owns the process's sockets indexed by room, user and
topic, and writes each event once per process.

A room event (message, presence, typing) is published once: with REDIS_URL to one Redis pub/sub
channel that every process subscribes to once, so every process receives it exactly once and
writes it to its own sockets; without Redis straight to this process's sockets. The frame is
encoded once per event, and writing to a socket only appends to that connection's bounded
outbox (`outbox.Outbox`), so one slow client never delays the others (Channels' group_send would
cost one channel-layer message per socket).

Redis pub/sub is at-most-once: messages published while the subscription is down are lost. They
are in the database with a gap-free `seq`; clients notice the gap and `sync`, and the hub tells
its sockets to `sync` when its subscription comes back.
"""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import structlog
from django.conf import settings
from prometheus_client import Counter
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from realtime.fanout.limits import RedisWindows, UserFrameLimit
from realtime.fanout.outbox import Outbox, dumps
from realtime.fanout.presence import (
    MemoryPresence,
    OnlineUser,
    PresenceUnavailable,
    RedisPresence,
    member_key,
    member_parse,
)
from realtime.fanout.recent import RecentFrames
from realtime.fanout.redis_clients import async_redis_client_options, redis_client_options

logger = structlog.get_logger(__name__)

DELIVERIES = Counter("realtime_fanout_deliveries_total", "Frames queued to local sockets")
EVENTS = Counter("realtime_fanout_events_total", "Room events published", ["outcome"])

T = TypeVar("T")


class Connection(Protocol):
    """What the hub needs of a socket (the consumer): who it is and its outbox."""

    user_id: int
    username: str
    outbox: Outbox

    def hub_kicked(self, room_id: int) -> None: ...


class FanoutHub:
    """One per process. Runs on the loop that serves the WebSockets; `publish_threadsafe` may
    be called from any thread (e.g. a transaction's on_commit in a sync worker thread).

    Redis outages degrade, never raise: while Redis is unreachable (a failed call marks it down
    for `REDIS_RETRY_SECONDS`, so an outage costs one timeout per second, not one per call)
    events reach this process's sockets only, joins answer a presence snapshot of this process
    marked `partial`, and presence diffs are this process's. When Redis answers again the
    listener resubscribes, tells every socket to `sync`, and re-announces this process's
    presence at once (the heartbeat would within a third of the TTL anyway).
    """

    REDIS_RETRY_SECONDS = 1.0

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.node = uuid.uuid4().hex[:12]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.by_room: dict[int, set[Connection]] = {}
        self.presence_conns: dict[int, set[Connection]] = {}
        # Sockets that joined a room explicitly get its presence diffs; a silent join (the
        # default room on connect) counts the user present without sending the socket frames
        # it never asked for.
        self.presence_watchers: dict[int, set[Connection]] = {}
        self.by_topic: dict[str, set[Connection]] = {}
        self.recent = RecentFrames()
        self.by_user: dict[int, set[Connection]] = {}
        self.user_limit = UserFrameLimit(channel)
        self.room_slugs: dict[int, str] = {}
        self.presence: MemoryPresence | RedisPresence = (
            RedisPresence(
                redis_url, channel, node=self.node, timeout=settings.REALTIME_REDIS_TIMEOUT_SECONDS
            )
            if redis_url
            else MemoryPresence()
        )
        self._pending_presence: dict[int, tuple[set[str], set[str]]] = {}
        self._presence_flush: asyncio.TimerHandle | None = None
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._sync_client: redis.Redis | None = None
        self._async_client: aioredis.Redis | None = None
        self._lock = threading.Lock()
        self._redis_down_until = 0.0
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop; with Redis, start the listener and the presence heartbeat
        and wait (at most 5 s, and only for the first attempt) until subscribed. While Redis is
        down a connect does not wait: it is served by this process."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self._rebind(loop)
        if not self.redis_url:
            return
        if self._listener is None or self._listener.done():
            self._listener = loop.create_task(self._listen())
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = loop.create_task(self._heartbeat())
        if not self._first_attempt.is_set():
            try:
                await asyncio.wait_for(self._first_attempt.wait(), 5)
            except TimeoutError:
                logger.warning("realtime_fanout_not_subscribed")

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new loop (tests start a server per test): loop-bound state starts afresh.
        self.loop = loop
        self.by_room, self.by_user, self.presence_conns, self.by_topic = {}, {}, {}, {}
        self.presence_watchers = {}
        self.recent = RecentFrames()
        if isinstance(self.presence, MemoryPresence):
            self.presence = MemoryPresence()
        else:
            self.presence.forget_client()
        self._first_attempt = asyncio.Event()
        self._listener = None
        self._heartbeat_task = None
        self._async_client = None
        self.user_limit = UserFrameLimit(self.channel)
        self._presence_flush = None
        self._pending_presence = {}
        self._background = set()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _listen(self) -> None:
        failed = False
        backoff = 0.05
        while True:
            # No socket_timeout: the subscription waits for messages indefinitely.
            client = aioredis.Redis.from_url(
                self.redis_url,
                health_check_interval=5,
                socket_connect_timeout=settings.REALTIME_REDIS_TIMEOUT_SECONDS,
                retry=AsyncRetry(NoBackoff(), 1),
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._first_attempt.set()
                self._redis_ok()
                if failed:
                    self._resync_all()
                    self._spawn(self.presence_refresh())
                failed = False
                backoff = 0.05
                async for item in pubsub.listen():
                    if item["type"] == "message":
                        self.deliver(json.loads(item["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not failed:  # once per outage, not once per retry
                    logger.warning("realtime_fanout_subscription_lost", error=str(error))
                failed = True
                self._first_attempt.set()
                self._redis_failed(error)
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

    # --- Redis health ----------------------------------------------------------------------

    def redis_usable(self) -> bool:
        """False for `REDIS_RETRY_SECONDS` after a Redis call failed (no Redis: always True)."""
        return time.monotonic() >= self._redis_down_until

    def _redis_failed(self, error: Exception) -> None:
        if self._redis_down_until == 0.0:
            logger.warning("realtime_redis_unavailable", error=str(error))
        self._redis_down_until = time.monotonic() + self.REDIS_RETRY_SECONDS

    def _redis_ok(self) -> None:
        if self._redis_down_until != 0.0:
            logger.info("realtime_redis_available")
            self._redis_down_until = 0.0

    # --- registry --------------------------------------------------------------------------

    def attach(self, connection: Connection) -> None:
        """Index an authenticated socket by its user (direct rooms and kicks reach it)."""
        self.by_user.setdefault(connection.user_id, set()).add(connection)

    def detach(self, connection: Connection) -> None:
        """Forget the socket's user index entry (and the user's local rate state with their
        last one)."""
        connections = self.by_user.get(connection.user_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_user[connection.user_id]
                self.user_limit.forget(connection.user_id)

    def release(
        self, connection: Connection, room_ids: Iterable[int], topics: Iterable[str]
    ) -> None:
        """Drop `connection` from every local index: its user, `topics` and the delivery of
        `room_ids` (presence is left separately, `room_remove`, as it may await Redis)."""
        self.detach(connection)
        for topic in topics:
            self.topic_remove(topic, connection)
        for room_id in room_ids:
            self.room_stop_delivery(room_id, connection)

    async def user_frame_allowed(self, user_id: int) -> bool:
        """Charge one frame to the user's budget, which all of their sockets on every process
        share (`limits.UserFrameLimit`: REALTIME_USER_RATE_BURST frames per burst/rate seconds);
        False when it is spent. Mostly answered from this process's lease without a round trip.
        Never raises: while Redis is unreachable the budget is this process's."""
        rate = settings.REALTIME_USER_RATE_PER_SECOND
        burst = settings.REALTIME_USER_RATE_BURST
        limit = self.user_limit
        decision = limit.take_local(user_id, rate, burst)
        if decision is not None:
            return decision
        if self.redis_url and self.redis_usable():
            try:
                allowed = await limit.reserve(user_id, rate, burst, RedisWindows(self._aclient()))
            except Exception as error:
                self._redis_failed(error)
                logger.debug("realtime_user_limit_unavailable", error=str(error))
            else:
                self._redis_ok()
                return allowed
        return await limit.reserve(user_id, rate, burst, limit.memory)

    async def room_add(
        self,
        room_id: int,
        slug: str,
        connection: Connection,
        *,
        presence: bool = True,
        watch: bool = True,
    ) -> tuple[list[str], bool]:
        """Deliver the room's events to `connection`. With `presence`, the user counts as online
        there (once, however many of their sockets joined); with `watch`, the socket also gets
        the room's presence diffs. Returns the online members and
        whether that list is partial (this process's only: Redis is unreachable)."""
        self.room_slugs[room_id] = slug
        self.by_room.setdefault(room_id, set()).add(connection)
        if watch:
            self.presence_watchers.setdefault(room_id, set()).add(connection)
        if not presence:
            return [], False
        present = self.presence_conns.setdefault(room_id, set())
        if connection not in present:
            first_here = not any(c.user_id == connection.user_id for c in present)
            present.add(connection)
            if first_here:
                member = member_key(connection.user_id, connection.username)
                added = await self._presence_call(
                    self.presence.add(room_id, member, self._ttl_ms())
                )
                # Unreachable Redis: this process's view (the heartbeat announces it later).
                if added is None or added:
                    self._presence_note(room_id, member, joined=True)
        online = await self._presence_call(self.presence.members(room_id))
        if online is None:
            return self._local_members(room_id), True
        return online, False

    def _local_members(self, room_id: int) -> list[str]:
        present = self.presence_conns.get(room_id, ())
        return sorted({member_key(c.user_id, c.username) for c in present})

    def room_stop_delivery(self, room_id: int, connection: Connection) -> None:
        """Stop delivering the room's events to the socket (presence untouched)."""
        for index in (self.by_room, self.presence_watchers):
            connections = index.get(room_id)
            if connections is not None:
                connections.discard(connection)
                if not connections:
                    del index[room_id]

    async def room_remove(self, room_id: int, connection: Connection) -> None:
        """Stop delivering the room to the socket and withdraw its presence there; the user
        is reported `left` once their last socket in the room is gone (on every process when
        Redis is configured). Never raises for a Redis outage."""
        self.room_stop_delivery(room_id, connection)
        present = self.presence_conns.get(room_id)
        if present is None or connection not in present:
            return
        present.discard(connection)
        if not present:
            del self.presence_conns[room_id]
        if not any(c.user_id == connection.user_id for c in present):
            member = member_key(connection.user_id, connection.username)
            removed = await self._presence_call(self.presence.remove(room_id, member))
            # Unreachable Redis: the entry expires within the TTL; this process saw them leave.
            if removed is None or removed:
                self._presence_note(room_id, member, joined=False)

    async def _presence_call(self, call: Awaitable[T]) -> T | None:
        """Presence is advisory: while Redis is unreachable joins and leaves still work, and
        None says "unknown" (no call is made while Redis is marked down)."""
        if not self.redis_usable():
            if asyncio.iscoroutine(call):
                call.close()
            return None
        try:
            result = await call
        except Exception as error:
            self._redis_failed(error)  # logs once per outage
            logger.debug("realtime_presence_unavailable", error=str(error))
            return None
        if self.redis_url:
            self._redis_ok()
        return result

    def _ttl_ms(self) -> int:
        return int(settings.REALTIME_PRESENCE_TTL_SECONDS * 1000)

    async def _heartbeat(self) -> None:
        """Every third of the presence TTL: `presence_refresh`."""
        while True:
            await asyncio.sleep(settings.REALTIME_PRESENCE_TTL_SECONDS / 3)
            try:
                await self.presence_refresh()
            except Exception:
                logger.exception("realtime_presence_refresh_failed")

    async def presence_refresh(self) -> None:
        """Re-announce this process's presence entries (which rebuilds them after Redis
        restarted empty) and sweep the expired entries of the rooms it serves: a user whose
        every entry expired (their process died) is reported `left` to the local sockets."""
        snapshot = {
            room_id: {member_key(c.user_id, c.username) for c in connections}
            for room_id, connections in self.presence_conns.items()
            if connections
        }
        if not self.redis_url:
            return
        try:
            changes = await self.presence.refresh(snapshot, self._ttl_ms())
        except Exception as error:
            self._redis_failed(error)  # logs once per outage
            logger.debug("realtime_presence_refresh_unavailable", error=str(error))
            return
        self._redis_ok()
        for room_id, departed in changes.gone.items():
            for member in departed:
                self._presence_note(room_id, member, joined=False)
        for room_id, members in snapshot.items():
            present = set(self._local_members(room_id))
            for member in changes.arrived.get(room_id, ()):
                if member in present:
                    self._presence_note(room_id, member, joined=True)
            # A leave that raced the refresh may have been re-announced by it: withdraw it
            # again (its `left` diff has gone out already).
            for member in members - present:
                await self._presence_call(self.presence.remove(room_id, member))

    def topic_add(self, topic: str, connection: Connection) -> None:
        """Deliver hub events of `topic` to the socket (the caller has authorized it)."""
        self.by_topic.setdefault(topic, set()).add(connection)

    def topic_remove(self, topic: str, connection: Connection) -> None:
        """Stop delivering `topic` to the socket; idempotent."""
        connections = self.by_topic.get(topic)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_topic[topic]

    def presence_online(self, room_id: int) -> list[OnlineUser]:
        """Online users of a room, from any thread. Raises `PresenceUnavailable` while Redis
        cannot be reached."""
        try:
            members = self.presence.members_sync(room_id)
        except redis.RedisError as error:
            self._redis_failed(error)
            raise PresenceUnavailable(str(error)) from error
        return [member_parse(m) for m in members]

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
            self._spawn(self.apublish({"room": room_id, "frame": dumps(frame), "presence": True}))

    # --- publish ---------------------------------------------------------------------------

    def _redis_sync(self) -> redis.Redis:
        with self._lock:
            if self._sync_client is None:
                self._sync_client = redis.Redis.from_url(
                    self.redis_url,
                    **redis_client_options(settings.REALTIME_REDIS_TIMEOUT_SECONDS),
                )
            return self._sync_client

    def _aclient(self) -> aioredis.Redis:
        """The hub loop's Redis client for publishes and rate reservations."""
        if self._async_client is None:
            self._async_client = aioredis.Redis.from_url(
                self.redis_url,
                **async_redis_client_options(settings.REALTIME_REDIS_TIMEOUT_SECONDS),
            )
        return self._async_client

    def publish_threadsafe(self, envelope: dict[str, Any]) -> None:
        """Publish from any thread; never raises (the fact is in the database). While Redis is
        unreachable the event reaches this process's sockets only."""
        if self.redis_url and self.redis_usable():
            try:
                self._redis_sync().publish(self.channel, json.dumps(envelope))
            except Exception as error:
                self._redis_failed(error)
            else:
                self._redis_ok()
                EVENTS.labels("sent").inc()
                return
        self._publish_locally(envelope)

    async def apublish(self, envelope: dict[str, Any]) -> None:
        """Publish from the hub's loop; never raises (see `publish_threadsafe`)."""
        if self.redis_url and self.redis_usable():
            try:
                await self._aclient().publish(self.channel, json.dumps(envelope))
            except Exception as error:
                self._redis_failed(error)
            else:
                self._redis_ok()
                EVENTS.labels("sent").inc()
                return
        self._publish_locally(envelope)

    def _publish_locally(self, envelope: dict[str, Any]) -> None:
        try:
            self._deliver_on_loop(envelope)
        except Exception:
            EVENTS.labels("error").inc()
            logger.exception("realtime_fanout_publish_failed", room=envelope.get("room"))
        else:
            EVENTS.labels("local_only" if self.redis_url else "sent").inc()

    def recent_range(self, room_id: int, first: int, last: int) -> list[str] | None:
        """The encoded message frames `first..last` of a room if this process holds every one of
        them (`RecentFrames.range`); else None."""
        return self.recent.range(room_id, first, last)

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
            self.recent.remember(room_id, seq, envelope["frame"])
        evict = envelope.get("evict_seq")
        if evict is not None:
            self.recent.evict(room_id, evict)
        kick = envelope.get("kick_user")
        if kick is not None:
            for connection in list(self.by_room.get(room_id, ())):
                if connection.user_id == kick:
                    connection.hub_kicked(room_id)
            return
        text = envelope["frame"]
        index = self.presence_watchers if envelope.get("presence") else self.by_room
        targets: set[Connection] | list[Connection] = index.get(room_id, set())
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
    """This process's hub (created on first use from REDIS_URL and REALTIME_FANOUT_CHANNEL)."""
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = FanoutHub(settings.REDIS_URL, settings.REALTIME_FANOUT_CHANNEL)
        return _hub
