"""The ingest pipeline: one transaction per batch of raw messages, in named steps.

Idempotency key of an event is `(movement_id, event)`, never the envelope `id` (both events of
a movement share it). Every message of a batch ends in exactly one place in the batch's
transaction: a new ledger row, the `duplicates` counter of the existing row, or a dead letter.
Queue messages also carry a message key (`schemas.message_key`): the ledger row, the dead letter
or the `DuplicateMessage` a message produced records it, so a redelivery of a batch that was
committed but not acked finds its messages already placed and changes nothing (outcome
`redelivered`: no new dead letter, no duplicate counted again).

The steps of `_ingest`, in order (each a function below):
1. `_classify`: skip messages already placed (a key seen earlier in the batch, or dead-lettered
   by an earlier delivery), parse the rest, group copies of one event within the batch;
2. `_lock_stock` (WAREHOUSE_STRICT_STOCK only): lock the stock rows of the batch's pairs;
3. `_match_stored`: events already in the ledger become repeats (same payload) or conflicts;
4. `_reject_short_departures` (WAREHOUSE_STRICT_STOCK only): refuse departures that would go
   below zero;
5. `_count_repeats`: each repeat is a `duplicate` (counted once per message key) or
   `redelivered`;
6. `_store`: insert the new ledger rows and apply their stock deltas, settle the events another
   transaction stored meanwhile (`_settle_stored_meanwhile`), record the duplicates' message keys
   and bump the duplicate counters;
7. `_dead_letter`: every refused message becomes a dead letter (once per message key);
8. `_announce`: after commit the read cache is written through and the metrics counted; the
   stock changes are published on `warehouse.stock`.

Several consumers can run this on one queue at once (and the REST ingest beside them): two
batches holding copies of one event both find it new in step 3, and the one that inserts second
waits for the first to commit, skips the row and settles those messages as repeats of the
stored row in the same transaction (`_settle_stored_meanwhile`), as if it had found the row in
step 3. Every row two batches can both write is taken in ascending key order (`ledger_sql`), so
they never deadlock; a transaction the database still rolls back (a deadlock or serialization
failure from elsewhere) is retried whole (`movements_ingest_isolated`), logged in one line.
"""

import json
import re
import uuid
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone
from prometheus_client import Counter, Histogram

from common.console import console_count
from realtime.services import publish
from warehouse import read_cache
from warehouse.lock_objects import stock_lock
from warehouse.models import DeadLetter, DuplicateMessage
from warehouse.read_cache import StockView
from warehouse.schemas import Envelope, EnvelopeInvalid, envelope_parse, envelope_validate
from warehouse.services.ledger_sql import (
    EventKey,
    Pair,
    duplicates_add,
    duplicates_claim,
    entries_existing,
    ledger_store,
    message_keys_known,
)

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
    dead-lettered message; `stock_changes` are the new views of the pairs the batch moved."""

    outcomes: list[str] = field(default_factory=list)
    stock_changes: list[StockView] = field(default_factory=list)
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
        """Append `other`'s messages after this result's (problem indexes shifted)."""
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


@dataclass(frozen=True)
class _Repeat:
    """A message repeating an event: its key, the pk of the stored row (None for a row the
    batch inserts now) and the message key that stored the row."""

    key: EventKey
    row: int | None
    stored_by: str


@dataclass
class _Batch:
    """The state the steps of one `_ingest` pass along, by message index."""

    bodies: Sequence[Body]
    keys: Sequence[str]
    now: datetime
    outcomes: list[str]
    # `movements_parse` of `bodies`, when the caller validated them ahead.
    parsed: "Sequence[Parsed] | None" = None
    failures: dict[int, _Failure] = field(default_factory=dict)
    # The first copy of each event not stored yet, and the indexes of its later copies.
    fresh: dict[EventKey, tuple[int, Envelope]] = field(default_factory=dict)
    copies: dict[EventKey, list[int]] = field(default_factory=lambda: defaultdict(list))
    repeats: dict[int, _Repeat] = field(default_factory=dict)
    # The stock rows' versions after the batch, parallel to its `stock_changes`.
    stock_versions: list[int] = field(default_factory=list)

    def fail(self, indexes: list[int], reason: str, detail: str, envelope: Envelope) -> None:
        for index in indexes:
            self.failures[index] = _Failure(reason, detail, envelope)

    def group(self, key: EventKey) -> list[int]:
        """Take event `key` out of `fresh`: the indexes of its first copy and later copies."""
        index, _ = self.fresh.pop(key)
        return [index, *self.copies.pop(key, [])]


@dataclass
class _Counts:
    """The duplicates a batch counts: new duplicate messages per event, the pks of rows stored
    before the batch whose counters get them, and the message keys to record (message key ->
    its index in the batch and its event)."""

    new: Tally[EventKey] = field(default_factory=Tally)
    stored_pks: dict[EventKey, int] = field(default_factory=dict)
    records: dict[str, tuple[int, EventKey]] = field(default_factory=dict)

    def forget(self, keys: set[EventKey]) -> None:
        """Drop everything counted for the events `keys`."""
        for key in keys:
            self.new.pop(key, None)
            self.stored_pks.pop(key, None)
        self.records = {m: entry for m, entry in self.records.items() if entry[1] not in keys}

    def merge(self, other: "_Counts", indexes: list[int]) -> None:
        """Add the counts of a sub-batch whose message `i` is this batch's `indexes[i]`."""
        self.new.update(other.new)
        self.stored_pks.update(other.stored_pks)
        self.records.update(
            (message, (indexes[position], key))
            for message, (position, key) in other.records.items()
        )


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


