"""Per-user dialog state, dedupe of update ids and flood windows, shared by every web worker:
Redis when the default cache is Redis (REDIS_URL; surviving restarts), the in-process cache on
the embedded default. python-telegram-bot's own persistence is per process, so it is not used.

On Redis the store talks to the server natively from the event loop (`redis.asyncio`, one
client per loop), under the cache's own key names (KEY_PREFIX and version, so installations
sharing a Redis stay apart): Django's `a*` cache methods would each hop to a worker thread
and back (measured: about a quarter of the bot's CPU per update went to those hops). Admitting
an update (dedupe, then flood control) is one round trip (`admit`). Like the cache
(common/cache.py), it degrades instead of failing while Redis is unreachable: reads miss,
writes drop, and `admit` refuses updates (a duplicate cannot be told from a new one).
The in-process cache is called directly: it never blocks."""

import asyncio
import json
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio
import structlog
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

from common.cache import OUTAGE_ERRORS

logger = structlog.get_logger(__name__)

_PREFIX = "docbot"
DEDUPE_SECONDS = 24 * 3600
FLOOD_WINDOW_TTL = 5  # seconds a one-second flood window is kept (clock skew between workers)
FLOOD_WARNED_SECONDS = 3  # one "slow down" per user per this many seconds
OUTAGE_LOG_EVERY = 10.0

Verdict = Literal["duplicate", "ok", "warn", "drop"]

# KEYS: dedupe mark, flood window, flood-warned mark. ARGV: dedupe TTL, max per second, window
# TTL, warned TTL. Returns 0 duplicate, 1 ok, 2 warn (first excess of a burst), 3 drop. A
# window is counted only for a first delivery, and only when a window key is given.
_ADMIT = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
if #KEYS < 2 then return 1 end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if n <= tonumber(ARGV[2]) then return 1 end
if redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[4]) then return 2 end
return 3
"""
_VERDICTS: tuple[Verdict, ...] = ("duplicate", "ok", "warn", "drop")


@dataclass(frozen=True)
class _Keys:
    dedupe: str
    window: str
    warned: str


class DialogStore:
    def __init__(self, *, ttl_seconds: int, alias: str = "default") -> None:
        self._cache = caches[alias]
        self._ttl = ttl_seconds
        self._redis_url = ""
        self._redis_options: dict[str, Any] = {}
        if isinstance(self._cache, RedisCache):
            config = settings.CACHES[alias]
            self._redis_url = str(config["LOCATION"]).split(",")[0].split(";")[0]
            self._redis_options = dict(config.get("OPTIONS", {}))
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._last_outage_log = 0.0

    # --- Redis plumbing -------------------------------------------------------------------

    def _client(self) -> Any:
        """This event loop's Redis client (asyncio connections belong to one loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = redis.asyncio.Redis.from_url(self._redis_url, **self._redis_options)
            client.admit = client.register_script(_ADMIT)
            self._clients[loop] = client
        return client

    def _key(self, key: str) -> str:
        return str(self._cache.make_and_validate_key(key))

    def _outage(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_outage_log >= OUTAGE_LOG_EVERY:
            self._last_outage_log = now
            logger.warning("docbot_store_unavailable", operation=operation, error=str(exc)[:200])

    async def aclose(self) -> None:
        """Close this loop's Redis connections (the application's shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # --- dialog state ---------------------------------------------------------------------

    async def get(self, user_id: int) -> dict[str, Any]:
        """The user's dialog state (a JSON object), `{}` when none or unreadable."""
        key = f"{_PREFIX}:state:{user_id}"
        if not self._redis_url:
            state = self._cache.get(key)
            return dict(state) if isinstance(state, dict) else {}
        try:
            raw = await self._client().get(self._key(key))
        except OUTAGE_ERRORS as exc:
            self._outage("get", exc)
            return {}
        try:
            state = json.loads(raw) if raw is not None else None
        except ValueError:  # not ours (a value written in another format): no state
            return {}
        return dict(state) if isinstance(state, dict) else {}

    async def set(self, user_id: int, state: dict[str, Any]) -> None:
        """Replace the user's state (JSON-serializable values), kept `ttl_seconds`."""
        key = f"{_PREFIX}:state:{user_id}"
        if not self._redis_url:
            self._cache.set(key, state, self._ttl)
            return
        try:
            await self._client().set(self._key(key), json.dumps(state), ex=self._ttl)
        except OUTAGE_ERRORS as exc:
            self._outage("set", exc)

    async def clear(self, user_id: int) -> None:
        key = f"{_PREFIX}:state:{user_id}"
        if not self._redis_url:
            self._cache.delete(key)
            return
        try:
            await self._client().delete(self._key(key))
        except OUTAGE_ERRORS as exc:
            self._outage("delete", exc)

    # --- admission: dedupe and flood control ----------------------------------------------

    async def admit(self, update_id: int, user_id: int | None, max_per_second: int) -> Verdict:
        """One update's admission, across processes, in one round trip on Redis:
        `duplicate` for every caller but the first with this update id (marks kept 24 h);
        otherwise, when `user_id` is given, that user's count in the current one-second window
        decides: `ok` up to `max_per_second`, then `warn` once (reply "slow down" once per
        FLOOD_WARNED_SECONDS), then `drop`. Without `user_id`: `ok`. While Redis is
        unreachable every update is `duplicate` (refused), as the cache's add() would say."""
        window = int(time.time())
        keys = _Keys(
            dedupe=f"{_PREFIX}:update:{update_id}",
            window=f"{_PREFIX}:flood:{user_id}:{window}",
            warned=f"{_PREFIX}:flood-warned:{user_id}",
        )
        if not self._redis_url:
            return self._admit_in_process(keys, user_id is not None, max_per_second)
        names = [self._key(keys.dedupe)]
        if user_id is not None:
            names += [self._key(keys.window), self._key(keys.warned)]
        args = [DEDUPE_SECONDS, max_per_second, FLOOD_WINDOW_TTL, FLOOD_WARNED_SECONDS]
        try:
            code = int(await self._client().admit(keys=names, args=args))
        except OUTAGE_ERRORS as exc:
            self._outage("admit", exc)
            return "duplicate"
        return _VERDICTS[code]

    def _admit_in_process(self, keys: _Keys, flood: bool, max_per_second: int) -> Verdict:
        if not self._cache.add(keys.dedupe, 1, DEDUPE_SECONDS):
            return "duplicate"
        if not flood:
            return "ok"
        if self._cache.add(keys.window, 1, FLOOD_WINDOW_TTL):
            count = 1
        else:
            try:
                count = self._cache.incr(keys.window)
            except ValueError:  # the window expired between add and incr
                self._cache.set(keys.window, 1, FLOOD_WINDOW_TTL)
                count = 1
        if count <= max_per_second:
            return "ok"
        return "warn" if self._cache.add(keys.warned, 1, FLOOD_WARNED_SECONDS) else "drop"

    async def first_group_notice(self, chat_id: int, *, ttl_seconds: int = 24 * 3600) -> bool:
        """True for the first caller per group chat and `ttl_seconds` (across processes): the
        group gets one "use me in a private chat" reply, not one per message. Rare: through
        the cache."""
        added: bool = await self._cache.aadd(f"{_PREFIX}:group-told:{chat_id}", 1, ttl_seconds)
        return added
