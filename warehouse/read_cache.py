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
hit) and movement entries are invalidated (recomputed from the ledger on the next read).

Any number of writers share the cache (several consumers on one queue, the REST ingest, readers
filling on a miss), and their writes may land in any order, so each entry has a guard beside it
(`guard_key`) and every write is a compare-and-set against it: a stock entry's guard is the
version of the stock row it shows (`Stock.version`, raised by every write of the row under its
lock, so versions follow the pair's commit order), and a view with an older version than the
guard's is never written; a movement entry's guard holds the bits of the events committed and
invalidated so far, and a fill built without one of them is never written. So once a commit's
write-through is done, no older commit's write-through and no fill that read the database before
it can replace what it wrote: reads see that commit or a newer one. Guards live
GUARD_MARGIN_SECONDS longer than entries, so an entry never outlives its guard.

The cache fails open (`common.cache`): while Redis is unreachable those writes are dropped, and
entries written before the outage would outlive it by up to WAREHOUSE_CACHE_SECONDS if Redis
comes back with its data (a partition, a restart from a snapshot). So this process remembers the
keys it could not write and invalidates them as soon as the cache takes writes again: on its
next write-through or `write_through_resync` (the consumer calls it with its heartbeat).
With Redis the writes and invalidations of a batch are one script call (deletes), a fill
another; elsewhere the same compare-and-set runs under a process lock (the local-memory cache is
one process's) and invalidation overwrites with a one-second tombstone.
"""

import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
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


# --- versions: what orders the cached copies ---------------------------------------------------
#: A movement's events as bits of its guard (`movement_body_fill`, `write_through`).
EVENT_BITS = {"departure": 1, "arrival": 2}
#: How much longer a guard lives than its entry, so an entry is never without its guard.
GUARD_MARGIN_SECONDS = 60
LOG_EVERY_SECONDS = 10.0
_dropped_logged_at = -LOG_EVERY_SECONDS
# Makes read-compare-write atomic on a cache without scripts (the local-memory cache is one
# process's, so a process lock covers every writer).
_local_lock = threading.Lock()


def guard_key(key: str) -> str:
    """The key (before the cache's own prefix) of the guard beside a cached view: a stock
    entry's version, a movement entry's event bits."""
    return f"{key}:guard"


def events_of(events: Iterable[str]) -> int:
    """The event bits (`EVENT_BITS`) of a movement's stored events."""
    bits = 0
    for event in events:
        bits |= EVENT_BITS[event]
    return bits


def _guard_ttl() -> int:
    return int(settings.WAREHOUSE_CACHE_SECONDS) + GUARD_MARGIN_SECONDS


def _dropped(exc: BaseException, operation: str) -> None:
    global _dropped_logged_at
    if time.monotonic() - _dropped_logged_at >= LOG_EVERY_SECONDS:
        _dropped_logged_at = time.monotonic()
        logger.warning("cache_unavailable", operation=operation, error=str(exc)[:200])


def _redis() -> tuple[RedisCache, Any, Any] | None:
    """The Redis cache, its client and its serializer's `dumps`, or None when the cache is not
    Redis. Django's cache runs no scripts: its client and serializer are used directly."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    client = backend._cache.get_client(None, write=True)  # type: ignore[attr-defined]
    return backend, client, backend._cache._serializer.dumps  # type: ignore[attr-defined]


# --- read-through fill --------------------------------------------------------------------------
# KEYS: the entry, its guard; ARGV: the entry's TTL, its value, the guard's kind ('version' or
# 'events'), the view's version or event bits, the guard's TTL. A stock view is written unless
# its guard holds a newer version (then the view is older than what is cached), and raises the
# guard; a movement view unless its guard names an event the view lacks.
_FILL = """
local known = tonumber(redis.call('GET', KEYS[2]))
local value = tonumber(ARGV[4])
if ARGV[3] == 'version' then
  if known and value < known then return 0 end
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
elseif known and bit.band(known, bit.bnot(value)) ~= 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
return 1
"""
_fill_script: Any = None


def _accepts(kind: str, known: object, value: int) -> bool:
    if not isinstance(known, int):
        return True
    return value >= known if kind == "version" else known & ~value == 0


def _fill(key: str, body: bytes, kind: str, value: int) -> None:
    global _fill_script
    ttl = settings.WAREHOUSE_CACHE_SECONDS
    redis = _redis()
    if redis is None:
        with _local_lock:
            if _accepts(kind, cache.get(guard_key(key)), value):
                cache.set(key, body, ttl)
                if kind == "version":
                    cache.set(guard_key(key), value, _guard_ttl())
        return
    backend, client, dumps = redis
    if _fill_script is None:
        _fill_script = client.register_script(_FILL)
    try:
        _fill_script(
            keys=[backend.make_key(key), backend.make_key(guard_key(key))],
            args=[ttl, dumps(body), kind, value, _guard_ttl()],
            client=client,
        )
    except OUTAGE_ERRORS as exc:
        _dropped(exc, "fill")


def stock_body_fill(view: StockView, version: int) -> bytes:
    """Cache the body of a stock view read from the database at the row's `version` for
    WAREHOUSE_CACHE_SECONDS and return it. Not cached when the entry's guard holds a newer
    version: a commit and its write-through came between the read and this fill, and the older
    view must not replace theirs. Atomic (a Redis script; a process lock on a local cache);
    dropped while the cache is unreachable."""
    body = body_of(view)
    _fill(stock_cache_key(view["warehouse_id"], view["product_id"]), body, "version", version)
    return body


def movement_body_fill(view: MovementView, events: int) -> bytes:
    """Cache the body of a movement view built from the ledger rows of `events` (bits,
    `events_of`) and return it. Not cached when the entry's guard names an event the view lacks:
    that event was stored and its invalidation done between the read and this fill. Atomic;
    dropped while the cache is unreachable."""
    body = body_of(view)
    _fill(movement_cache_key(view["movement_id"]), body, "events", events)
    return body


# --- write-through after commit -----------------------------------------------------------------
_TOMBSTONE = "stale"
UNSYNCED_MAX = 100_000
_unsynced: set[str] = set()
_unsynced_overflowed = False
_unsynced_lock = threading.Lock()


# KEYS: the stock entries, their guards, the movement entries, their guards, then the entries to
# delete; ARGV: the entries' TTL, the guards' TTL, how many stock entries, how many movement
# entries, the stock entries' versions, their values, then the movements' event bits.
_WRITE = """
local ttl, guard = ARGV[1], ARGV[2]
local n, m = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, n do
  local known = tonumber(redis.call('GET', KEYS[n + i]))
  if not known or tonumber(ARGV[4 + i]) >= known then
    redis.call('SET', KEYS[i], ARGV[4 + n + i], 'EX', ttl)
    redis.call('SET', KEYS[n + i], ARGV[4 + i], 'EX', guard)
  end
end
local base, arg = 2 * n, 4 + 2 * n
for i = 1, m do
  local known = tonumber(redis.call('GET', KEYS[base + m + i])) or 0
  redis.call('DEL', KEYS[base + i])
  redis.call('SET', KEYS[base + m + i], bit.bor(known, tonumber(ARGV[arg + i])), 'EX', guard)
end
for i = base + 2 * m + 1, #KEYS do redis.call('DEL', KEYS[i]) end
return #KEYS
"""
_write_script: Any = None


def _cache_write(
    stock: Mapping[str, tuple[int, bytes]], movements: Mapping[str, int], stale: set[str]
) -> bool:
    """`write_through`'s writes; True when the cache took them. With Redis one script call
    (every compare-and-set of the batch atomic, a fifth of the CPU of `set_many`); elsewhere
    the same rules under a process lock, and invalidated entries overwritten with a one-second
    tombstone."""
    global _write_script
    redis = _redis()
    if redis is None:
        return _local_write(stock, movements, stale)
    backend, client, dumps = redis
    if _write_script is None:
        _write_script = client.register_script(_WRITE)
    # `make_key` skips `validate_key`'s per-character memcached checks (ASCII keys, no spaces).
    made = backend.make_key
    keys = [made(key) for key in stock] + [made(guard_key(key)) for key in stock]
    keys += [made(key) for key in movements] + [made(guard_key(key)) for key in movements]
    keys += [made(key) for key in stale]
    args: list[Any] = [settings.WAREHOUSE_CACHE_SECONDS, _guard_ttl(), len(stock), len(movements)]
    args += [version for version, _ in stock.values()]
    args += [dumps(body) for _, body in stock.values()]
    args += list(movements.values())
    try:
        _write_script(keys=keys, args=args, client=client)
    except OUTAGE_ERRORS as exc:
        _dropped(exc, "write_through")
        return False
    return True


def _local_write(
    stock: Mapping[str, tuple[int, bytes]], movements: Mapping[str, int], stale: set[str]
) -> bool:
    ttl, guard = settings.WAREHOUSE_CACHE_SECONDS, _guard_ttl()
    failed: list[str] = []
    with _local_lock:
        known = cache.get_many([guard_key(key) for key in [*stock, *movements]])
        newer = {
            key: entry
            for key, entry in stock.items()
            if _accepts("version", known.get(guard_key(key)), entry[0])
        }
        if newer:
            failed += cache.set_many({key: body for key, (_, body) in newer.items()}, ttl)
            failed += cache.set_many(
                {guard_key(key): version for key, (version, _) in newer.items()}, guard
            )
        if movements:
            guards = {
                guard_key(key): (known.get(guard_key(key)) or 0) | bits
                for key, bits in movements.items()
            }
            failed += cache.set_many(guards, guard)
        if stale or movements:
            failed += cache.set_many(dict.fromkeys([*stale, *movements], _TOMBSTONE), 1)
    return not failed


def write_through(
    *,
    stock: Mapping[str, tuple[int, bytes]] | None = None,
    movements: Mapping[str, int] | None = None,
    stale: set[str] | None = None,
) -> None:
    """After a commit: replace the `stock` entries (key -> (row version, body), `body_of`) unless
    a newer version is cached, invalidate the `movements` entries (key -> bits of the events the
    commit stored, added to the entry's guard so that no fill missing them is cached after this)
    and the keys `stale`, together with every key an earlier write-through of this process could
    not write.

    The order of two commits' write-throughs does not matter: each entry ends at the newest
    version whatever order they land in (several consumers on one queue), and a read-through
    fill from before a commit never replaces it. When the cache does not take the writes, the
    keys are remembered (at most UNSYNCED_MAX, logged once beyond that) and invalidated on the
    next write-through or `write_through_resync`. Never raises; thread-safe."""
    global _unsynced_overflowed
    stock, movements, stale = stock or {}, movements or {}, stale or set()
    with _unsynced_lock:
        pending = set(_unsynced)
    try:
        stale = (stale | pending) - stock.keys() - movements.keys()
        written = _cache_write(stock, movements, stale)
    except Exception:
        logger.exception(
            "warehouse_cache_refresh_failed", keys=len(stock) + len(movements) + len(stale)
        )
        written = False
    with _unsynced_lock:
        if written:
            _unsynced.difference_update(pending)
            _unsynced_overflowed = _unsynced_overflowed and bool(_unsynced)
            return
        room = UNSYNCED_MAX - len(_unsynced)
        missed = stock.keys() | movements.keys() | stale
        if len(missed) > room and not _unsynced_overflowed:
            _unsynced_overflowed = True
            logger.warning(
                "warehouse_cache_resync_incomplete",
                detail="too many dropped writes to track; cached reads may be stale for up to "
                "WAREHOUSE_CACHE_SECONDS after the cache returns",
            )
        _unsynced.update(list(missed)[: max(room, 0)])


def write_through_chunked(
    stock: Mapping[str, tuple[int, bytes]], stale: set[str], size: int = 5000
) -> None:
    """`write_through` in chunks of `size` keys (a stock rebuild rewrites every pair)."""
    items, stale_keys = list(stock.items()), list(stale)
    for start in range(0, max(len(items), len(stale_keys)), size):
        write_through(
            stock=dict(items[start : start + size]), stale=set(stale_keys[start : start + size])
        )


def write_through_resync() -> int:
    """Invalidate the cache entries this process could not write while the cache was
    unreachable, if it takes writes now; returns how many remain unsynced. Idempotent; cheap
    when there is nothing to do."""
    if _unsynced:
        write_through()
    return len(_unsynced)


def stock_changes_write_through(
    changes: Sequence[StockView], versions: Sequence[int], events: Mapping[uuid.UUID, int]
) -> None:
    """After an ingest commit: the changed pairs' views (`changes`, at the stock rows'
    `versions`, in the same order) replace their entries unless newer ones are there, and the
    entries of the movements the commit stored events of (`events`: movement id -> event bits)
    are invalidated (`write_through`). Safe with any number of consumers on one queue."""
    stock = {
        stock_cache_key(change["warehouse_id"], change["product_id"]): (version, body_of(change))
        for change, version in zip(changes, versions, strict=True)
    }
    write_through(
        stock=stock, movements={movement_cache_key(m): bits for m, bits in events.items()}
    )
