"""The warehouse read model: the cache keys, the shapes of the two public views and the cache's
read-through and write-through. Every door that answers a stock read (the DRF views, the
ingest's `warehouse.stock` event) gets the stock view from `stock_view` here.

What is cached: the JSON body the API answers (`body_of`: UTF-8 bytes, exactly what DRF's
JSONRenderer renders for the view) of a (warehouse, product) pair's stock view under
`stock_cache_key` and of a movement view under `movement_cache_key`, for
WAREHOUSE_CACHE_SECONDS; a hit is answered as those bytes, no serializer. Only what exists is
cached (`selectors` fill on a miss), so random ids leave nothing behind. A cached value that is
neither bytes nor a dict (an older release's view) is a miss: the invalidation tombstone below,
an older release's "missing" marker.

After an ingest commits, stock entries are replaced by the committed values (the next read is a
hit) and movement entries are invalidated (recomputed from the ledger on the next read). The
cache fails open (`common.cache`): while Redis is unreachable those writes are dropped, and
entries written before the outage would outlive it by up to WAREHOUSE_CACHE_SECONDS if Redis
comes back with its data (a partition, a restart from a snapshot). So this process remembers the
keys it could not write and invalidates them as soon as the cache takes writes again: on its
next write-through or `write_through_resync` (the consumer calls it with its heartbeat).
With Redis the writes and invalidations of a batch are one script call (deletes); elsewhere
invalidation overwrites with a one-second tombstone.
"""

import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypedDict

import structlog
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache

from common.cache import OUTAGE_ERRORS
from warehouse.models import Stock

logger = structlog.get_logger(__name__)


class StockView(TypedDict):
    """A pair's stock as every door answers it. `balance` is the signed sum of the ledger's
    deltas (units of product); `quantity` is `max(balance, 0)`; `short` says the balance went
    below zero; `updated_at` is ISO 8601 with offset. Ids are canonical UUID strings."""

    warehouse_id: str
    product_id: str
    quantity: int
    balance: int
    short: bool
    updated_at: str


class Party(TypedDict):
    """One end of a movement: the warehouse and the `source` that reported the event."""

    warehouse_id: str
    source: str


class MovementView(TypedDict):
    """A movement from its (at most two) ledger events; see `selectors.movement_view` for the
    status rules. Times are ISO 8601, `elapsed_seconds` whole seconds, quantities units."""

    movement_id: str
    product_id: str
    status: str
    sender: Party | None
    receiver: Party | None
    departed_at: str | None
    arrived_at: str | None
    elapsed_seconds: int | None
    quantity_sent: int | None
    quantity_received: int | None
    quantity_difference: int | None


def stock_cache_key(warehouse_id: str | uuid.UUID, product_id: str | uuid.UUID) -> str:
    """The cache key (before the cache's own prefix) of a pair's `StockView`."""
    return f"wh:stock:{warehouse_id}:{product_id}"


def movement_cache_key(movement_id: str | uuid.UUID) -> str:
    """The cache key (before the cache's own prefix) of a `MovementView`."""
    return f"wh:mv:{movement_id}"


def stock_view(
    *, warehouse_id: uuid.UUID, product_id: uuid.UUID, balance: int, updated_at: datetime
) -> StockView:
    """The stock view of one pair (`stock_views`)."""
    return stock_views([(str(warehouse_id), str(product_id), balance)], updated_at=updated_at)[0]


def stock_views(
    balances: Iterable[tuple[str, str, int]], *, updated_at: datetime
) -> list[StockView]:
    """The one place the stock view is assembled: one per (warehouse_id, product_id, balance)
    row (ids as canonical UUID text), all updated at `updated_at`."""
    stamp = updated_at.isoformat()
    return [
        {
            "warehouse_id": warehouse_id,
            "product_id": product_id,
            "quantity": max(balance, 0),
            "balance": balance,
            "short": balance < 0,
            "updated_at": stamp,
        }
        for warehouse_id, product_id, balance in balances
    ]


def stock_view_of(stock: Stock) -> StockView:
    """`stock_view` of a `Stock` row."""
    return stock_view(
        warehouse_id=stock.warehouse_id,
        product_id=stock.product_id,
        balance=stock.balance,
        updated_at=stock.updated_at,
    )


class NotFetched:
    """The type of `NOT_FETCHED`: the caller has not looked in the cache yet."""


NOT_FETCHED = NotFetched()


def body_of(view: Mapping[str, Any]) -> bytes:
    """The response body of a view: compact JSON, non-ASCII kept, UTF-8, byte for byte what
    DRF's JSONRenderer (COMPACT_JSON, UNICODE_JSON) renders for it."""
    return json.dumps(view, ensure_ascii=False, separators=(",", ":")).encode()


def body_or_miss(value: object) -> bytes | None:
    """A cached value as a response body, or None when it is not one (absent, a tombstone, an
    older release's marker); an older release's cached view (a dict) is rendered."""
    if isinstance(value, bytes):
        return value
    return body_of(value) if isinstance(value, dict) else None


def body_get(key: str, cached: object = NOT_FETCHED) -> bytes | None:
    """The cached body under `key`, or None on a miss (also while the cache is unreachable).
    `cached` is the value the caller already fetched for `key` (`read_limits.hit_and_get`),
    which saves the round trip."""
    return body_or_miss(cache.get(key) if cached is NOT_FETCHED else cached)


