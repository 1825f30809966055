"""The ingest's set-based statements: one statement per step of a batch, whatever its size.

On PostgreSQL they run on a server-side-binding psycopg cursor with array parameters (sent in
binary: far cheaper to send and plan than N x columns placeholders); elsewhere (SQLite) through
Django's cursor or the ORM. All run on Django's connection, in the caller's transaction. Only
quoted table names and placeholders are interpolated into SQL; values are always parameters.
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


def stock_apply(deltas: dict[Pair, int], now: datetime) -> list[tuple[uuid.UUID, uuid.UUID, int]]:
    """Add each delta (units, signed) to its (warehouse, product) balance in one set-based
    upsert, in key order so concurrent consumers lock rows in the same order; returns the new
    (warehouse_id, product_id, balance) rows. The upserted rows stay locked until commit."""
    if not deltas:
        return []
    table = connection.ops.quote_name(Stock._meta.db_table)
    rows = sorted(deltas.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    params: list[Any]
    if connection.vendor == "postgresql":
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


def ledger_insert(entries: list[dict[str, Any]]) -> None:
    """Append the batch's new ledger rows (column -> value dicts) in one statement (unnest of
    column arrays, sent in binary, on PostgreSQL; the ORM's multi-row INSERT elsewhere)."""
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
