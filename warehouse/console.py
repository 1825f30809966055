"""warehouse's panel on the operator console (`shared/specs/console.md`).

Now: messages ingested and duplicates per second (the `warehouse.messages` and
`warehouse.duplicates` counters, counted after each batch commits), consumer lag (the newest
ledger row's envelope time to its commit; the broker's queue depth is not read: that would
take a broker connection per sample), consumers alive, ledger rows. Needs a human: dead letters
waiting, by reason (newest reason first), and stock rows in shortage. Table: the newest dead
letters waiting, each with a replay.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.urls import reverse

from common import parsers
from common.console import (
    Attention,
    ConsoleAction,
    ConsolePanel,
    Number,
    PanelSample,
    Row,
    console_count_totals,
    console_when,
)
from warehouse import selectors, services
from warehouse.models import DeadLetter, Stock

PANEL = "warehouse"
MESSAGES = "warehouse.messages"
DUPLICATES = "warehouse.duplicates"
LIMIT = 20


def _dead_letter_row(letter: DeadLetter) -> Row:
    return {
        "key": str(letter.pk),
        "cells": [
            f"#{letter.pk}",
            letter.reason,
            letter.detail[:120],
            console_when(letter.received_at),
            letter.replay_outcome,
        ],
        "link": reverse("admin:warehouse_deadletter_change", args=[letter.pk]),
        "actions": [{"action": "replay", "label": "Replay", "params": {"id": letter.pk}}],
    }


def _reason(reason: str, count: int, newest: datetime) -> Attention:
    changelist = reverse("admin:warehouse_deadletter_changelist")
    return {
        "key": f"dead-{reason}",
        "text": f"{count} dead letter(s) {reason}, newest {console_when(newest)}",
        "link": f"{changelist}?{urlencode({'reason__exact': reason})}",
    }


def _short(stock: Stock) -> Attention:
    return {
        "key": f"short-{stock.pk}",
        "text": (
            f"stock short by {-stock.balance}: product {stock.product_id} "
            f"at warehouse {stock.warehouse_id}"
        ),
        "link": reverse("admin:warehouse_stock_change", args=[stock.pk]),
    }


def sample() -> PanelSample:
    """The panel now: about seven small queries (`selectors.console_*`), no lock, no scan of
    the ledger (`console_ledger_rows`); at most `LIMIT` rows per list."""
    rows, exact = selectors.console_ledger_rows()
    lag = selectors.console_ingest_lag()
    reasons = selectors.console_dead_letter_reasons()
    letters = list(selectors.console_dead_letters_waiting()[:LIMIT])
    short_total, short = selectors.console_stock_short(limit=LIMIT)
    totals = console_count_totals([MESSAGES, DUPLICATES])
    lag_seconds = lag["lag_seconds"]
    numbers: list[Number] = [
        {
            "key": "lag",
            "label": "consumer lag (s)",
            "value": None if lag_seconds is None else round(lag_seconds, 2),
        },
        {"key": "last_stored", "label": "last stored", "value": console_when(lag["recorded_at"])},
        {"key": "consumers", "label": "consumers", "value": selectors.console_consumers_alive()},
        {
            "key": "ledger_rows",
            "label": "ledger rows" if exact else "ledger rows (estimate)",
            "value": rows,
            "link": reverse("admin:warehouse_ledgerentry_changelist"),
        },
        {
            "key": "dead_letters",
            "label": "dead letters waiting",
            "value": sum(count for _, count, _ in reasons),
            "link": reverse("admin:warehouse_deadletter_changelist"),
        },
        {"key": "short", "label": "stock rows short", "value": short_total},
    ]
    return {
        "counters": {
            MESSAGES: {"label": "messages", "value": totals.get(MESSAGES, 0)},
            DUPLICATES: {"label": "duplicates", "value": totals.get(DUPLICATES, 0)},
        },
        "numbers": numbers,
        "attention": [*(_reason(*reason) for reason in reasons), *(_short(s) for s in short)],
        "tables": [
            {
                "key": "dead_letters",
                "title": "Dead letters waiting",
                "columns": ["id", "reason", "detail", "received", "last replay"],
                "rows": [_dead_letter_row(letter) for letter in letters],
            }
        ],
    }


def replay(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"id": int}`: run one dead letter through the ingest pipeline again
    (`services.dead_letter_replay`). Refuses with NotFound or PreconditionFailed
    (`already_replayed`); a replay that fails again is answered, not refused (the letter stays
    with its new reason)."""
    dead_letter_id = parsers.integer(params.get("id"), field="id", min_value=1)
    letter = services.dead_letter_replay(dead_letter_id=dead_letter_id)
    if letter.replay_outcome in selectors.REPLAYED_OUTCOMES:
        return f"Dead letter #{letter.pk} replayed: {letter.replay_outcome}."
    return f"Dead letter #{letter.pk} failed again: {letter.reason} ({letter.detail[:120]})."


panel = ConsolePanel(
    name=PANEL,
    title="Warehouse",
    sample=sample,
    order=30,
    actions={"replay": ConsoleAction(label="Replay a dead letter", run=replay)},
)