def body_fill(key: str, view: Mapping[str, Any]) -> bytes:
    """Cache the body of a view read from the database for WAREHOUSE_CACHE_SECONDS
    (read-through fill; dropped while the cache is unreachable) and return it."""
    body = body_of(view)
    cache.set(key, body, settings.WAREHOUSE_CACHE_SECONDS)
    return body


# --- write-through after commit ---------------------------------------------------------------
_TOMBSTONE = "stale"
UNSYNCED_MAX = 100_000
_unsynced: set[str] = set()
_unsynced_overflowed = False
_unsynced_lock = threading.Lock()


# KEYS: the entries to set, then the entries to delete; ARGV: the TTL in seconds, how many
# entries to set, then their values.
_SET_AND_DELETE = """
local count = tonumber(ARGV[2])
for i = 1, count do redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[1]) end
for i = count + 1, #KEYS do redis.call('DEL', KEYS[i]) end
return #KEYS
"""
_set_and_delete: Any = None
LOG_EVERY_SECONDS = 10.0
_dropped_logged_at = -LOG_EVERY_SECONDS


def _cache_write(views: Mapping[str, bytes], stale: set[str]) -> bool:
    """Write the bodies `views`, invalidate `stale`; True when the cache took both. With Redis
    one script call: a fifth of the CPU of `set_many` (MSET, then one EXPIRE per key in a
    MULTI), and stale entries are deleted. Elsewhere (local memory) `set_many`, stale entries
    overwritten with a one-second tombstone."""
    global _set_and_delete, _dropped_logged_at
    backend = caches["default"]
    ttl = settings.WAREHOUSE_CACHE_SECONDS
    if not isinstance(backend, RedisCache):
        failed = cache.set_many(dict(views), ttl) if views else []
        if not failed and stale:
            failed = cache.set_many(dict.fromkeys(stale, _TOMBSTONE), 1)
        return not failed
    # Django's cache runs no scripts: its client and serializer are used directly. `make_key`
    # skips `validate_key`'s per-character memcached checks (these keys are ASCII, no spaces).
    client = backend._cache.get_client(None, write=True)  # type: ignore[attr-defined]
    dumps = backend._cache._serializer.dumps  # type: ignore[attr-defined]
    if _set_and_delete is None:
        _set_and_delete = client.register_script(_SET_AND_DELETE)
    keys = [backend.make_key(key) for key in views] + [backend.make_key(key) for key in stale]
    try:
        _set_and_delete(
            keys=keys, args=[ttl, len(views), *map(dumps, views.values())], client=client
        )
    except OUTAGE_ERRORS as exc:
        if time.monotonic() - _dropped_logged_at >= LOG_EVERY_SECONDS:
            _dropped_logged_at = time.monotonic()
            logger.warning("cache_unavailable", operation="write_through", error=str(exc)[:200])
        return False
    return True


def write_through(views: Mapping[str, bytes], stale: set[str]) -> None:
    """Replace the entries `views` (key -> body, `body_of`) and invalidate the keys `stale`,
    together with every key an earlier write-through of this process could not write. When the
    cache does not take the writes, the keys are remembered (at most UNSYNCED_MAX, logged once
    beyond that) for the next write-through or `write_through_resync`. Never raises;
    thread-safe."""
    global _unsynced_overflowed
    with _unsynced_lock:
        pending = set(_unsynced)
    try:
        written = _cache_write(views, (stale | pending) - views.keys())
    except Exception:
        logger.exception("warehouse_cache_refresh_failed", keys=len(views) + len(stale))
        written = False
    with _unsynced_lock:
        if written:
            _unsynced.difference_update(pending)
            _unsynced_overflowed = _unsynced_overflowed and bool(_unsynced)
            return
        room = UNSYNCED_MAX - len(_unsynced)
        missed = views.keys() | stale
        if len(missed) > room and not _unsynced_overflowed:
            _unsynced_overflowed = True
            logger.warning(
                "warehouse_cache_resync_incomplete",
                detail="too many dropped writes to track; cached reads may be stale for up to "
                "WAREHOUSE_CACHE_SECONDS after the cache returns",
            )
        _unsynced.update(list(missed)[: max(room, 0)])


def write_through_chunked(views: Mapping[str, bytes], stale: set[str], size: int = 5000) -> None:
    """`write_through` in chunks of `size` keys (a stock rebuild rewrites every pair)."""
    items, stale_keys = list(views.items()), list(stale)
    for start in range(0, max(len(items), len(stale_keys)), size):
        write_through(dict(items[start : start + size]), set(stale_keys[start : start + size]))


def write_through_resync() -> int:
    """Invalidate the cache entries this process could not write while the cache was
    unreachable, if it takes writes now; returns how many remain unsynced. Idempotent; cheap
    when there is nothing to do."""
    if _unsynced:
        write_through({}, set())
    return len(_unsynced)


def stock_changes_write_through(
    changes: Iterable[StockView], movement_ids: Iterable[uuid.UUID]
) -> None:
    """After an ingest commit: the changed pairs' bodies replace their entries and the touched
    movements' entries are invalidated (`write_through`).

    With several consumers on one queue, two batches' writes could land out of order; entries
    then heal after WAREHOUSE_CACHE_SECONDS, so run one consumer per queue."""
    views = {stock_cache_key(c["warehouse_id"], c["product_id"]): body_of(c) for c in changes}
    write_through(views, {movement_cache_key(movement_id) for movement_id in movement_ids})