Parsed = Envelope | EnvelopeInvalid | None


def movements_parse(bodies: Sequence[Body]) -> list[Parsed]:
    """Validate a batch ahead of `movements_ingest_isolated(parsed=...)`, so a consumer can do
    it while the previous batch commits: per body its `Envelope`, its refusal
    (`EnvelopeInvalid`), or None when validation failed unexpectedly (the ingest then validates
    that body again inside its transaction, where the failure is isolated like any other).
    Pure: no database or Django state; safe in any thread."""
    parsed: list[Parsed] = []
    for body in bodies:
        try:
            parsed.append(_parse(body))
        except EnvelopeInvalid as exc:
            parsed.append(exc)
        except Exception:
            parsed.append(None)
    return parsed


def _classify(batch: _Batch) -> None:
    """Step 1. A message an earlier delivery dead-lettered, or a second copy of one message
    within the batch, is already placed: `redelivered`, never dead-lettered or counted again.
    The rest are parsed (a refusal is a failure) and grouped by event key; a later copy with
    another payload is a `conflict`."""
    dead_lettered = message_keys_known(DeadLetter, {key for key in batch.keys if key})
    seen: set[str] = set()
    for index, body in enumerate(batch.bodies):
        if message := batch.keys[index]:
            if message in seen or message in dead_lettered:
                batch.outcomes[index] = "redelivered"
                continue
            seen.add(message)
        prepared = batch.parsed[index] if batch.parsed is not None else None
        if prepared is None:
            try:
                prepared = _parse(body)
            except EnvelopeInvalid as exc:
                prepared = exc
        if isinstance(prepared, EnvelopeInvalid):
            batch.failures[index] = _Failure(prepared.reason, prepared.detail, field=prepared.field)
            continue
        env = prepared
        first = batch.fresh.get(env.key)
        if first is None:
            batch.fresh[env.key] = (index, env)
        elif first[1].fingerprint == env.fingerprint:
            batch.copies[env.key].append(index)
        else:
            batch.fail([index], "conflict", "differs from an earlier copy in the batch", env)


def _match_stored(batch: _Batch) -> None:
    """Step 3. Events already in the ledger leave `fresh`: with the stored payload their copies
    are repeats of the stored row, with another payload they are all conflicts."""
    if not batch.fresh:
        return
    existing = entries_existing({key[0] for key in batch.fresh})
    for key in [key for key in batch.fresh if key in existing]:
        env = batch.fresh[key][1]
        group = batch.group(key)
        pk, fingerprint, stored_by = existing[key]
        if fingerprint == env.fingerprint:
            batch.repeats.update((member, _Repeat(key, pk, stored_by)) for member in group)
        else:
            batch.fail(group, "conflict", "differs from the stored event", env)


def _lock_stock(batch: _Batch) -> dict[Pair, int]:
    """Step 2 (WAREHOUSE_STRICT_STOCK). Lock the stock rows of the pairs of the batch's new
    events (ascending key order, for the rest of the transaction) and return their balances.
    Taken before step 3: a transaction that stored one of these events holds its pair's row
    until it commits, so step 3 then sees everything stored for these pairs."""
    return stock_lock(pairs={(env.warehouse_id, env.product_id) for _, env in batch.fresh.values()})


def _reject_short_departures(batch: _Batch, balances: dict[Pair, int]) -> None:
    """Step 4 (WAREHOUSE_STRICT_STOCK). In batch order, refuse each departure that would drive
    its stock (`balances`, locked in step 2) below zero, with all its copies
    (`insufficient_stock`)."""
    for key, (_, env) in sorted(batch.fresh.items(), key=lambda item: item[1][0]):
        pair = (env.warehouse_id, env.product_id)
        after = balances.get(pair, 0) + env.delta
        if env.delta < 0 and after < 0:
            detail = "departure exceeds the stock at the warehouse"
            batch.fail(batch.group(key), "insufficient_stock", detail, env)
            continue
        balances[pair] = after


