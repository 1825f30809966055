"""Warehouse writes: the ingest pipeline (one transaction per batch), dead-letter replay, stock
rebuild and the consumer heartbeat.

Idempotency key of an event is `(movement_id, event)`, never the envelope `id` (both events of
a movement share it). Every message of a batch ends in exactly one place in the batch's
transaction: a new ledger row, the `duplicates` counter of the existing row, or a dead letter.
Queue messages also carry a message key (`schemas.message_key`): the ledger row, the dead letter
or the `DuplicateMessage` a message produced records it, so a redelivery of a batch that was
committed but not acked finds its messages already placed and changes nothing (outcome
`redelivered`: no new dead letter, no duplicate counted again).
"""

import json
import re
import threading
import uuid
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from django.conf import settings
from django.core.cache import cache
from django.db import InterfaceError, OperationalError, connection, models, transaction
from django.db.models import F, Sum
from django.utils import timezone
from prometheus_client import Counter, Histogram

from common.exceptions import NotFound, PreconditionFailed
from realtime.services import publish
from warehouse.lock_objects import stock_lock
from warehouse.models import ConsumerHeartbeat, DeadLetter, DuplicateMessage, LedgerEntry, Stock
from warehouse.schemas import Envelope, EnvelopeInvalid, envelope_parse, envelope_validate
from warehouse.selectors import movement_cache_key, stock_cache_key, stock_view

logger = structlog.get_logger(__name__)

STOCK_TOPIC = "warehouse.stock"

MOVEMENTS_STORED = Counter("movements_stored_counter", "Movement events stored in the ledger")
MESSAGES = Counter("warehouse_messages", "Consumed messages by result", ["result"])
DEAD_LETTERS = Counter("warehouse_dead_letters", "Dead-lettered messages by reason", ["reason"])
STOCK_SHORT = Counter("warehouse_stock_short", "Stock balances that went below zero")
BATCH_SIZE = Histogram(
    "warehouse_batch_size",
    "Messages per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
COMMIT_SECONDS = Histogram("warehouse_commit_seconds", "Time to process and commit one batch")
INGEST_LAG = Histogram(
    "warehouse_ingest_lag_seconds",
    "Commit time minus the envelope's `time` (producer clock)",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600, float("inf")),
)

Body = bytes | str | dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """Why message `index` of a batch was not stored: the dead-letter `reason`, the `field` at
    fault (dotted path, when one is) and a `detail` sentence naming it."""

    index: int
    reason: str
    detail: str
    field: str | None = None


@dataclass
class BatchResult:
    """Per-message outcome in input order: `stored`, `duplicate`, `redelivered` (a message
    already placed by an earlier delivery) or the dead-letter reason; `problems` explains each
    dead-lettered message."""

    outcomes: list[str] = field(default_factory=list)
    stock_changes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return self.outcomes.count("stored")

    @property
    def duplicates(self) -> int:
        return self.outcomes.count("duplicate")

    @property
    def redelivered(self) -> int:
        return self.outcomes.count("redelivered")

    @property
    def dead_letters(self) -> int:
        return len(self.outcomes) - self.stored - self.duplicates - self.redelivered

    def extend(self, other: "BatchResult") -> None:
        offset = len(self.outcomes)
        self.outcomes += other.outcomes
        self.stock_changes += other.stock_changes
        self.problems += [
            Problem(problem.index + offset, problem.reason, problem.detail, problem.field)
            for problem in other.problems
        ]


@dataclass
class _Failure:
    reason: str
    detail: str
    envelope: Envelope | None = None
    field: str | None = None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _raw_text(body: Body) -> str:
    """The body as storable text: PostgreSQL text cannot hold NUL or lone surrogates, and such a
    body is never valid anyway, so they become U+FFFD like any undecodable byte."""
    if isinstance(body, dict):
        return json.dumps(body, separators=(",", ":"))
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return _UNSTORABLE.sub("\ufffd", text[:65536])


def _parse(body: Body) -> Envelope:
    return envelope_validate(body) if isinstance(body, dict) else envelope_parse(body)


def _pg_cursor() -> Any:
    """A server-side-binding psycopg cursor on Django's connection (same transaction). Django's
    own cursors bind client-side, which quotes large array parameters slowly in Python."""
    import psycopg

    connection.ensure_connection()
    return psycopg.Cursor(connection.connection)


