"""Per-user dialog state, dedupe of update ids and flood windows, shared by every web worker:
Redis when the default cache is Redis (REDIS_URL; surviving restarts), the in-process cache on
the embedded default. python-telegram-bot's own persistence is per process, so it is not used.

On Redis the store talks to the server natively from the event loop (`redis.asyncio`, one
client per loop), under the cache's own key names (KEY_PREFIX and version, so installations
sharing a Redis stay apart): Django's `a*` cache methods would each hop to a worker thread
and back (measured: about a quarter of the bot's CPU per update went to those hops). Admitting
an update (dedupe, then flood control) is one round trip (`admit`). Like the cache
(common/cache.py), it degrades instead of failing while Redis is unreachable: reads miss,
writes drop, and `admit` answers `busy` (the update is neither handled nor dropped: it is
delivered again later). The in-process cache is called directly: it never blocks.

Dedupe is at-least-once: an update is *claimed* when its handling starts (a mark that expires
after `claim_seconds`, renewed while the handler runs: `claim_renew`) and marked *done* when it
finished (`finish`, kept DEDUPE_SECONDS). Only a done update is a duplicate; a delivery of one
whose claim is still fresh is `busy` (handled elsewhere right now: the caller retries later);
a claim whose process died expires, and the next delivery handles the update again."""

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
#: Seconds an update's "being handled" claim lasts unless renewed (DOCBOT_UPDATE_CLAIM_SECONDS).
CLAIM_SECONDS = 30.0
FLOOD_WINDOW_TTL = 5  # seconds a one-second flood window is kept (clock skew between workers)
FLOOD_WARNED_SECONDS = 3  # one "slow down" per user per this many seconds
OUTAGE_LOG_EVERY = 10.0

Verdict = Literal["duplicate", "ok", "warn", "drop", "busy"]

# The update's mark: "p" while claimed (expires unless renewed), "d" once done; any other value
# (an older release's "1") counts as done.
_CLAIMED = "p"
_DONE = "d"

# KEYS: update mark, flood window, flood-warned mark. ARGV: claim TTL (ms), max per second,
# window TTL, warned TTL. Returns 0 duplicate (done), 1 ok, 2 warn (first excess of a burst),
# 3 drop, 4 busy (claimed and not expired). A window is counted only for a delivery that claims
# the update, and only when a window key is given.
_ADMIT = """
local mark = redis.call('GET', KEYS[1])
if mark == 'p' then return 4 end
if mark then return 0 end
redis.call('SET', KEYS[1], 'p', 'PX', ARGV[1])
if #KEYS < 2 then return 1 end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if n <= tonumber(ARGV[2]) then return 1 end
if redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[4]) then return 2 end
return 3
"""
# KEYS: update mark. ARGV: claim TTL (ms). Extends a claim, never a done mark.
_RENEW = """
if redis.call('GET', KEYS[1]) == 'p' then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""
# KEYS: update mark. Drops a claim (its handler was cancelled), never a done mark.
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'p' then return redis.call('DEL', KEYS[1]) end
return 0
"""
_VERDICTS: tuple[Verdict, ...] = ("duplicate", "ok", "warn", "drop", "busy")


@dataclass(frozen=True)
class _Keys:
    dedupe: str
    window: str
    warned: str


class DialogStore:
    """`ttl_seconds`: how long dialog state is kept; `claim_seconds`: how long an update's claim
    lasts unless renewed (a dead handler's update is handled again after this)."""

    def __init__(
        self, *, ttl_seconds: int, claim_seconds: float = CLAIM_SECONDS, alias: str = "default"
    ) -> None:
        self._cache = caches[alias]
        self._ttl = ttl_seconds
        self.claim_seconds = claim_seconds
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
            client.claim_renew = client.register_script(_RENEW)
            client.claim_release = client.register_script(_RELEASE)
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
        """One delivery's admission, across processes, in one round trip on Redis:
        `duplicate` when the update is done (`finish`, marks kept 24 h); `busy` while another
        delivery's claim on it is fresh (not done, not expired: handled elsewhere now, or by a
        process that died less than `claim_seconds` ago); otherwise this caller claims it (it
        must call `finish` when the update is handled or deliberately dropped) and, when
        `user_id` is given, that user's count in the current one-second window decides: `ok` up
        to `max_per_second`, then `warn` once (reply "slow down" once per
        FLOOD_WARNED_SECONDS), then `drop`. Without `user_id`: `ok`. While Redis is unreachable
        every update is `busy` (it is delivered again later, never dropped)."""
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
        claim_ms = self._claim_ms()
        args = [claim_ms, max_per_second, FLOOD_WINDOW_TTL, FLOOD_WARNED_SECONDS]
        try:
            code = int(await self._client().admit(keys=names, args=args))
        except OUTAGE_ERRORS as exc:
            self._outage("admit", exc)
            return "busy"
        return _VERDICTS[code]

    def _claim_ms(self) -> int:
        return max(1, round(self.claim_seconds * 1000))

    def _admit_in_process(self, keys: _Keys, flood: bool, max_per_second: int) -> Verdict:
        if not self._cache.add(keys.dedupe, _CLAIMED, self.claim_seconds):
            mark = self._cache.get(keys.dedupe)
            # None: the claim expired between add and get; the next delivery takes it.
            return "busy" if mark is None or mark == _CLAIMED else "duplicate"
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

    async def finish(self, update_id: int) -> None:
        """Mark the update done (handled, or deliberately dropped): every later delivery is a
        `duplicate` for DEDUPE_SECONDS. Idempotent. While Redis is unreachable the mark is
        lost (logged): the claim expires and a later delivery would be handled again."""
        key = f"{_PREFIX}:update:{update_id}"
        if not self._redis_url:
            self._cache.set(key, _DONE, DEDUPE_SECONDS)
            return
        try:
            await self._client().set(self._key(key), _DONE, ex=DEDUPE_SECONDS)
        except OUTAGE_ERRORS as exc:
            self._outage("finish", exc)

    async def claim_renew(self, update_id: int) -> None:
        """Extend a claim by `claim_seconds` from now (its handler is still running); a done
        mark is left alone. Errors are logged (the claim may then expire early)."""
        key = f"{_PREFIX}:update:{update_id}"
        if not self._redis_url:
            if self._cache.get(key) == _CLAIMED:
                self._cache.touch(key, self.claim_seconds)
            return
        try:
            await self._client().claim_renew(keys=[self._key(key)], args=[self._claim_ms()])
        except OUTAGE_ERRORS as exc:
            self._outage("claim_renew", exc)

    async def claim_release(self, update_id: int) -> None:
        """Drop a claim whose handler stopped before finishing (cancelled), so the next
        delivery handles the update at once; a done mark is left alone."""
        key = f"{_PREFIX}:update:{update_id}"
        if not self._redis_url:
            if self._cache.get(key) == _CLAIMED:
                self._cache.delete(key)
            return
        try:
            await self._client().claim_release(keys=[self._key(key)])
        except OUTAGE_ERRORS as exc:
            self._outage("claim_release", exc)

    async def first_group_notice(self, chat_id: int, *, ttl_seconds: int = 24 * 3600) -> bool:
        """True for the first caller per group chat and `ttl_seconds` (across processes): the
        group gets one "use me in a private chat" reply, not one per message. Rare: through
        the cache."""
        added: bool = await self._cache.aadd(f"{_PREFIX}:group-told:{chat_id}", 1, ttl_seconds)
        return added
