"""Warehouse reads: the movement view, stock, history, dead letters, verification and the
consumer heartbeat. The two public reads are cached through `read_cache` (keys, view shapes,
their JSON bodies, read-through fill); `services` writes through after commit.

Only what exists is cached: a lookup of an unknown id leaves nothing behind, so anonymous
callers cannot grow the cache by asking for random ids (they are throttled per client instead,
`read_limits`). Any cached value that is not a view (an older release's "missing" marker, the
invalidation tombstone) reads as a miss."""

import uuid
from datetime import datetime, timedelta
from typing import TypedDict

from django.conf import settings
from django.db.models import QuerySet, Sum
from django.utils import timezone

from warehouse import read_cache
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock
from warehouse.read_cache import MovementView, Party

MOVEMENT_NOT_FOUND = "No such movement."
STOCK_NOT_FOUND = "No stock recorded for this warehouse and product."


class StockMismatch(TypedDict):
    """A pair whose stored balance (`stock`) differs from the sum of its ledger deltas
    (`ledger`), both in units of product."""

    warehouse_id: str
    product_id: str
    ledger: int
    stock: int


def stock_body_get(
    *, warehouse_id: uuid.UUID, product_id: uuid.UUID, cached: object = read_cache.NOT_FETCHED
) -> bytes | None:
    """The JSON body (`read_cache.body_of`) of the pair's `StockView` (`quantity =
    max(balance, 0)`, `short` when negative), or None when no stock row exists. From the cache
    (`cached`: the value already fetched for the pair's key, else one cache get), else one query
    that fills the cache (only when the row exists). No lock; never raises for a missing pair; a
    cache outage reads the database."""
    key = read_cache.stock_cache_key(warehouse_id, product_id)
    body = read_cache.body_get(key, cached)
    if body is not None:
        return body
    stock = Stock.objects.filter(warehouse_id=warehouse_id, product_id=product_id).first()
    if stock is None:
        return None
    return read_cache.body_fill(key, read_cache.stock_view_of(stock))


def stock_list(*, warehouse_id: uuid.UUID) -> QuerySet[Stock]:
    """Every stock row of a warehouse, ordered by product id (uncached; `read_cache.stock_view_of`
    gives each row's view). Lazy queryset, no lock."""
    return Stock.objects.filter(warehouse_id=warehouse_id).order_by("product_id")


def _party(entry: LedgerEntry | None) -> Party | None:
    if entry is None:
        return None
    return {"warehouse_id": str(entry.warehouse_id), "source": entry.source}


def movement_view(entries: list[LedgerEntry]) -> MovementView | None:
    """The movement read model from its (at most two) ledger rows; independent of the order in
    which they arrived; None for no rows. Status: `in_transit` (departure only), `arrived`
    (arrival only), `completed` (both, consistent), `anomaly` (both, but quantity or product
    differ, the same warehouse on both ends, or arrival before departure). Pure: no query."""
    if not entries:
        return None
    departure = next((e for e in entries if e.event == LedgerEntry.Event.DEPARTURE), None)
    arrival = next((e for e in entries if e.event == LedgerEntry.Event.ARRIVAL), None)
    first = departure or arrival
    assert first is not None
    elapsed: int | None = None
    difference: int | None = None
    if departure is None:
        status = "arrived"
    elif arrival is None:
        status = "in_transit"
    else:
        elapsed = round((arrival.occurred_at - departure.occurred_at).total_seconds())
        difference = departure.quantity - arrival.quantity
        consistent = (
            difference == 0
            and departure.product_id == arrival.product_id
            and departure.warehouse_id != arrival.warehouse_id
            and elapsed >= 0
        )
        status = "completed" if consistent else "anomaly"
    return {
        "movement_id": str(first.movement_id),
        "product_id": str(first.product_id),
        "status": status,
        "sender": _party(departure),
        "receiver": _party(arrival),
        "departed_at": departure.occurred_at.isoformat() if departure else None,
        "arrived_at": arrival.occurred_at.isoformat() if arrival else None,
        "elapsed_seconds": elapsed,
        "quantity_sent": departure.quantity if departure else None,
        "quantity_received": arrival.quantity if arrival else None,
        "quantity_difference": difference,
    }