def _uuid_param(value: uuid.UUID) -> Any:
    return models.UUIDField().get_db_prep_value(value, connection)


def _stock_apply(deltas: dict[tuple[uuid.UUID, uuid.UUID], int], now: datetime) -> list[Any]:
    """Add each delta to its (warehouse, product) balance in one set-based upsert, in key order
    so concurrent consumers lock rows in the same order; returns the new balances."""
    if not deltas:
        return []
    table = connection.ops.quote_name(Stock._meta.db_table)
    rows = sorted(deltas.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    params: list[Any]
    if connection.vendor == "postgresql":
        # Three array parameters instead of 4 x N placeholders: far cheaper to send and plan.
        source = (
            "SELECT w, p, d, %b FROM unnest(%b::uuid[], %b::uuid[], %b::bigint[]) AS t(w, p, d)"
        )
        params = [now, [r[0][0] for r in rows], [r[0][1] for r in rows], [r[1] for r in rows]]
    else:
        when = models.DateTimeField().get_db_prep_value(now, connection)
        params = []
        for (warehouse_id, product_id), delta in rows:
            params += [_uuid_param(warehouse_id), _uuid_param(product_id), delta, when]
        source = "VALUES " + ", ".join(["(%s, %s, %s, %s)"] * len(rows))
    # Only the quoted table name and placeholders are interpolated; values are parameters.
    sql = (
        f"INSERT INTO {table} (warehouse_id, product_id, balance, updated_at) {source} "
        "ON CONFLICT (warehouse_id, product_id) DO UPDATE SET "
        f"balance = {table}.balance + excluded.balance, updated_at = excluded.updated_at "
        "RETURNING warehouse_id, product_id, balance"
    )
    with _pg_cursor() if connection.vendor == "postgresql" else connection.cursor() as cursor:
        cursor.execute(sql, params)
        # SQLite hands UUIDs back as bare hex: normalise so cache keys match the readers'.
        return [
            (uuid.UUID(str(w)), uuid.UUID(str(p)), int(balance))
            for w, p, balance in cursor.fetchall()
        ]


def _existing_entries(
    movement_ids: set[uuid.UUID],
) -> dict[tuple[uuid.UUID, str], tuple[int, str, str]]:
    """Stored (pk, fingerprint, message key) by idempotency key for the batch's movements."""
    rows: list[Any]
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(LedgerEntry._meta.db_table)
        with _pg_cursor() as cursor:
            cursor.execute(
                f"SELECT id, movement_id, event, fingerprint, message_key FROM {table} "  # noqa: S608
                "WHERE movement_id = ANY(%b::uuid[])",
                [list(movement_ids)],
            )
            rows = cursor.fetchall()
    else:
        rows = list(
            LedgerEntry.objects.filter(movement_id__in=movement_ids).values_list(
                "pk", "movement_id", "event", "fingerprint", "message_key"
            )
        )
    return {(movement_id, event): (pk, fp, key) for pk, movement_id, event, fp, key in rows}


def _known_keys(model: type[DeadLetter] | type[DuplicateMessage], keys: set[str]) -> set[str]:
    """The message keys among `keys` that already have a row of `model` (dead letter or
    duplicate record) from an earlier delivery."""
    if not keys:
        return set()
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(model._meta.db_table)
        with _pg_cursor() as cursor:
            # `<> ''` lets the planner use the dead letters' partial unique index.
            cursor.execute(
                f"SELECT message_key FROM {table} "  # noqa: S608
                "WHERE message_key = ANY(%b::text[]) AND message_key <> ''",
                [sorted(keys)],
            )
            return {row[0] for row in cursor.fetchall()}
    found: set[str] = set()
    ordered = sorted(keys)
    for start in range(0, len(ordered), 500):  # SQLite's bound-parameter limit
        chunk = ordered[start : start + 500]
        found.update(
            model.objects.filter(message_key__in=chunk).values_list("message_key", flat=True)
        )
    return found


_LEDGER_COLUMNS = (
    ("movement_id", "uuid"),
    ("event", "text"),
    ("warehouse_id", "uuid"),
    ("product_id", "uuid"),
    ("quantity", "integer"),
    ("delta", "bigint"),
    ("occurred_at", "timestamptz"),
    ("source", "text"),
    ("envelope_id", "uuid"),
    ("sent_at", "timestamptz"),
    ("fingerprint", "text"),
    ("duplicates", "integer"),
    ("recorded_at", "timestamptz"),
    ("message_key", "text"),
)


def _ledger_insert(entries: list[dict[str, Any]]) -> None:
    """Append the batch's new ledger rows in one statement (unnest of column arrays, sent in
    binary, on PostgreSQL; the ORM's multi-row INSERT elsewhere)."""
    if not entries:
        return
    if connection.vendor != "postgresql":
        LedgerEntry.objects.bulk_create([LedgerEntry(**entry) for entry in entries], batch_size=500)
        return
    table = connection.ops.quote_name(LedgerEntry._meta.db_table)
    names = ", ".join(name for name, _ in _LEDGER_COLUMNS)
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in _LEDGER_COLUMNS)
    params = [[entry[name] for entry in entries] for name, _ in _LEDGER_COLUMNS]
    with _pg_cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})",  # noqa: S608
            params,
        )