def _count_repeats(batch: _Batch) -> _Counts:
    """Step 5. Later in-batch copies of the events stored now are repeats too. Each repeat is
    `redelivered` when its message key stored the row or was counted before, else a
    `duplicate`. Returns what to count (`_Counts`)."""
    for key, indexes in batch.copies.items():
        batch.repeats.update((member, _Repeat(key, None, "")) for member in indexes)
    keys = batch.keys
    counted = message_keys_known(DuplicateMessage, {keys[i] for i in batch.repeats if keys[i]})
    counts = _Counts()
    for index, repeat in batch.repeats.items():
        message = keys[index]
        if message and (message == repeat.stored_by or message in counted):
            batch.outcomes[index] = "redelivered"
            continue
        batch.outcomes[index] = "duplicate"
        counts.new[repeat.key] += 1
        if repeat.row is not None:
            counts.stored_pks[repeat.key] = repeat.row
        if message:
            counts.records[message] = (index, repeat.key)
    return counts


def _store(batch: _Batch, counts: _Counts) -> list[StockView]:
    """Step 6. Insert the new ledger rows (`stored`) with their stock deltas, settle the events
    another transaction stored meanwhile, record the counted duplicates' message keys and bump
    the counters of rows stored earlier; returns the moved pairs' new views (their versions go
    to `batch.stock_versions`)."""
    entries: list[tuple[Any, ...]] = []
    now, keys = batch.now, batch.keys
    for key, (index, env) in batch.fresh.items():
        # In `ledger_sql.LEDGER_COLUMNS` order.
        entries.append(
            (
                env.movement_id,
                env.event,
                env.warehouse_id,
                env.product_id,
                env.quantity,
                env.delta,
                env.timestamp,
                env.source,
                env.id,
                env.time,
                env.fingerprint,
                counts.new.get(key, 0),
                now,
                keys[index],
            )
        )
    stored = ledger_store(entries, now)
    if stored.missed:
        _settle_stored_meanwhile(batch, counts, stored.missed)
    for index, _ in batch.fresh.values():
        batch.outcomes[index] = "stored"
    _record_duplicates(batch, counts)
    batch.stock_versions = [version for *_, version in stored.balances]
    return read_cache.stock_views(
        [(w, p, balance) for w, p, balance, _ in stored.balances], updated_at=now
    )


def _settle_stored_meanwhile(batch: _Batch, counts: _Counts, missed: set[EventKey]) -> None:
    """Events of `fresh` that another transaction stored (and committed) after step 3 looked:
    their messages (first copies and in-batch copies) run through steps 1, 3 and 5 again as a
    sub-batch, which now finds the stored rows, and its outcomes, refusals and counts replace
    what this batch had planned for them. Nothing of them was written yet but their (skipped)
    ledger rows."""
    counts.forget(missed)
    indexes = [index for key in sorted(missed) for index in batch.group(key)]
    sub = _Batch(
        bodies=[batch.bodies[i] for i in indexes],
        keys=[batch.keys[i] for i in indexes],
        now=batch.now,
        outcomes=[""] * len(indexes),
        parsed=None if batch.parsed is None else [batch.parsed[i] for i in indexes],
    )
    _classify(sub)
    _match_stored(sub)
    if sub.fresh:
        raise RuntimeError("events skipped as stored meanwhile are not in the ledger")
    counts.merge(_count_repeats(sub), indexes)
    for position, index in enumerate(indexes):
        batch.outcomes[index] = sub.outcomes[position]
        if position in sub.failures:
            batch.failures[index] = sub.failures[position]


def _record_duplicates(batch: _Batch, counts: _Counts) -> None:
    """Record the counted duplicates' message keys and add the counts to the rows stored before
    the batch. A message key another transaction recorded meanwhile (the same message delivered
    twice at once, e.g. redelivered while its first delivery was still committing) is not
    counted again: `redelivered`."""
    if counts.records:
        claimed = duplicates_claim(
            [
                DuplicateMessage(
                    message_key=message,
                    movement_id=key[0],
                    event=key[1],
                    received_at=batch.now,
                )
                for message, (_, key) in counts.records.items()
            ]
        )
        # Only repeats of rows stored before the batch can lose their claim: another batch
        # sees a row this one inserts only after this one committed, claims included.
        for message, (index, key) in counts.records.items():
            if message not in claimed:
                batch.outcomes[index] = "redelivered"
                counts.new[key] -= 1
    duplicates_add(
        {pk: counts.new[key] for key, pk in counts.stored_pks.items() if counts.new[key] > 0}
    )


