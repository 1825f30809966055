"""The per-user frame limit of the messenger: one budget per user, however many sockets on however
many processes the user has.

A sliding-window counter, the platform throttles' arithmetic (`common.throttling`): at most
`REALTIME_USER_RATE_BURST` frames in any window of `burst / REALTIME_USER_RATE_PER_SECOND`
seconds (the previous fixed window's count weighted by how much of it the sliding window still
overlaps, plus the current one's), so a user keeps the token bucket's sustained rate and burst.

With REDIS_URL the counts live in Redis, shared by every process, and a process takes them in
leases (`common.throttling.LeaseBook`): one round trip reserves up to 1/LEASE_DIVISOR of the
budget, atomically and only what fits, and the frames are then spent locally, so a frame costs
no Redis round trip while its process holds a lease. Reserved frames count whether or not they
are spent, so a lease can only make the limit stricter, never looser. A user refused by the
counter is refused locally, without asking Redis again, until the window can have room. Without
Redis (the embedded single process), and while Redis is unreachable, the counts are this
process's (`MemoryWindows`): the limit then holds per process.
"""

import asyncio
import math
import time
from typing import Any, Protocol

import redis.asyncio as aioredis

from common.throttling import LeaseBook

#: A lease is at most this fraction of the budget (at least 1 frame).
LEASE_DIVISOR = 10
#: Bounds that keep every count an exact integer in Redis's Lua and every expiry valid.
MAX_LIMIT = 10**12
MAX_WINDOW_MS = 24 * 3600 * 1000
#: The shortest local refusal before the counter is asked again (a flood asks at most this often).
MIN_WAIT_SECONDS = 0.005

# KEYS: this window's count, the previous window's. ARGV: limit, lease, weight of the previous
# window (0..1), expiry ms. Reserves min(lease, room) frames when there is room for one.
# Returns {granted, current count before, previous count}.
_RESERVE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local room = math.floor(tonumber(ARGV[1]) - previous * tonumber(ARGV[3]) - current)
if room < 1 then return {0, current, previous} end
local granted = math.min(room, tonumber(ARGV[2]))
redis.call('INCRBY', KEYS[1], granted)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {granted, current, previous}
"""


class Windows(Protocol):
    """Where the per-window counts live."""

    async def reserve(
        self, key: str, slot: int, limit: int, lease: int, weight: float, window_ms: int
    ) -> tuple[int, int, int]:
        """Reserve up to `lease` frames of `key` in window `slot` if the sliding count
        (previous * weight + current) leaves room for one; (granted, current, previous)."""
        ...


class MemoryWindows:
    """This process's counts: key -> (slot, current, previous). Loop-bound."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int, int]] = {}

    async def reserve(
        self, key: str, slot: int, limit: int, lease: int, weight: float, window_ms: int
    ) -> tuple[int, int, int]:
        return self.reserve_now(key, slot, limit, lease, weight)

    def reserve_now(
        self, key: str, slot: int, limit: int, lease: int, weight: float
    ) -> tuple[int, int, int]:
        held_slot, current, previous = self.counts.get(key, (slot, 0, 0))
        if held_slot != slot:
            current, previous = 0, current if held_slot == slot - 1 else 0
        room = math.floor(limit - previous * weight - current)
        granted = min(room, lease) if room >= 1 else 0
        self.counts[key] = (slot, current + granted, previous)
        return granted, current, previous

    def forget(self, prefix: str) -> None:
        for key in [k for k in self.counts if k.startswith(prefix)]:
            del self.counts[key]