def _strict_filter(
    candidates: dict[tuple[uuid.UUID, str], tuple[int, Envelope]],
) -> set[tuple[uuid.UUID, str]]:
    """Keys whose departure would drive its stock below zero, in batch order, with the affected
    stock rows locked (ascending key order) for the rest of the transaction."""
    pairs = {(env.warehouse_id, env.product_id) for _, env in candidates.values()}
    balances = stock_lock(pairs=pairs)
    rejected: set[tuple[uuid.UUID, str]] = set()
    for key, (_, env) in sorted(candidates.items(), key=lambda item: item[1][0]):
        pair = (env.warehouse_id, env.product_id)
        after = balances.get(pair, 0) + env.delta
        if env.delta < 0 and after < 0:
            rejected.add(key)
            continue
        balances[pair] = after
    return rejected


def _ingest(
    bodies: Sequence[Body], keys: Sequence[str], *, record_dead_letters: bool = True
) -> BatchResult:
    now = timezone.now()
    outcomes: list[str] = [""] * len(bodies)
    failures: dict[int, _Failure] = {}
    fresh: dict[tuple[uuid.UUID, str], tuple[int, Envelope]] = {}
    copies: dict[tuple[uuid.UUID, str], list[int]] = defaultdict(list)

    # A message an earlier delivery dead-lettered, or a second copy of one message within the
    # batch, is already placed: it must not be dead-lettered or counted again.
    dead_lettered = _known_keys(DeadLetter, {key for key in keys if key})
    seen: set[str] = set()
    for index, body in enumerate(bodies):
        if message := keys[index]:
            if message in seen or message in dead_lettered:
                outcomes[index] = "redelivered"
                continue
            seen.add(message)
        try:
            env = _parse(body)
        except EnvelopeInvalid as exc:
            failures[index] = _Failure(exc.reason, exc.detail, field=exc.field)
            continue
        first = fresh.get(env.key)
        if first is None:
            fresh[env.key] = (index, env)
        elif first[1].fingerprint == env.fingerprint:
            copies[env.key].append(index)
        else:
            failures[index] = _Failure("conflict", "differs from an earlier copy in the batch", env)

    existing = _existing_entries({key[0] for key in fresh}) if fresh else {}

    # Copies of an event: index -> (its event key, the pk of the stored row or None for a row
    # inserted now, the message key that stored the row).
    repeats: dict[int, tuple[tuple[uuid.UUID, str], int | None, str]] = {}
    for key in [key for key in fresh if key in existing]:
        index, env = fresh.pop(key)
        pk, fingerprint, stored_by = existing[key]
        group = [index, *copies.pop(key, [])]
        if fingerprint == env.fingerprint:
            repeats.update((member, (key, pk, stored_by)) for member in group)
        else:
            for member in group:
                failures[member] = _Failure("conflict", "differs from the stored event", env)

    if settings.WAREHOUSE_STRICT_STOCK and fresh:
        for key in _strict_filter(fresh):
            index, env = fresh.pop(key)
            for rejected in [index, *copies.pop(key, [])]:
                failures[rejected] = _Failure(
                    "insufficient_stock", "departure exceeds the stock at the warehouse", env
                )
    for key, indexes in copies.items():
        repeats.update((member, (key, None, "")) for member in indexes)

    counted = _known_keys(DuplicateMessage, {keys[i] for i in repeats if keys[i]})
    new_duplicates: Tally[tuple[uuid.UUID, str]] = Tally()
    stored_pks: dict[tuple[uuid.UUID, str], int] = {}
    records: list[DuplicateMessage] = []
    for index, (key, row, stored_by) in repeats.items():
        message = keys[index]
        if message and (message == stored_by or message in counted):
            outcomes[index] = "redelivered"
            continue
        outcomes[index] = "duplicate"
        new_duplicates[key] += 1
        if row is not None:
            stored_pks[key] = row
        if message:
            records.append(
                DuplicateMessage(
                    message_key=message, movement_id=key[0], event=key[1], received_at=now
                )
            )

    entries: list[dict[str, Any]] = []
    deltas: dict[tuple[uuid.UUID, uuid.UUID], int] = defaultdict(int)
    for key, (index, env) in fresh.items():
        outcomes[index] = "stored"
        entries.append(
            {
                "movement_id": env.movement_id,
                "event": env.event,
                "warehouse_id": env.warehouse_id,
                "product_id": env.product_id,
                "quantity": env.quantity,
                "delta": env.delta,
                "occurred_at": env.timestamp,
                "source": env.source,
                "envelope_id": env.id,
                "sent_at": env.time,
                "fingerprint": env.fingerprint,
                "duplicates": new_duplicates.get(key, 0),
                "recorded_at": now,
                "message_key": keys[index],
            }
        )
        deltas[(env.warehouse_id, env.product_id)] += env.delta

    _ledger_insert(entries)
    by_count: dict[int, list[int]] = defaultdict(list)
    for key, pk in stored_pks.items():
        by_count[new_duplicates[key]].append(pk)
    for count, pks in by_count.items():
        LedgerEntry.objects.filter(pk__in=pks).update(duplicates=F("duplicates") + count)
    # A plain insert: a concurrent delivery of the same message fails this batch (retried
    # message by message) rather than counting it twice.
    DuplicateMessage.objects.bulk_create(records)
    balances = _stock_apply(deltas, now)

    problems: list[Problem] = []
    for index, failure in sorted(failures.items()):
        outcomes[index] = failure.reason
        problems.append(Problem(index, failure.reason, failure.detail[:500], failure.field))
    if record_dead_letters and failures:
        DeadLetter.objects.bulk_create(
            [
                DeadLetter(
                    received_at=now,
                    body=_raw_text(bodies[index]),
                    reason=failure.reason,
                    detail=failure.detail[:500],
                    movement_id=failure.envelope.movement_id if failure.envelope else None,
                    event=failure.envelope.event if failure.envelope else "",
                    message_key=keys[index],
                )
                for index, failure in failures.items()
            ],
            ignore_conflicts=True,
        )

    changes = [
        {
            "warehouse_id": str(warehouse_id),
            "product_id": str(product_id),
            "balance": balance,
            "quantity": max(balance, 0),
            "short": balance < 0,
            "updated_at": now.isoformat(),
        }
        for warehouse_id, product_id, balance in balances
    ]
    touched_movements = {env.movement_id for _, env in fresh.values()}
    stored_times = [env.time for _, env in fresh.values()]
    result = BatchResult(outcomes=outcomes, stock_changes=changes, problems=problems)
    transaction.on_commit(lambda: _after_commit(result, touched_movements, stored_times))
    if changes:
        publish(STOCK_TOPIC, {"changes": changes})
    return result