def movement_body_get(
    *, movement_id: uuid.UUID, cached: object = read_cache.NOT_FETCHED
) -> bytes | None:
    """The JSON body (`read_cache.body_of`) of the `MovementView` (`movement_view`), or None
    when no event of it is stored. From the cache (`cached` as in `stock_body_get`), else one
    query that fills the cache (only when the movement exists). No lock; a cache outage reads
    the database."""
    key = read_cache.movement_cache_key(movement_id)
    body = read_cache.body_get(key, cached)
    if body is not None:
        return body
    view = movement_view(list(LedgerEntry.objects.filter(movement_id=movement_id)))
    return None if view is None else read_cache.body_fill(key, view)


def ledger_list(
    *,
    warehouse_id: uuid.UUID | None = None,
    product_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[LedgerEntry]:
    """Movement history (ledger rows), newest first (`occurred_at`, then pk), filtered by
    warehouse, product and occurrence time (`since` inclusive, `until` exclusive, aware
    datetimes). Lazy queryset, uncached, no lock."""
    entries = LedgerEntry.objects.all()
    if warehouse_id is not None:
        entries = entries.filter(warehouse_id=warehouse_id)
    if product_id is not None:
        entries = entries.filter(product_id=product_id)
    if since is not None:
        entries = entries.filter(occurred_at__gte=since)
    if until is not None:
        entries = entries.filter(occurred_at__lt=until)
    return entries.order_by("-occurred_at", "-pk")


def dead_letter_list(*, reason: str | None = None) -> QuerySet[DeadLetter]:
    """Dead letters, newest first, of one `DeadLetter.Reason` when `reason` is given. Lazy
    queryset, uncached, no lock."""
    letters = DeadLetter.objects.all()
    if reason:
        letters = letters.filter(reason=reason)
    return letters.order_by("-received_at", "-pk")


def stock_mismatches() -> list[StockMismatch]:
    """Pairs where stock != Σ ledger deltas (empty when the invariant holds). Two aggregate
    queries over the whole ledger and stock tables, no lock: run it when ingest is quiet, or
    accept that a batch committing in between shows up as a transient mismatch."""
    ledger = {
        (row["warehouse_id"], row["product_id"]): row["total"]
        for row in LedgerEntry.objects.values("warehouse_id", "product_id")
        .annotate(total=Sum("delta"))
        .order_by()
    }
    stock = {
        (w, p): balance
        for w, p, balance in Stock.objects.values_list("warehouse_id", "product_id", "balance")
    }
    mismatches: list[StockMismatch] = []
    for pair in ledger.keys() | stock.keys():
        expected, actual = ledger.get(pair, 0), stock.get(pair, 0)
        if expected != actual:
            mismatches.append(
                {
                    "warehouse_id": str(pair[0]),
                    "product_id": str(pair[1]),
                    "ledger": expected,
                    "stock": actual,
                }
            )
    return mismatches


def consumer_heartbeat_check() -> None:
    """Readiness check (`common.health`): returns None when healthy; raises RuntimeError (not an
    `ApplicationError`: the readiness endpoint reports its message) when a registered
    consumer's heartbeat is older than WAREHOUSE_HEARTBEAT_STALE_SECONDS, or, with
    WAREHOUSE_READYZ_REQUIRE_CONSUMER, when no consumer runs at all. One query, no lock."""
    limit = timezone.now() - timedelta(seconds=settings.WAREHOUSE_HEARTBEAT_STALE_SECONDS)
    beats = list(ConsumerHeartbeat.objects.values_list("name", "beat_at"))
    if not beats and settings.WAREHOUSE_READYZ_REQUIRE_CONSUMER:
        raise RuntimeError("no warehouse consumer heartbeat")
    stale = [name for name, beat_at in beats if beat_at < limit]
    if stale:
        raise RuntimeError(f"warehouse consumer heartbeat stale: {', '.join(stale)[:200]}")
