"""Warehouse reads: the movement view, stock, history, dead letters, verification and the
consumer heartbeat. The two public reads are cached through `read_cache` (keys, view shapes,
their JSON bodies, read-through fill); `services` writes through after commit.

Only what exists is cached: a lookup of an unknown id leaves nothing behind, so anonymous
callers cannot grow the cache by asking for random ids (they are throttled per client instead,
`read_limits`). Any cached value that is not a view (an older release's "missing" marker, the
invalidation tombstone) reads as a miss."""

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypedDict

from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, QuerySet, Sum, Window
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
    that fills the cache (only when the row exists, and never over an entry of a newer row
    version: `read_cache.stock_body_fill`). No lock; never raises for a missing pair; a cache
    outage reads the database."""
    key = read_cache.stock_cache_key(warehouse_id, product_id)
    body = read_cache.body_get(key, cached)
    if body is not None:
        return body
    stock = Stock.objects.filter(warehouse_id=warehouse_id, product_id=product_id).first()
    if stock is None:
        return None
    return read_cache.stock_body_fill(read_cache.stock_view_of(stock), stock.version)


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
    query that fills the cache (only when the movement exists, and not when an event committed
    since is missing from the view: `read_cache.movement_body_fill`). No lock; a cache outage
    reads the database."""
    key = read_cache.movement_cache_key(movement_id)
    body = read_cache.body_get(key, cached)
    if body is not None:
        return body
    entries = list(LedgerEntry.objects.filter(movement_id=movement_id))
    view = movement_view(entries)
    if view is None:
        return None
    return read_cache.movement_body_fill(view, read_cache.events_of(e.event for e in entries))


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


# --- the operator console (`warehouse.console`) ---------------------------------------------

#: Replay outcomes after which a dead letter needs no one any more.
REPLAYED_OUTCOMES = ("stored", "duplicate")


class IngestLag(TypedDict):
    """The newest ledger row's timing: `lag_seconds` from the envelope's time (producer clock)
    to the commit that stored it, and when that was (`recorded_at`); both None before any."""

    lag_seconds: float | None
    recorded_at: datetime | None


def console_ledger_rows(*, exact_up_to: int = 100_000) -> tuple[int, bool]:
    """The number of ledger rows and whether it is exact: `(n, True)` up to `exact_up_to`
    rows (a count that stops reading there), else on PostgreSQL the planner's estimate
    (`pg_class.reltuples`, kept by autovacuum) as `(n, False)`, so a sample never scans a
    large ledger. One or two queries, no lock."""
    estimate = -1
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                [LedgerEntry._meta.db_table],
            )
            row = cursor.fetchone()
        estimate = int(row[0]) if row else -1
        if estimate > 2 * exact_up_to:
            return estimate, False
    counted = LedgerEntry.objects.order_by()[: exact_up_to + 1].count()
    if counted <= exact_up_to:
        return counted, True
    return max(counted, estimate), False


def console_ingest_lag() -> IngestLag:
    """`IngestLag` of the newest ledger row (by primary key). One indexed query, no lock."""
    newest = LedgerEntry.objects.order_by("-pk").values("sent_at", "recorded_at").first()
    if newest is None:
        return {"lag_seconds": None, "recorded_at": None}
    lag = (newest["recorded_at"] - newest["sent_at"]).total_seconds()
    return {"lag_seconds": max(0.0, lag), "recorded_at": newest["recorded_at"]}


def console_consumers_alive() -> int:
    """Consumers whose heartbeat is fresher than WAREHOUSE_HEARTBEAT_STALE_SECONDS. One query
    on a table of one row per consumer, no lock."""
    limit = timezone.now() - timedelta(seconds=settings.WAREHOUSE_HEARTBEAT_STALE_SECONDS)
    return ConsumerHeartbeat.objects.filter(beat_at__gte=limit).count()


def console_dead_letters_waiting() -> QuerySet[DeadLetter]:
    """Dead letters not yet replayed successfully (never replayed, or replayed into another
    failure), newest first. Lazy queryset, no lock."""
    return DeadLetter.objects.exclude(replay_outcome__in=REPLAYED_OUTCOMES).order_by(
        "-received_at", "-pk"
    )


def console_dead_letter_reasons() -> list[tuple[str, int, datetime]]:
    """`console_dead_letters_waiting` grouped by reason: `(reason, count, newest
    received_at)`, the reason with the newest letter first. One GROUP BY, no lock."""
    rows = (
        DeadLetter.objects.exclude(replay_outcome__in=REPLAYED_OUTCOMES)
        .values("reason")
        .annotate(n=Count("id"), newest=Max("received_at"))
        .order_by("-newest", "reason")
    )
    return [(row["reason"], row["n"], row["newest"]) for row in rows]


def console_stock_short(*, limit: int = 20) -> tuple[int, Sequence[Stock]]:
    """Stock rows whose balance went below zero: their number and the `limit` most short
    (lowest balance first), in one query (a window count rides along; no index on `balance`,
    which would cost every stock update its HOT update). No lock."""
    rows = list(
        Stock.objects.filter(balance__lt=0)
        .annotate(total=Window(Count("*")))
        .order_by("balance", "pk")[:limit]
    )
    return (rows[0].total if rows else 0), rows