# --- read cache write-through -------------------------------------------------------------
# After a commit, stock entries are replaced by the committed values (the next read is a hit)
# and movement views are invalidated (recomputed from the ledger on the next read). The cache
# fails open (common.cache): while Redis is unreachable those writes are dropped, and entries
# written before the outage would outlive it by up to WAREHOUSE_CACHE_SECONDS if Redis comes
# back with its data (a partition, a restart from a snapshot). So this process remembers the
# keys it could not write and invalidates them as soon as the cache takes writes again: on its
# next write-through or `read_cache_resync` (the consumer calls it with its heartbeat).
# Invalidation overwrites with a one-second tombstone rather than deleting, because only
# `set_many` reports whether the fail-open cache took the write.
_TOMBSTONE = "stale"
UNSYNCED_MAX = 100_000
_unsynced: set[str] = set()
_unsynced_overflowed = False
_unsynced_lock = threading.Lock()


def _cache_write(views: dict[str, dict[str, Any]], stale: set[str]) -> bool:
    """Write `views`, invalidate `stale`; True when the cache took both."""
    failed = cache.set_many(views, settings.WAREHOUSE_CACHE_SECONDS) if views else []
    if not failed and stale:
        failed = cache.set_many(dict.fromkeys(stale, _TOMBSTONE), 1)
    return not failed


