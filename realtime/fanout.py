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

Presence is per room and counts a user once however many sockets they have. Without Redis it is
this process's memory; with Redis it is global: each process announces its entries with an
expiry (`REALTIME_PRESENCE_TTL_SECONDS`) and re-announces them every third of it, so entries of a
process that died expire within the TTL and a Redis that restarted empty is refilled by the live
processes (`RedisPresence`).
"""

import asyncio
import json
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import structlog
from django.conf import settings
from prometheus_client import Counter
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

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
        self._queue: deque[str | tuple[int, str]] = deque()
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

    def push_close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code` and `reason` after the frames already queued; nothing is
        queued after it."""
        if not self.closed:
            self._append((code, reason))
            self.closed = True

    def _append(self, item: str | tuple[int, str]) -> None:
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
                if isinstance(item, tuple):
                    code, reason = item
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                    self._queue.clear()
                else:
                    await self._send({"type": "websocket.send", "text": item})
        except Exception as error:
            self.close()
            if self._on_failure is not None:
                await self._on_failure(error)
        finally:
            self._writer = None


class PresenceUnavailable(Exception):
    """Presence cannot be read: Redis is unreachable."""


class Connection(Protocol):
    user_id: int
    username: str
    outbox: Outbox

    def hub_kicked(self, room_id: int) -> None: ...


@dataclass
class PresenceChanges:
    """What a presence refresh found, per room id: members gone and members back."""

    gone: dict[int, list[str]] = field(default_factory=dict)
    arrived: dict[int, list[str]] = field(default_factory=dict)


class MemoryPresence:
    """Per-room count of this process's presence (the embedded mode: one process, no Redis, so
    nothing outlives the process and nothing needs to expire)."""

    def __init__(self) -> None:
        self.rooms: dict[int, dict[str, int]] = {}

    async def add(self, room_id: int, member: str, ttl_ms: int) -> bool:
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

    async def refresh(self, rooms: dict[int, set[str]], ttl_ms: int) -> "PresenceChanges":
        return PresenceChanges()


# Redis presence. Per room one sorted set of `<member>|<node>` entries scored by their expiry in
# Redis server milliseconds (`TIME`, so processes on other machines need no clock agreement), and
# one sorted set of the nodes (processes) with their expiry. A user is online in a room while one
# entry `<member>|<node>` of a live node has not expired. Every script answers whether the user
# is online on another node by probing that user's entry of each live node (a handful), never by
# scanning the room.
_LUA_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function live_nodes(nodes_key)
  return redis.call('ZRANGEBYSCORE', nodes_key, '(' .. now, '+inf')
end
local function online(room_key, member, nodes)
  for _, node in ipairs(nodes) do
    local score = redis.call('ZSCORE', room_key, member .. '|' .. node)
    if score and tonumber(score) > now then return true end
  end
  return false
end
"""

# KEYS: room, nodes. ARGV: member, node, ttl ms. 1 when the user was not online in the room.
_LUA_ADD = (
    _LUA_COMMON
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
local was_online = online(KEYS[1], ARGV[1], live_nodes(KEYS[2]))
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1] .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
if was_online then return 0 end
return 1
"""
)

# KEYS: room, nodes. ARGV: member, node. 1 when the user is no longer online in the room.
_LUA_REMOVE = (
    _LUA_COMMON
    + """
redis.call('ZREM', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
if online(KEYS[1], ARGV[1], live_nodes(KEYS[2])) then return 0 end
return 1
"""
)

# KEYS: room. The live entries.
_LUA_MEMBERS = (
    _LUA_COMMON
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""
)

