"""The ingest's set-based statements: one statement per step of a batch, whatever its size.

On PostgreSQL the new ledger rows go the fastest correct way (`ledger_store`): binary COPY into a
session-private staging table, then one statement that inserts them into the ledger with the
dedupe (ON CONFLICT on the idempotency key DO NOTHING) and upserts the stock with the summed
deltas of the rows it really inserted. Lookups run on a server-side-binding psycopg cursor with
array parameters (sent in binary). Elsewhere (SQLite) the same steps are multi-row statements
on Django's cursor. All run on Django's connection, in the caller's transaction. Only quoted
table names and placeholders are interpolated into SQL; values are always parameters.

Several consumers may run these at once on one queue: every write that two batches can share
(a ledger key, a stock row, a duplicate's message key, a counter bump) is an insert that skips
what exists or a lock taken in one fixed order (ascending key), so concurrent batches wait for
each other but never fail on a unique index or deadlock; what another batch stored meanwhile
is reported to the caller (`Stored.missed`), not raised.
"""

import contextlib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, NamedTuple, cast

from django.db import connection, models
from django.db.models import F

from warehouse.models import DeadLetter, DuplicateMessage, LedgerEntry, Stock

EventKey = tuple[uuid.UUID, str]
Pair = tuple[uuid.UUID, uuid.UUID]


@contextlib.contextmanager
def _pg_cursor() -> Iterator[Any]:
    """A server-side-binding psycopg cursor on Django's connection (same transaction). Django's
    own cursors bind client-side, which quotes large array parameters slowly in Python. Errors
    come out as Django's (`django.db.utils`, the psycopg error as `__cause__`), like the ORM's."""
    import psycopg

    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


def _fields(model: type[models.Model], names: Iterable[str]) -> list["models.Field[Any, Any]"]:
    """The concrete fields `names` of `model`, to prepare values for raw statements."""
    return [cast("models.Field[Any, Any]", model._meta.get_field(name)) for name in names]


def _uuid_param(value: uuid.UUID) -> Any:
    return models.UUIDField().get_db_prep_value(value, connection)


class Stored(NamedTuple):
    """What `ledger_store` wrote: the moved pairs' new (warehouse_id, product_id, balance,
    version) rows, ids as canonical UUID text, and the idempotency keys of the entries it did
    not insert because another transaction had stored them meanwhile."""

    balances: list[tuple[str, str, int, int]]
    missed: set[EventKey]


def _stock_upsert_sql(table: str, source: str) -> str:
    """The stock upsert adding `source`'s (warehouse_id, product_id, delta, updated_at, 1) rows,
    which come in key order so that concurrent batches lock rows in the same order. Every write
    raises the row's `version` under its lock, so versions follow the commit order of each pair
    (a new row starts at 1)."""
    return (
        f"INSERT INTO {table} (warehouse_id, product_id, balance, updated_at, version) {source} "
        "ON CONFLICT (warehouse_id, product_id) DO UPDATE SET "
        f"balance = {table}.balance + excluded.balance, updated_at = excluded.updated_at, "
        f"version = {table}.version + 1 "
        "RETURNING warehouse_id, product_id, balance, version"
    )