def _cache_sync(views: dict[str, dict[str, Any]], stale: set[str]) -> None:
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


def read_cache_resync() -> int:
    """Invalidate the cache entries this process could not write while the cache was
    unreachable, if it takes writes now; returns how many remain unsynced. Idempotent; cheap
    when there is nothing to do."""
    if _unsynced:
        _cache_sync({}, set())
    return len(_unsynced)


def _after_commit(
    result: BatchResult, movement_ids: set[uuid.UUID], sent_times: list[datetime]
) -> None:
    # With several consumers on one queue, two batches' writes could land out of order; entries
    # then heal after WAREHOUSE_CACHE_SECONDS, so run one consumer per queue.
    stock_views = {
        stock_cache_key(c["warehouse_id"], c["product_id"]): {
            key: c[key]
            for key in ("warehouse_id", "product_id", "quantity", "balance", "short", "updated_at")
        }
        for c in result.stock_changes
    }
    movement_keys = {movement_cache_key(str(movement_id)) for movement_id in movement_ids}
    _cache_sync(stock_views, movement_keys)
    tally = Tally(result.outcomes)
    for outcome, count in tally.items():
        if outcome in ("stored", "duplicate", "redelivered"):
            MESSAGES.labels(outcome).inc(count)
        else:
            MESSAGES.labels("dead_letter").inc(count)
            DEAD_LETTERS.labels(outcome).inc(count)
    MOVEMENTS_STORED.inc(tally.get("stored", 0))
    STOCK_SHORT.inc(sum(1 for change in result.stock_changes if change["short"]))
    BATCH_SIZE.observe(len(result.outcomes))
    now = timezone.now()
    for sent in sent_times[:50]:
        INGEST_LAG.observe(max(0.0, (now - sent).total_seconds()))


@transaction.atomic
def movements_ingest(*, bodies: Sequence[Body], keys: Sequence[str] | None = None) -> BatchResult:
    """Run one batch of raw messages through validation, dedup and stock update in one
    transaction; raises if anything unexpected fails (nothing of the batch is then written).

    `keys` are the messages' identities (`schemas.message_key`; "" or None for REST items,
    which are new messages every time). Side effects (cache invalidation, metrics, the
    `warehouse.stock` publish) happen after commit; the caller acks only after this returns."""
    with COMMIT_SECONDS.time():
        return _ingest(bodies, keys or [""] * len(bodies))


def movements_ingest_isolated(
    *, bodies: Sequence[Body], keys: Sequence[str] | None = None
) -> BatchResult:
    """`movements_ingest`, and if the batch fails unexpectedly, each message again in its own
    transaction, so a poison message hurts only itself: one that still fails is dead-lettered
    as `error` (once per message key) and the rest of the batch is applied.

    A lost database (OperationalError, InterfaceError) is raised, not dead-lettered: nothing was
    acked and the messages come back."""
    keys = list(keys or [""] * len(bodies))
    try:
        return movements_ingest(bodies=bodies, keys=keys)
    except Exception as exc:
        if _database_unavailable(exc):
            raise
        logger.exception("warehouse_batch_failed_retrying_singly", size=len(bodies))
    result = BatchResult()
    for body, key in zip(bodies, keys, strict=True):
        try:
            single = movements_ingest(bodies=[body], keys=[key])
        except Exception as exc:
            if _database_unavailable(exc):
                raise
            logger.exception("warehouse_message_failed")
            single = _dead_letter_error(body, key, exc)
        result.extend(single)
    return result


