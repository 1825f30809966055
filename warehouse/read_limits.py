"""The public reads' rate limit: one budget per client for both public reads.

`WAREHOUSE_READ_THROTTLE` ("N/period", DRF's notation: `s`, `m`, `h`, `d`) allows N reads per
client per fixed window of that period. The DRF views (`api.PublicReadThrottle`) count in one
cache entry per client, `wh:rl:<window>:<client>:<index>`, an integer that expires with its
window; so a client never holds more than two entries at once
(the current window and the one just closing), whatever it asks for. Anonymous clients are
their IP address (`common.network.client_ip`: the socket's unless TRUSTED_PROXY_HOPS), IPv6
ones per /64, the smallest block one subscriber gets, so cycling through addresses mints
neither a fresh budget nor fresh entries; authenticated callers are their user id.

With Redis, `hit_and_get` counts the read and fetches the view's cached body in one round trip
(a Lua script), so a cached read costs one Redis call. When the cache is unreachable the limit
fails open (every read allowed) with a log line, as `input-policy.md` asks of throttles.
"""

import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import redis.exceptions
import structlog
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache

from common.cache import OUTAGE_ERRORS

logger = structlog.get_logger(__name__)
LOG_EVERY_SECONDS = 10.0
_last_logged = 0.0

_RATE = re.compile(r"^([0-9]+)/([smhd])[a-z]*$")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Rate:
    limit: int
    window: int


@functools.lru_cache(maxsize=8)
def rate_parse(text: str) -> Rate | None:
    """`"200000/min"` -> Rate(200000, 60); `""` -> None (no limit). Raises ValueError when
    malformed (settings check the same shape at start)."""
    if not text:
        return None
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"read throttle must look like 600/min, not {text!r}")
    return Rate(limit=int(found.group(1)), window=_PERIOD_SECONDS[found.group(2)])


def rate() -> Rate | None:
    return rate_parse(settings.WAREHOUSE_READ_THROTTLE)


def now() -> float:
    """The clock the windows are cut from (wall time, shared by every process)."""
    return time.time()


def user_ident(user_id: object) -> str:
    return f"user:{user_id}"


def counter_key(ident: str, limit: Rate, at: float) -> str:
    """The cache key (before the cache's own prefix) counting `ident` in the window of `at`."""
    return f"wh:rl:{limit.window}:{ident}:{int(at // limit.window)}"


def counter_ttl(limit: Rate) -> int:
    return limit.window + 1


def verdict(limit: Rate, count: int, at: float) -> float | None:
    """None when the `count`-th read of the window is allowed, else the seconds until the
    window ends (Retry-After)."""
    if count <= limit.limit:
        return None
    return limit.window - (at % limit.window)


def hit(ident: str) -> float | None:
    """Count one read of `ident`: None when allowed, else seconds to wait.

    Atomic on the cache (Redis INCR, the local-memory cache's lock); blocking, so not for the
    event loop unless the cache is local memory. Fails open when the cache is unreachable."""
    limit = rate()
    if limit is None:
        return None
    at = now()
    key = counter_key(ident, limit, at)
    try:
        cache.add(key, 0, counter_ttl(limit))
        count = cache.incr(key)
    except ValueError:
        # The entry expired between add and incr: the window turned, this is its first read.
        return None
    except OUTAGE_ERRORS as exc:
        _log_outage(exc)
        return None
    return verdict(limit, count, at)


def _log_outage(exc: BaseException) -> None:
    global _last_logged
    moment = time.monotonic()
    if moment - _last_logged >= LOG_EVERY_SECONDS:
        _last_logged = moment
        logger.warning("warehouse_read_throttle_unavailable", error=str(exc)[:200])


# KEYS: the counter, the view; ARGV: the counter's TTL (0: no limit, nothing counted).
_COUNT_AND_GET = """
local count = 0
if ARGV[1] ~= '0' then
  count = redis.call('INCR', KEYS[1])
  if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
end
return {count, redis.call('GET', KEYS[2])}
"""
_script: Any = None


def hit_and_get(ident: str, key: str) -> tuple[float | None, object]:
    """`hit(ident)` and the cached value under `key` (None when absent), in one round trip
    when the cache is Redis (an atomic Lua script); elsewhere `hit` then `cache.get`. Fails
    open: while Redis is unreachable the read is allowed and the value is None (a miss)."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return hit(ident), cache.get(key)
    global _script
    limit = rate()
    at = now()
    counter = backend.make_key(counter_key(ident, limit, at) if limit else key)
    made = backend.make_key(key)
    # Django's cache has no multi-command call: its client and serializer are used directly.
    client = backend._cache.get_client(made, write=True)  # type: ignore[attr-defined]
    if _script is None:
        _script = client.register_script(_COUNT_AND_GET)
    try:
        count, raw = _script(
            keys=[counter, made], args=[counter_ttl(limit) if limit else 0], client=client
        )
    except OUTAGE_ERRORS as exc:
        _log_outage(exc)
        return None, None
    except redis.exceptions.RedisError:
        # A server that refuses scripts (an ACL, a proxy without EVAL): two round trips.
        return hit(ident), cache.get(key)
    value = backend._cache._serializer.loads(raw) if raw is not None else None  # type: ignore[attr-defined]
    return (verdict(limit, int(count), at) if limit else None), value
