"""Presence: who is online in which room, counting a user once however many sockets they have.

Without Redis it is this process's memory (`MemoryPresence`); with Redis it is global
(`RedisPresence`): each process announces its entries with an expiry
(`REALTIME_PRESENCE_TTL_SECONDS`) and re-announces them every third of it, so entries of a
process that died expire within the TTL and a Redis that restarted empty is refilled by the live
processes. The hub (`realtime.fanout.hub`) decides when to add, remove and refresh.
"""

import threading
from dataclasses import dataclass, field
from typing import Any, TypedDict

import redis
import redis.asyncio as aioredis

from realtime.fanout.redis_clients import async_redis_client_options, redis_client_options


class OnlineUser(TypedDict):
    """A user online in a room, as presence frames and the REST presence read show them."""

    id: int
    username: str


class PresenceUnavailable(Exception):
    """Presence cannot be read: Redis is unreachable."""


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
    """A user as a presence member, `<id>:<username>` (Django usernames cannot contain ':')."""
    return f"{user_id}:{username}"


def member_parse(key: str) -> OnlineUser:
    """A presence member as the `{id, username}` clients see."""
    user_id, _, username = key.partition(":")
    return {"id": int(user_id), "username": username}


def presence_snapshot_frame(slug: str, members: list[str], *, partial: bool) -> dict[str, Any]:
    """The `presence` snapshot a join answers: every member online, by id. `partial` says the
    list is this process's only (Redis is unreachable)."""
    frame: dict[str, Any] = {
        "type": "presence",
        "room": slug,
        "snapshot": True,
        "online": sorted((member_parse(m) for m in members), key=lambda u: u["id"]),
        "joined": [],
        "left": [],
    }
    if partial:
        frame["partial"] = True
    return frame