class RedisWindows:
    """The counts in Redis, shared by every process (one script call per reservation)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def reserve(
        self, key: str, slot: int, limit: int, lease: int, weight: float, window_ms: int
    ) -> tuple[int, int, int]:
        keys = [f"{key}:{slot}", f"{key}:{slot - 1}"]
        args: list[Any] = [limit, lease, repr(weight), 2 * window_ms]
        granted, current, previous = await self.client.eval(  # type: ignore[misc]
            _RESERVE, len(keys), *keys, *args
        )
        return int(granted), int(current), int(previous)


class UserFrameLimit:
    """Per-user frame budgets of this process's sockets (see the module docstring). Loop-bound:
    used from the hub's loop only. `rate`/`burst` are read on every reservation, so a change of
    the settings applies from the next one."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.leases = LeaseBook()
        self.memory = MemoryWindows()
        # user id -> time.time() before which the user's frames are refused without asking.
        self.refused_until: dict[int, float] = {}
        self._reserving: dict[int, asyncio.Future[None]] = {}

    def key(self, user_id: int, window_ms: int) -> str:
        return f"{self.prefix}:rate:{user_id}:{window_ms}"

    @staticmethod
    def shape(rate: float, burst: int) -> tuple[int, int]:
        """(limit, window ms) of a token bucket's `rate`/s and `burst`: `burst` frames per
        `burst / rate` seconds (limit clamped to 10^12, the window to 1 ms..1 day)."""
        limit = min(max(1, int(burst)), MAX_LIMIT)
        window_ms = round(1000 * limit / rate) if rate > 0 else MAX_WINDOW_MS
        return limit, min(max(1, window_ms), MAX_WINDOW_MS)

    def take_local(self, user_id: int, rate: float, burst: int) -> bool | None:
        """Spend a frame of this process's lease: True; False while the user is refused; None
        when a reservation (`reserve`) must decide."""
        now = time.time()
        if self.refused_until.get(user_id, 0.0) > now:
            return False
        _, window_ms = self.shape(rate, burst)
        slot = int(now * 1000) // window_ms
        if self.leases.spend(self.key(user_id, window_ms), slot):
            return True
        return None

    async def reserve(self, user_id: int, rate: float, burst: int, windows: Windows) -> bool:
        """Take a lease from `windows` and spend one frame of it; False (and the user refused
        locally until the window can have room) when there is none. Concurrent reservations
        for one user wait for the first instead of reserving twice. Raises what `windows`
        raises (Redis errors)."""
        while (pending := self._reserving.get(user_id)) is not None:
            await asyncio.shield(pending)
            decision = self.take_local(user_id, rate, burst)
            if decision is not None:
                return decision
        future = asyncio.get_running_loop().create_future()
        self._reserving[user_id] = future
        try:
            return await self._reserve(user_id, rate, burst, windows)
        finally:
            del self._reserving[user_id]
            future.set_result(None)

    async def _reserve(self, user_id: int, rate: float, burst: int, windows: Windows) -> bool:
        limit, window_ms = self.shape(rate, burst)
        now_ms = time.time() * 1000
        slot = int(now_ms) // window_ms
        elapsed = (now_ms % window_ms) / window_ms
        weight = 1 - elapsed
        lease = max(1, limit // LEASE_DIVISOR)
        key = self.key(user_id, window_ms)
        granted, current, previous = await windows.reserve(
            key, slot, limit, lease, weight, window_ms
        )
        if granted >= 1:
            self.refused_until.pop(user_id, None)
            self.leases.keep(key, slot, granted - 1)
            return True
        # Wait until the previous window's weight has fallen enough for one frame (at most the
        # rest of this window: the next one is judged afresh).
        rest = (window_ms - now_ms % window_ms) / 1000
        surplus = previous * weight + current + 1 - limit
        wait = surplus / previous * window_ms / 1000 if previous else rest
        self.refused_until[user_id] = time.time() + max(MIN_WAIT_SECONDS, min(wait, rest))
        return False

    def forget(self, user_id: int) -> None:
        """Drop the user's local state (their last socket here closed); their leases stay
        counted where they were reserved."""
        self.refused_until.pop(user_id, None)
        self.memory.forget(f"{self.prefix}:rate:{user_id}:")
