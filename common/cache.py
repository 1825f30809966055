"""A Redis cache that degrades instead of failing when Redis is unreachable.

`input-policy.md`: when Redis is down, requests that only need it for throttling or caching
degrade instead of answering 500. Every read of this backend then misses, every write is
dropped, and one warning per `LOG_EVERY_SECONDS` says so (`cache_unavailable`), so throttles
fail open and cached views fall back to the database. Only connection-level failures are
swallowed; anything else (a bad key, a serialization error) still raises.

Entries written before an outage can outlive a write that the outage dropped; every cached
value in Quintet carries a TTL, which bounds that staleness (see README "Redis outage").
"""

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions
import structlog
from django.core.cache.backends.redis import RedisCache

logger = structlog.get_logger(__name__)
T = TypeVar("T")
LOG_EVERY_SECONDS = 10.0
OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class FailOpenRedisCache(RedisCache):
    """Django's RedisCache; on a connection failure reads miss and writes are dropped."""

    _last_logged = 0.0
    _lock = threading.Lock()

    def _degrade(self, operation: str, call: Callable[[], T], fallback: T) -> T:
        try:
            return call()
        except OUTAGE_ERRORS as exc:
            now = time.monotonic()
            with self._lock:
                due = now - FailOpenRedisCache._last_logged >= LOG_EVERY_SECONDS
                if due:
                    FailOpenRedisCache._last_logged = now
            if due:
                logger.warning("cache_unavailable", operation=operation, error=str(exc)[:200])
            return fallback

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._degrade(
            "get", lambda: super(FailOpenRedisCache, self).get(key, default, version), default
        )

    def get_many(self, keys: Any, version: int | None = None) -> dict[Any, Any]:
        return self._degrade(
            "get_many", lambda: super(FailOpenRedisCache, self).get_many(keys, version), {}
        )

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._degrade(
            "has_key", lambda: super(FailOpenRedisCache, self).has_key(key, version), False
        )

    def set(self, key: Any, value: Any, timeout: Any = 300, version: int | None = None) -> None:
        self._degrade(
            "set", lambda: super(FailOpenRedisCache, self).set(key, value, timeout, version), None
        )

    def add(self, key: Any, value: Any, timeout: Any = 300, version: int | None = None) -> bool:
        return self._degrade(
            "add", lambda: super(FailOpenRedisCache, self).add(key, value, timeout, version), False
        )

    def set_many(self, data: Any, timeout: Any = 300, version: int | None = None) -> list[Any]:
        return self._degrade(
            "set_many",
            lambda: super(FailOpenRedisCache, self).set_many(data, timeout, version),
            list(data),
        )

    def touch(self, key: Any, timeout: Any = 300, version: int | None = None) -> bool:
        return self._degrade(
            "touch", lambda: super(FailOpenRedisCache, self).touch(key, timeout, version), False
        )

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._degrade(
            "delete", lambda: super(FailOpenRedisCache, self).delete(key, version), False
        )

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        self._degrade(
            "delete_many", lambda: super(FailOpenRedisCache, self).delete_many(keys, version), None
        )

    def clear(self) -> None:
        self._degrade("clear", lambda: super(FailOpenRedisCache, self).clear(), None)