def _dead_letter(batch: _Batch, *, record: bool) -> list[Problem]:
    """Step 7. Each failure sets its message's outcome to the reason and, with `record`,
    becomes a dead letter (a message key dead-lettered before adds nothing). Returns the
    problems in message order."""
    problems: list[Problem] = []
    for index, failure in sorted(batch.failures.items()):
        batch.outcomes[index] = failure.reason
        problems.append(Problem(index, failure.reason, failure.detail[:500], failure.field))
    if record and batch.failures:
        DeadLetter.objects.bulk_create(
            [
                DeadLetter(
                    received_at=batch.now,
                    body=_raw_text(batch.bodies[index]),
                    reason=failure.reason,
                    detail=failure.detail[:500],
                    movement_id=failure.envelope.movement_id if failure.envelope else None,
                    event=failure.envelope.event if failure.envelope else "",
                    message_key=batch.keys[index],
                )
                # In message key order, as every insert two batches may share.
                for index, failure in sorted(
                    batch.failures.items(), key=lambda item: batch.keys[item[0]]
                )
            ],
            ignore_conflicts=True,
        )
    return problems


def _announce(batch: _Batch, result: BatchResult) -> None:
    """Step 8. After commit: write the read cache through and count the metrics. The stock
    changes go out on `warehouse.stock` (realtime delivers them after commit too)."""
    events: dict[uuid.UUID, int] = defaultdict(int)
    for movement_id, event in batch.fresh:
        events[movement_id] |= read_cache.EVENT_BITS[event]
    sent_times = [env.time for _, env in batch.fresh.values()]
    versions = batch.stock_versions
    transaction.on_commit(lambda: _after_commit(result, versions, events, sent_times))
    if result.stock_changes:
        publish(STOCK_TOPIC, {"changes": result.stock_changes})


def _ingest(
    bodies: Sequence[Body],
    keys: Sequence[str],
    *,
    record_dead_letters: bool = True,
    parsed: Sequence[Parsed] | None = None,
) -> BatchResult:
    batch = _Batch(
        bodies=bodies, keys=keys, now=timezone.now(), outcomes=[""] * len(bodies), parsed=parsed
    )
    _classify(batch)
    strict = settings.WAREHOUSE_STRICT_STOCK
    balances = _lock_stock(batch) if strict and batch.fresh else {}
    _match_stored(batch)
    if strict and batch.fresh:
        _reject_short_departures(batch, balances)
    changes = _store(batch, _count_repeats(batch))
    problems = _dead_letter(batch, record=record_dead_letters)
    result = BatchResult(outcomes=batch.outcomes, stock_changes=changes, problems=problems)
    _announce(batch, result)
    return result


def _after_commit(
    result: BatchResult,
    versions: list[int],
    events: dict[uuid.UUID, int],
    sent_times: list[datetime],
) -> None:
    read_cache.stock_changes_write_through(result.stock_changes, versions, events)
    tally = Tally(result.outcomes)
    for outcome, count in tally.items():
        if outcome in ("stored", "duplicate", "redelivered"):
            MESSAGES.labels(outcome).inc(count)
        else:
            MESSAGES.labels("dead_letter").inc(count)
            DEAD_LETTERS.labels(outcome).inc(count)
    MOVEMENTS_STORED.inc(tally.get("stored", 0))
    console_count("warehouse.messages", len(result.outcomes))
    console_count("warehouse.duplicates", tally.get("duplicate", 0))
    STOCK_SHORT.inc(sum(1 for change in result.stock_changes if change["short"]))
    BATCH_SIZE.observe(len(result.outcomes))
    now = timezone.now()
    for sent in sent_times[:50]:
        INGEST_LAG.observe(max(0.0, (now - sent).total_seconds()))