# KEYS: nodes, room_1..room_n. ARGV: node, ttl ms, then per room: count, members.
# Re-announces the node and its entries, deletes every expired entry of those rooms (whichever
# node it was) and returns two lists of `index, member` pairs: users no longer online in room
# `index`, and users online there again (their entries were gone: Redis restarted empty, or
# this node was cut off for longer than the TTL).
_LUA_REFRESH = (
    _LUA_COMMON
    + """
local node = ARGV[1]
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, node)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
local nodes = live_nodes(KEYS[1])
local gone = {}
local arrived = {}
local at = 3
for k = 2, #KEYS do
  local key = KEYS[k]
  local count = tonumber(ARGV[at])
  at = at + 1
  for i = 1, count do
    local member = ARGV[at]
    if not online(key, member, nodes) then
      table.insert(arrived, k - 1)
      table.insert(arrived, member)
    end
    redis.call('ZADD', key, now + ttl, member .. '|' .. node)
    at = at + 1
  end
  redis.call('PEXPIRE', key, ttl)
  local dead = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local seen = {}
    for _, entry in ipairs(dead) do
      local member = string.match(entry, '^(.*)|[^|]*$')
      if member and not seen[member] then
        seen[member] = true
        if not online(key, member, nodes) then
          table.insert(gone, k - 1)
          table.insert(gone, member)
        end
      end
    end
  end
end
return {gone, arrived}
"""
)

#: Entries re-announced per script call, so one heartbeat never blocks Redis for long.
_REFRESH_BATCH = 2000


def redis_client_options(timeout: float) -> dict[str, Any]:
    """Connection options of every realtime Redis client: bounded waits and one immediate retry
    (a pooled connection broken by a Redis restart), instead of redis-py's default of three
    retries with backoff of up to 10 s, which would stall a publish for seconds in an outage."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
    }


def async_redis_client_options(timeout: float) -> dict[str, Any]:
    return {**redis_client_options(timeout), "retry": AsyncRetry(NoBackoff(), 1)}


class RedisPresence:
    """Presence shared by every process through Redis, with expiry.

    Each entry belongs to one node (process) and expires `ttl_ms` after it was last announced.
    A live node re-announces its entries on every `refresh` (the hub's heartbeat, a third of the
    TTL), which also rebuilds them after Redis restarted empty; a node that stops (crash, kill,
    partition) stops refreshing, and its entries expire within the TTL.
    """

    def __init__(self, url: str, prefix: str, *, node: str, timeout: float) -> None:
        self.url = url
        self.prefix = prefix
        self.node = node
        self.timeout = timeout
        self._client: aioredis.Redis | None = None
        self._sync_client: redis.Redis | None = None
        self._lock = threading.Lock()

    def key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}"

    @property
    def nodes_key(self) -> str:
        return f"{self.prefix}:presence:nodes"

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url, decode_responses=True, **async_redis_client_options(self.timeout)
            )
        return self._client

    def forget_client(self) -> None:
        """Drop the loop-bound client (the hub moved to another event loop)."""
        self._client = None

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self.client.eval(script, len(keys), *keys, *args)  # type: ignore[misc]

    async def add(self, room_id: int, member: str, ttl_ms: int) -> bool:
        """Announce `member` here; True when the user was not online in the room before."""
        keys = [self.key(room_id), self.nodes_key]
        return int(await self._eval(_LUA_ADD, keys, [member, self.node, ttl_ms])) == 1

    async def remove(self, room_id: int, member: str) -> bool:
        """Withdraw this node's entry; True when the user is no longer online in the room."""
        keys = [self.key(room_id), self.nodes_key]
        return int(await self._eval(_LUA_REMOVE, keys, [member, self.node])) == 1

    async def members(self, room_id: int) -> list[str]:
        return _distinct_members(await self._eval(_LUA_MEMBERS, [self.key(room_id)], []))

    def members_sync(self, room_id: int) -> list[str]:
        """`members` from any thread (REST); raises redis errors when Redis is unreachable."""
        with self._lock:
            if self._sync_client is None:
                self._sync_client = redis.Redis.from_url(
                    self.url, decode_responses=True, **redis_client_options(self.timeout)
                )
            client = self._sync_client
        return _distinct_members(client.eval(_LUA_MEMBERS, 1, self.key(room_id)))  # type: ignore[arg-type]

    async def refresh(self, rooms: dict[int, set[str]], ttl_ms: int) -> PresenceChanges:
        """Re-announce this node with its entries `rooms` (room id -> members) and delete the
        expired entries of those rooms. Returns who is no longer online in which room, and who
        is online again (their entries had vanished: Redis restarted empty, or this node was
        cut off for longer than the TTL)."""
        changes = PresenceChanges()
        batch: list[tuple[int, list[str]]] = []
        size = 0
        items = [(room_id, sorted(members)) for room_id, members in rooms.items()]
        for index, (room_id, members) in enumerate(items):
            batch.append((room_id, members))
            size += len(members) + 1
            if size >= _REFRESH_BATCH or index == len(items) - 1:
                await self._refresh_batch(batch, ttl_ms, changes)
                batch, size = [], 0
        if not items:
            await self._refresh_batch([], ttl_ms, changes)
        return changes

    async def _refresh_batch(
        self, batch: list[tuple[int, list[str]]], ttl_ms: int, changes: "PresenceChanges"
    ) -> None:
        keys = [self.nodes_key, *(self.key(room_id) for room_id, _ in batch)]
        args: list[Any] = [self.node, ttl_ms]
        for _, members in batch:
            args += [len(members), *members]
        gone, arrived = await self._eval(_LUA_REFRESH, keys, args)
        for pairs, into in ((gone, changes.gone), (arrived, changes.arrived)):
            for index, member in zip(pairs[::2], pairs[1::2], strict=True):
                into.setdefault(batch[int(index) - 1][0], []).append(member)