@transaction.atomic
def _dead_letter_error(body: Body, key: str, exc: Exception) -> BatchResult:
    if key and DeadLetter.objects.filter(message_key=key).exists():
        return BatchResult(outcomes=["redelivered"])
    detail = f"unexpected {type(exc).__name__} while ingesting (see the log)"
    DeadLetter.objects.bulk_create(
        [
            DeadLetter(
                received_at=timezone.now(),
                body=_raw_text(body),
                reason=DeadLetter.Reason.ERROR,
                detail=detail,
                message_key=key,
            )
        ],
        ignore_conflicts=True,
    )
    transaction.on_commit(lambda: DEAD_LETTERS.labels("error").inc())
    return BatchResult(outcomes=["error"], problems=[Problem(0, "error", detail)])


def _database_unavailable(exc: Exception) -> bool:
    return isinstance(exc, OperationalError | InterfaceError)


@transaction.atomic
def dead_letter_replay(*, dead_letter_id: int) -> DeadLetter:
    """Run a dead letter's raw body through the pipeline again. On success (`stored` or
    `duplicate`) it is marked replayed; otherwise it stays with the new reason and detail.
    Replaying the same dead letter twice is refused. An unexpected failure of the pipeline is
    rolled back alone and recorded as outcome `error` (logged), never raised."""
    dead_letter = DeadLetter.objects.select_for_update().filter(pk=dead_letter_id).first()
    if dead_letter is None:
        raise NotFound("No such dead letter.")
    if dead_letter.replay_outcome in ("stored", "duplicate"):
        raise PreconditionFailed("Already replayed.", code="already_replayed")
    try:
        with transaction.atomic():
            result = _ingest([dead_letter.body], [""], record_dead_letters=False)
    except Exception as exc:
        if _database_unavailable(exc):
            raise
        logger.exception("warehouse_replay_failed", dead_letter_id=dead_letter_id)
        result = BatchResult(
            outcomes=["error"],
            problems=[Problem(0, "error", f"unexpected {type(exc).__name__} (see the log)")],
        )
    outcome = result.outcomes[0]
    dead_letter.replayed_at = timezone.now()
    dead_letter.replay_outcome = outcome
    fields = ["replayed_at", "replay_outcome"]
    if result.problems:
        dead_letter.reason = outcome
        dead_letter.detail = result.problems[0].detail[:500]
        fields += ["reason", "detail"]
    dead_letter.save(update_fields=fields)
    return dead_letter


@transaction.atomic
def stock_rebuild() -> int:
    """Recompute every balance from the ledger (stock == Σ ledger); returns the row count.
    After commit the stock cache entries are rewritten (and those of pairs that no longer
    exist invalidated); nothing else in the cache is touched."""
    now = timezone.now()
    before = set(Stock.objects.values_list("warehouse_id", "product_id"))
    Stock.objects.all().delete()
    rows = (
        LedgerEntry.objects.values("warehouse_id", "product_id")
        .annotate(total=Sum("delta"))
        .order_by()
    )
    stock = [
        Stock(
            warehouse_id=row["warehouse_id"],
            product_id=row["product_id"],
            balance=row["total"],
            updated_at=now,
        )
        for row in rows
    ]
    Stock.objects.bulk_create(stock, batch_size=5000)
    views = {
        stock_cache_key(str(row.warehouse_id), str(row.product_id)): stock_view(row)
        for row in stock
    }
    gone = {
        stock_cache_key(str(warehouse_id), str(product_id)) for warehouse_id, product_id in before
    } - views.keys()
    transaction.on_commit(lambda: _cache_sync_chunked(views, gone))
    return len(stock)


def _cache_sync_chunked(
    views: dict[str, dict[str, Any]], stale: set[str], size: int = 5000
) -> None:
    items, stale_keys = list(views.items()), list(stale)
    for start in range(0, max(len(items), len(stale_keys)), size):
        _cache_sync(dict(items[start : start + size]), set(stale_keys[start : start + size]))


def consumer_heartbeat_beat(*, name: str, started_at: datetime) -> None:
    """Record that consumer `name` is alive (one upsert)."""
    ConsumerHeartbeat.objects.update_or_create(
        name=name, defaults={"beat_at": timezone.now(), "started_at": started_at}
    )


def consumer_heartbeat_clear(*, name: str) -> None:
    """A cleanly stopped consumer is not stale: forget it."""
    ConsumerHeartbeat.objects.filter(name=name).delete()
