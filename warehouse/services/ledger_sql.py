"""The ingest's set-based statements: one statement per step of a batch, whatever its size.

On PostgreSQL the new ledger rows go the fastest correct way (`ledger_store`): binary COPY into a
session-private staging table, then one statement that inserts them into the ledger with the
dedupe (ON CONFLICT on the idempotency key DO NOTHING) and upserts the stock with the summed
deltas of the rows it really inserted. Lookups run on a server-side-binding psycopg cursor with
array parameters (sent in binary). Elsewhere (SQLite) the same steps go through the ORM and a
multi-row upsert. All run on Django's connection, in the caller's transaction. Only quoted
table names and placeholders are interpolated into SQL; values are always parameters.
"""

import uuid
from datetime import datetime
from typing import Any

from django.db import connection, models

from warehouse.models import DeadLetter, DuplicateMessage, LedgerEntry, Stock

EventKey = tuple[uuid.UUID, str]
Pair = tuple[uuid.UUID, uuid.UUID]


def _pg_cursor() -> Any:
    """A server-side-binding psycopg cursor on Django's connection (same transaction). Django's
    own cursors bind client-side, which quotes large array parameters slowly in Python."""
    import psycopg

    connection.ensure_connection()
    return psycopg.Cursor(connection.connection)


def _uuid_param(value: uuid.UUID) -> Any:
    return models.UUIDField().get_db_prep_value(value, connection)


class ConcurrentInsert(RuntimeError):
    """Another transaction stored some of the batch's events between the batch's lookup and its
    insert (two consumers on one queue): the batch is rolled back, to be retried."""


def _stock_upsert_sql(table: str, source: str) -> str:
    """The stock upsert adding `source`'s (warehouse_id, product_id, delta) rows, in key order
    so that concurrent batches lock rows in the same order."""
    return (
        f"INSERT INTO {table} (warehouse_id, product_id, balance, updated_at) {source} "
        "ON CONFLICT (warehouse_id, product_id) DO UPDATE SET "
        f"balance = {table}.balance + excluded.balance, updated_at = excluded.updated_at "
        "RETURNING warehouse_id, product_id, balance"
    )


def ledger_store(
    entries: list[tuple[Any, ...]], deltas: dict[Pair, int], now: datetime
) -> list[tuple[str, str, int]]:
    """Append the batch's new ledger rows (value tuples in `LEDGER_COLUMNS` order, unique on the
    idempotency key) and add each pair's delta (units, signed; the sum of its `entries`) to its
    balance; returns the new (warehouse_id, product_id, balance) rows, ids as canonical UUID
    text. The upserted stock rows stay locked until commit (taken in key order).

    PostgreSQL: COPY into the staging table, then one statement: insert ON CONFLICT DO NOTHING,
    stock upsert of what was inserted. Raises `ConcurrentInsert` when a row was already there
    (stored meanwhile by another transaction; the caller looked them up before). SQLite: the
    ORM's multi-row insert and a VALUES upsert of `deltas`."""
    if not entries:
        return []
    if connection.vendor != "postgresql":
        LedgerEntry.objects.bulk_create(
            [LedgerEntry(**dict(zip(LEDGER_COLUMNS, entry, strict=True))) for entry in entries],
            batch_size=500,
        )
        return _stock_apply_portable(deltas, now)
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
            "SELECT warehouse_id, product_id, sum(delta), %b FROM inserted "
            "GROUP BY warehouse_id, product_id ORDER BY warehouse_id, product_id",
        )
        cursor.execute(
            # Emptying the stage as it is read: several batches can share one transaction
            # (a replay inside the caller's), and ON COMMIT would leave their rows in it.
            f"WITH staged AS (DELETE FROM {_STAGE} RETURNING {names}), "  # noqa: S608
            f"inserted AS (INSERT INTO {ledger} ({names}) "
            f"SELECT {names} FROM staged ON CONFLICT (movement_id, event) DO NOTHING "
            "RETURNING warehouse_id, product_id, delta), "
            f"stocked AS ({upsert}) "
            "SELECT warehouse_id::text, product_id::text, balance, "
            "(SELECT count(*) FROM inserted) "
            "FROM stocked",
            [now],
        )
        rows = cursor.fetchall()
    if not rows or rows[0][3] != len(entries):
        raise ConcurrentInsert("events of the batch were stored meanwhile by another transaction")
    return [(w, p, int(balance)) for w, p, balance, _ in rows]


def _stock_apply_portable(deltas: dict[Pair, int], now: datetime) -> list[tuple[str, str, int]]:
    table = connection.ops.quote_name(Stock._meta.db_table)
    rows = sorted(deltas.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    when = models.DateTimeField().get_db_prep_value(now, connection)
    params: list[Any] = []
    for (warehouse_id, product_id), delta in rows:
        params += [_uuid_param(warehouse_id), _uuid_param(product_id), delta, when]
    source = "VALUES " + ", ".join(["(%s, %s, %s, %s)"] * len(rows))
    with connection.cursor() as cursor:
        cursor.execute(_stock_upsert_sql(table, source), params)
        # SQLite hands UUIDs back as bare hex: normalise so cache keys match the readers'.
        return [
            (str(uuid.UUID(str(w))), str(uuid.UUID(str(p))), int(balance))
            for w, p, balance in cursor.fetchall()
        ]


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
