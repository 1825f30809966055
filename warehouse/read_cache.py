"""The warehouse read model: the cache keys, the shapes of the two public views and the cache's
read-through and write-through. Every door that answers a stock read (the DRF views, the ASGI
fast path, the ingest's `warehouse.stock` event) gets the stock view from `stock_view` here.

What is cached: the stock view of a (warehouse, product) pair under `stock_cache_key` and the
movement view under `movement_cache_key`, for WAREHOUSE_CACHE_SECONDS. Only what exists is
cached (`selectors` fill on a miss), so random ids leave nothing behind. Any cached value that is
not a dict (the invalidation tombstone below, an older release's "missing" marker) is a miss.

After an ingest commits, stock entries are replaced by the committed values (the next read is a
hit) and movement entries are invalidated (recomputed from the ledger on the next read). The
cache fails open (`common.cache`): while Redis is unreachable those writes are dropped, and
entries written before the outage would outlive it by up to WAREHOUSE_CACHE_SECONDS if Redis
comes back with its data (a partition, a restart from a snapshot). So this process remembers the
keys it could not write and invalidates them as soon as the cache takes writes again: on its
next write-through or `write_through_resync` (the consumer calls it with its heartbeat).
Invalidation overwrites with a one-second tombstone rather than deleting, because only
`set_many` reports whether the fail-open cache took the write.
"""

import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypedDict

import structlog
from django.conf import settings
from django.core.cache import cache

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
    """The one place the stock view is assembled."""
    return {
        "warehouse_id": str(warehouse_id),
        "product_id": str(product_id),
        "quantity": max(balance, 0),
        "balance": balance,
        "short": balance < 0,
        "updated_at": updated_at.isoformat(),
    }


def stock_view_of(stock: Stock) -> StockView:
    """`stock_view` of a `Stock` row."""
    return stock_view(
        warehouse_id=stock.warehouse_id,
        product_id=stock.product_id,
        balance=stock.balance,
        updated_at=stock.updated_at,
    )


def view_or_miss(value: object) -> dict[str, Any] | None:
    """A cached value as a view, or None when it is not one (absent, a tombstone, an older
    release's marker). The fast path calls it on what it read from Redis itself."""
    return value if isinstance(value, dict) else None


def view_get(key: str) -> dict[str, Any] | None:
    """The cached view under `key`, or None on a miss (also while the cache is unreachable)."""
    return view_or_miss(cache.get(key))


def view_fill(key: str, view: Mapping[str, Any]) -> None:
    """Cache a view read from the database for WAREHOUSE_CACHE_SECONDS (read-through fill);
    dropped while the cache is unreachable."""
    cache.set(key, view, settings.WAREHOUSE_CACHE_SECONDS)


# --- write-through after commit ---------------------------------------------------------------
_TOMBSTONE = "stale"
UNSYNCED_MAX = 100_000
_unsynced: set[str] = set()
_unsynced_overflowed = False
_unsynced_lock = threading.Lock()


def _cache_write(views: Mapping[str, Mapping[str, Any]], stale: set[str]) -> bool:
    """Write `views`, invalidate `stale`; True when the cache took both."""
    failed = cache.set_many(dict(views), settings.WAREHOUSE_CACHE_SECONDS) if views else []
    if not failed and stale:
        failed = cache.set_many(dict.fromkeys(stale, _TOMBSTONE), 1)
    return not failed


def write_through(views: Mapping[str, Mapping[str, Any]], stale: set[str]) -> None:
    """Replace the entries `views` (key -> view) and invalidate the keys `stale`, together with
    every key an earlier write-through of this process could not write. When the cache does
    not take the writes, the keys are remembered (at most UNSYNCED_MAX, logged once beyond
    that) for the next write-through or `write_through_resync`. Never raises; thread-safe."""
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


def write_through_chunked(
    views: Mapping[str, Mapping[str, Any]], stale: set[str], size: int = 5000
) -> None:
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
    """After an ingest commit: the changed pairs' views replace their entries and the touched
    movements' entries are invalidated (`write_through`).

    With several consumers on one queue, two batches' writes could land out of order; entries
    then heal after WAREHOUSE_CACHE_SECONDS, so run one consumer per queue."""
    views = {stock_cache_key(c["warehouse_id"], c["product_id"]): c for c in changes}
    write_through(views, {movement_cache_key(movement_id) for movement_id in movement_ids})