def ledger_store(entries: list[tuple[Any, ...]], now: datetime) -> Stored:
    """Append the batch's new ledger rows (value tuples in `LEDGER_COLUMNS` order, unique on the
    idempotency key) and add the deltas of the rows really inserted to their pairs' balances
    (units, signed); returns them as `Stored`.

    Safe beside concurrent batches storing the same events: each row is inserted ON CONFLICT DO
    NOTHING (a row stored meanwhile by another transaction is waited for, then skipped and
    reported in `missed`; nothing is raised), the rows in key order and the stock rows upserted
    in pair order, so two batches cannot deadlock on them. The inserted keys and upserted stock
    rows stay locked until commit.

    PostgreSQL: COPY into the staging table, then one statement: insert, stock upsert of what was
    inserted, and the keys that were not. SQLite: a multi-row insert returning what it inserted,
    then a VALUES upsert."""
    if not entries:
        return Stored([], set())
    if connection.vendor != "postgresql":
        return _store_portable(entries, now)
    ledger = connection.ops.quote_name(LedgerEntry._meta.db_table)
    stock = connection.ops.quote_name(Stock._meta.db_table)
    names = ", ".join(name for name, _ in _LEDGER_COLUMNS)
    with _pg_cursor() as cursor:
        cursor.execute(_STAGE_CREATE)
        with cursor.copy(f"COPY {_STAGE} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([kind for _, kind in _LEDGER_COLUMNS])
            for entry in entries:
                copy.write_row(entry)
        upsert = _stock_upsert_sql(
            stock,
            "SELECT warehouse_id, product_id, sum(delta), %b::timestamptz, 1 FROM inserted "
            "GROUP BY warehouse_id, product_id ORDER BY warehouse_id, product_id",
        )
        cursor.execute(
            # Emptying the stage as it is read: several batches can share one transaction
            # (a replay inside the caller's), and ON COMMIT would leave their rows in it.
            f"WITH staged AS (DELETE FROM {_STAGE} RETURNING {names}), "  # noqa: S608
            f"inserted AS (INSERT INTO {ledger} ({names}) "
            f"SELECT {names} FROM staged ORDER BY movement_id, event "
            "ON CONFLICT (movement_id, event) DO NOTHING "
            "RETURNING movement_id, event, warehouse_id, product_id, delta), "
            f"stocked AS ({upsert}), "
            "missed AS (SELECT movement_id, event FROM staged WHERE NOT EXISTS ("
            "SELECT FROM inserted WHERE inserted.movement_id = staged.movement_id "
            "AND inserted.event = staged.event)) "
            "SELECT warehouse_id::text, product_id::text, balance, version FROM stocked "
            "UNION ALL SELECT movement_id::text, event, NULL, NULL FROM missed",
            [now],
        )
        rows = cursor.fetchall()
    return Stored(
        balances=[(w, p, int(b), int(version)) for w, p, b, version in rows if b is not None],
        missed={(uuid.UUID(m), event) for m, event, balance, _ in rows if balance is None},
    )


def _store_portable(entries: list[tuple[Any, ...]], now: datetime) -> Stored:
    """`ledger_store` through Django's cursor (SQLite): INSERT ... ON CONFLICT DO NOTHING
    RETURNING, in chunks under SQLite's bound-parameter limit, then the stock upsert of the
    inserted rows' deltas."""
    table = connection.ops.quote_name(LedgerEntry._meta.db_table)
    fields = _fields(LedgerEntry, LEDGER_COLUMNS)
    ordered = sorted(entries, key=lambda entry: (entry[0], entry[1]))
    inserted: set[tuple[str, str]] = set()
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            params = [
                field.get_db_prep_save(value, connection)
                for entry in chunk
                for field, value in zip(fields, entry, strict=True)
            ]
            row = "(" + ", ".join(["%s"] * len(fields)) + ")"
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(LEDGER_COLUMNS)}) "  # noqa: S608
                f"VALUES {', '.join([row] * len(chunk))} "
                "ON CONFLICT (movement_id, event) DO NOTHING RETURNING movement_id, event",
                params,
            )
            inserted.update((str(uuid.UUID(str(m))), event) for m, event in cursor.fetchall())
    deltas: dict[Pair, int] = defaultdict(int)
    missed: set[EventKey] = set()
    for movement_id, event, warehouse_id, product_id, _, delta, *_ in entries:
        if (str(movement_id), event) in inserted:
            deltas[(warehouse_id, product_id)] += delta
        else:
            missed.add((movement_id, event))
    return Stored(balances=_stock_apply_portable(deltas, now), missed=missed)


