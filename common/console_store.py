"""The console's shared state in the default cache: global counters and per-process records.

On Redis (REDIS_URL) every process shares them: counters are INCRBY in one pipeline, process
records are fields of one hash (HSET, one field per process, so processes never overwrite each
other). On the embedded defaults (the local-memory cache) there is one process, and the same
operations run on the cache under a process lock. Keys carry the cache's KEY_PREFIX and
version, so `cache.get` reads what the pipeline wrote (Django's Redis serializer stores ints as
plain integers, which INCRBY understands).
"""

import json
import threading
from collections.abc import Mapping
from typing import Any

from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache

from common.cache import OUTAGE_ERRORS

COUNTER_PREFIX = "console:count:"
_LOCAL_LOCK = threading.Lock()


def _redis() -> tuple[RedisCache, Any] | None:
    """The default cache and a raw client when it is Redis, else None."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    return backend, backend._cache.get_client(None, write=True)  # type: ignore[attr-defined]


def counters_add(counts: Mapping[str, int]) -> None:
    """Add each amount to its global counter (created at 0). One round trip on Redis. Raises the
    cache's error when it is unreachable, so the caller can keep the increments for later."""
    if not counts:
        return
    found = _redis()
    if found is not None:
        backend, client = found
        pipe = client.pipeline(transaction=False)
        for key, amount in counts.items():
            pipe.incrby(backend.make_and_validate_key(COUNTER_PREFIX + key), amount)
        pipe.execute()
        return
    with _LOCAL_LOCK:
        for key, amount in counts.items():
            name = COUNTER_PREFIX + key
            if not cache.add(name, amount, timeout=None):
                cache.incr(name, amount)


def counters_get(keys: list[str]) -> dict[str, int]:
    """The global totals of `keys` (0 for a counter never added to, and while the cache is
    unreachable)."""
    if not keys:
        return {}
    found = cache.get_many([COUNTER_PREFIX + key for key in keys])
    return {key: int(found.get(COUNTER_PREFIX + key, 0)) for key in keys}


def record_put(key: str, field: str, record: Mapping[str, Any], *, keep_seconds: int) -> None:
    """Store `record` (JSON) as `field` of the hash `key`; the hash expires `keep_seconds` after
    its last write. Raises the cache's error when it is unreachable."""
    encoded = json.dumps(record, separators=(",", ":"))
    found = _redis()
    if found is not None:
        backend, client = found
        name = backend.make_and_validate_key(key)
        pipe = client.pipeline(transaction=False)
        pipe.hset(name, field, encoded)
        pipe.expire(name, keep_seconds)
        pipe.execute()
        return
    with _LOCAL_LOCK:
        records = cache.get(key) or {}
        records[field] = encoded
        cache.set(key, records, timeout=keep_seconds)


def records_get(key: str) -> dict[str, dict[str, Any]]:
    """Every field of the hash `key`, decoded (empty while the cache is unreachable)."""
    found = _redis()
    if found is not None:
        backend, client = found
        try:
            raw: dict[bytes, bytes] = client.hgetall(backend.make_and_validate_key(key))
        except OUTAGE_ERRORS:
            return {}
        return {field.decode(): json.loads(value) for field, value in raw.items()}
    with _LOCAL_LOCK:
        records = cache.get(key) or {}
    return {field: json.loads(value) for field, value in records.items()}


def records_drop(key: str, fields: list[str]) -> None:
    """Remove `fields` from the hash `key`; idempotent. Raises the cache's error when it is
    unreachable."""
    if not fields:
        return
    found = _redis()
    if found is not None:
        backend, client = found
        client.hdel(backend.make_and_validate_key(key), *fields)
        return
    with _LOCAL_LOCK:
        records = cache.get(key) or {}
        for field in fields:
            records.pop(field, None)
        cache.set(key, records, timeout=None)