def _distinct_members(entries: list[str]) -> list[str]:
    """Members of `<member>|<node>` entries, each once (a user online on several nodes)."""
    return sorted({entry.rpartition("|")[0] for entry in entries})


def member_key(user_id: int, username: str) -> str:
    # Django usernames cannot contain ':'.
    return f"{user_id}:{username}"


def member_parse(key: str) -> dict[str, Any]:
    user_id, _, username = key.partition(":")
    return {"id": int(user_id), "username": username}


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
        self.by_topic: dict[str, set[Connection]] = {}
        self.recent: OrderedDict[int, dict[int, str]] = OrderedDict()
        self.by_user: dict[int, set[Connection]] = {}
        self.user_buckets: dict[int, TokenBucket] = {}
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
        self._listening = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._sync_client: redis.Redis | None = None
        self._async_client: aioredis.Redis | None = None
        self._lock = threading.Lock()
        self._redis_down_until = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self.resubscribed = 0

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
        self.recent = OrderedDict()
        if isinstance(self.presence, MemoryPresence):
            self.presence = MemoryPresence()
        else:
            self.presence.forget_client()
        self._listening = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._listener = None
        self._heartbeat_task = None
        self._async_client = None
        self._presence_flush = None
        self._pending_presence = {}
        self._background = set()

    async def stop(self) -> None:
        for task in (self._listener, self._heartbeat_task):
            if task is not None:
                task.cancel()
        self._listener = self._heartbeat_task = None

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
                self._listening.set()
                self._first_attempt.set()
                self._redis_ok()
                if failed:
                    self.resubscribed += 1
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
                self._listening.clear()
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
    ) -> tuple[list[str], bool]:
        """Deliver the room's events to `connection`. With `presence`, the user counts as online
        there (once, however many of their sockets joined). Returns the online members and
        whether that list is partial (this process's only: Redis is unreachable)."""
        self.room_slugs[room_id] = slug
        self.by_room.setdefault(room_id, set()).add(connection)
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
        self.by_topic.setdefault(topic, set()).add(connection)

    def topic_remove(self, topic: str, connection: Connection) -> None:
        connections = self.by_topic.get(topic)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.by_topic[topic]

    def presence_online(self, room_id: int) -> list[dict[str, Any]]:
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
            self._spawn(self.apublish({"room": room_id, "frame": dumps(frame)}))

    # --- publish ---------------------------------------------------------------------------

    def _redis_sync(self) -> redis.Redis:
        with self._lock:
            if self._sync_client is None:
                self._sync_client = redis.Redis.from_url(
                    self.redis_url,
                    **redis_client_options(settings.REALTIME_REDIS_TIMEOUT_SECONDS),
                )
            return self._sync_client

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
                if self._async_client is None:
                    self._async_client = aioredis.Redis.from_url(
                        self.redis_url,
                        **async_redis_client_options(settings.REALTIME_REDIS_TIMEOUT_SECONDS),
                    )
                await self._async_client.publish(self.channel, json.dumps(envelope))
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