def _stock_apply_portable(
    deltas: dict[Pair, int], now: datetime
) -> list[tuple[str, str, int, int]]:
    if not deltas:
        return []
    table = connection.ops.quote_name(Stock._meta.db_table)
    rows = sorted(deltas.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    when = models.DateTimeField().get_db_prep_value(now, connection)
    params: list[Any] = []
    for (warehouse_id, product_id), delta in rows:
        params += [_uuid_param(warehouse_id), _uuid_param(product_id), delta, when]
    source = "VALUES " + ", ".join(["(%s, %s, %s, %s, 1)"] * len(rows))
    with connection.cursor() as cursor:
        cursor.execute(_stock_upsert_sql(table, source), params)
        # SQLite hands UUIDs back as bare hex: normalise so cache keys match the readers'.
        return [
            (str(uuid.UUID(str(w))), str(uuid.UUID(str(p))), int(balance), int(version))
            for w, p, balance, version in cursor.fetchall()
        ]


def duplicates_add(counts: dict[int, int]) -> None:
    """Add `counts` (ledger pk -> duplicate messages) to the rows' `duplicates` counters. The
    rows are locked in ascending pk order first, so two batches bumping the same rows cannot
    deadlock; then one UPDATE."""
    if not counts:
        return
    pks = sorted(counts)
    if connection.vendor != "postgresql":
        by_count: dict[int, list[int]] = defaultdict(list)
        for pk in pks:
            by_count[counts[pk]].append(pk)
        for count, group in by_count.items():
            LedgerEntry.objects.filter(pk__in=group).update(duplicates=F("duplicates") + count)
        return
    table = connection.ops.quote_name(LedgerEntry._meta.db_table)
    with _pg_cursor() as cursor:
        cursor.execute(
            f"SELECT FROM {table} WHERE id = ANY(%b::bigint[]) ORDER BY id FOR UPDATE",
            [pks],
        )
        cursor.execute(
            f"UPDATE {table} SET duplicates = {table}.duplicates + added.count "  # noqa: S608
            "FROM unnest(%b::bigint[], %b::integer[]) AS added (id, count) "
            f"WHERE {table}.id = added.id",
            [pks, [counts[pk] for pk in pks]],
        )


def duplicates_claim(records: list[DuplicateMessage]) -> set[str]:
    """Insert the `DuplicateMessage` records whose message key no one recorded yet (ON CONFLICT
    DO NOTHING, in key order: a concurrent transaction recording the same message is waited
    for, never raised); returns the message keys this call recorded."""
    if not records:
        return set()
    ordered = sorted(records, key=lambda record: record.message_key)
    table = connection.ops.quote_name(DuplicateMessage._meta.db_table)
    columns = "message_key, movement_id, event, received_at"
    if connection.vendor == "postgresql":
        with _pg_cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({columns}) "  # noqa: S608
                "SELECT * FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::timestamptz[]) "
                "ON CONFLICT (message_key) DO NOTHING RETURNING message_key",
                [
                    [record.message_key for record in ordered],
                    [record.movement_id for record in ordered],
                    [record.event for record in ordered],
                    [record.received_at for record in ordered],
                ],
            )
            return {row[0] for row in cursor.fetchall()}
    fields = _fields(DuplicateMessage, columns.split(", "))
    claimed: set[str] = set()
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), 200):
            chunk = ordered[start : start + 200]
            params = [
                field.get_db_prep_save(getattr(record, field.attname), connection)
                for record in chunk
                for field in fields
            ]
            cursor.execute(
                f"INSERT INTO {table} ({columns}) "  # noqa: S608
                f"VALUES {', '.join(['(%s, %s, %s, %s)'] * len(chunk))} "
                "ON CONFLICT (message_key) DO NOTHING RETURNING message_key",
                params,
            )
            claimed.update(row[0] for row in cursor.fetchall())
    return claimed


def entries_existing(movement_ids: set[uuid.UUID]) -> dict[EventKey, tuple[int, str, str]]:
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


def message_keys_known(
    model: type[DeadLetter] | type[DuplicateMessage], keys: set[str]
) -> set[str]:
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
#: The ledger columns `ledger_store` takes its rows' values in.
LEDGER_COLUMNS = tuple(name for name, _ in _LEDGER_COLUMNS)

_STAGE = "wh_ledger_stage"
# Session-private, emptied at every commit; created on a session's first batch.
_STAGE_CREATE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ("
    + ", ".join(f"{name} {kind}" for name, kind in _LEDGER_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