@transaction.atomic
def movements_ingest(
    *,
    bodies: Sequence[Body],
    keys: Sequence[str] | None = None,
    parsed: Sequence[Parsed] | None = None,
) -> BatchResult:
    """Run one batch of raw messages (JSON text or bytes, or already-decoded dicts) through
    validation, dedup and stock update in one transaction; returns a `BatchResult` with one
    outcome per message, in input order.

    `keys` are the messages' identities (`schemas.message_key`; "" or None for REST items,
    which are new messages every time): idempotent per message key, so a redelivered batch
    changes nothing. Idempotent per event key `(movement_id, event)` whatever the keys: a
    repeat only counts a duplicate. Safe beside concurrent batches with the same events or
    messages (other consumers on the queue, the REST ingest): whichever commits second counts
    them as repeats of the first one's rows, as if they had come later. Locks, until commit, in
    ascending key order: the new ledger keys, the moved pairs' stock rows (with
    WAREHOUSE_STRICT_STOCK from before the ledger lookup), the bumped ledger rows and the
    recorded duplicates' message keys. Invalid messages are dead letters, never raised;
    anything unexpected raises (nothing of the batch is then written).
    Side effects (cache write-through, metrics, the `warehouse.stock` publish) happen after
    commit; the caller acks only after this returns. `parsed` is `movements_parse(bodies)`
    when the caller validated the bodies ahead."""
    with COMMIT_SECONDS.time():
        return _ingest(bodies, keys or [""] * len(bodies), parsed=parsed)


def movements_ingest_isolated(
    *,
    bodies: Sequence[Body],
    keys: Sequence[str] | None = None,
    parsed: Sequence[Parsed] | None = None,
) -> BatchResult:
    """`movements_ingest`, and if the batch fails unexpectedly, each message again in its own
    transaction, so a poison message hurts only itself: one that still fails is dead-lettered
    as `error` (once per message key) and the rest of the batch is applied.

    A transaction the database rolled back because of a concurrent one (deadlock victim,
    serialization failure) is run again as it was, up to ROLLBACK_RETRIES times, with one
    warning line each (`_ingest_retrying`). A lost database (OperationalError, InterfaceError)
    is raised, not dead-lettered: nothing was acked and the messages come back."""
    keys = list(keys or [""] * len(bodies))
    try:
        return _ingest_retrying(bodies=bodies, keys=keys, parsed=parsed)
    except Exception as exc:
        if database_unavailable(exc):
            raise
        logger.exception("warehouse_batch_failed_retrying_singly", size=len(bodies))
    result = BatchResult()
    for index, (body, key) in enumerate(zip(bodies, keys, strict=True)):
        try:
            single = _ingest_retrying(
                bodies=[body], keys=[key], parsed=None if parsed is None else [parsed[index]]
            )
        except Exception as exc:
            if database_unavailable(exc):
                raise
            logger.exception("warehouse_message_failed")
            single = _dead_letter_error(body, key, exc)
        result.extend(single)
    return result


ROLLBACK_RETRIES = 5


def rolled_back_by_peer(exc: BaseException) -> str | None:
    """The SQLSTATE when the database rolled the transaction back because of a concurrent one
    (class 40: deadlock victim 40P01, serialization failure 40001), which running it again
    resolves; None for anything else."""
    state = getattr(exc.__cause__, "sqlstate", None)
    return state if isinstance(state, str) and state.startswith("40") else None


def _ingest_retrying(
    *, bodies: Sequence[Body], keys: Sequence[str], parsed: Sequence[Parsed] | None
) -> BatchResult:
    """`movements_ingest`, run again when the database rolled it back because of a concurrent
    transaction (`rolled_back_by_peer`), at most ROLLBACK_RETRIES times in all; only as the
    outermost transaction (inside another one the rollback is the caller's to handle)."""
    attempt = 1
    while True:
        try:
            return movements_ingest(bodies=bodies, keys=keys, parsed=parsed)
        except OperationalError as exc:
            state = rolled_back_by_peer(exc)
            outermost = not transaction.get_connection().in_atomic_block
            if state is None or not outermost or attempt >= ROLLBACK_RETRIES:
                raise
            logger.warning(
                "warehouse_batch_rolled_back_retrying",
                sqlstate=state,
                attempt=attempt,
                size=len(bodies),
            )
            attempt += 1


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


def database_unavailable(exc: Exception) -> bool:
    """Whether `exc` means the database is gone (to be raised, never dead-lettered)."""
    return isinstance(exc, OperationalError | InterfaceError)


def replay_one(body: Body, *, dead_letter_id: int) -> BatchResult:
    """One stored body through the pipeline again, in a savepoint, recording no dead letter
    (the caller owns the dead letter being replayed). An unexpected failure is rolled back
    alone and returned as outcome `error` (logged); a lost database is raised."""
    try:
        with transaction.atomic():
            return _ingest([body], [""], record_dead_letters=False)
    except Exception as exc:
        if database_unavailable(exc):
            raise
        logger.exception("warehouse_replay_failed", dead_letter_id=dead_letter_id)
        return BatchResult(
            outcomes=["error"],
            problems=[Problem(0, "error", f"unexpected {type(exc).__name__} (see the log)")],
        )
