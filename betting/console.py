"""betting's panel on the operator console (`shared/specs/console.md`).

Now: bets per second (the `betting.bets` counter, counted where a placement is accepted), open
events, settlement lag (how long the oldest ended event with unsettled bets has waited). Table:
the soonest open events with coefficient, deadline and exposure (pending stake and potential
payout), each with finish win / finish lose / cancel. Needs a human: events past their deadline
still not finished, ended events still waiting for settlement, and settlements the reconciler
had to redo (the settlement task had not run) in the last day.
"""

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils import timezone

from betting import schemas, selectors, services
from betting.models import AuditEntry, Event
from common.console import (
    ActionRef,
    Attention,
    ConsoleAction,
    ConsolePanel,
    PanelSample,
    Row,
    console_count_totals,
    console_when,
)

PANEL = "betting"
BETS = "betting.bets"
REDONE_WINDOW = timedelta(days=1)
LIMIT = 20
VIA = "console"


def _money(amount: Decimal | None) -> str:
    return schemas.money_format(amount or Decimal("0"))


def _event_link(event_id: str) -> str:
    return reverse("admin:betting_event_change", args=[quote(event_id)])


def _actions(event_id: str) -> list[ActionRef]:
    params = {"event_id": event_id}
    return [
        {"action": "finish_win", "label": "Win", "params": params},
        {"action": "finish_lose", "label": "Lose", "params": params},
        {"action": "cancel", "label": "Cancel", "params": params},
    ]


def _open_row(event: Event) -> Row:
    return {
        "key": event.id,
        "cells": [
            event.name,
            schemas.money_format(event.coefficient),
            console_when(event.deadline),
            _money(getattr(event, "pending_stake", None)),
            _money(getattr(event, "pending_payout", None)),
        ],
        "link": _event_link(event.id),
        "actions": _actions(event.id),
    }


def _overdue(event: Event) -> Attention:
    return {
        "key": f"overdue-{event.id}",
        "text": f"event {event.id} ({event.name}) past its deadline {console_when(event.deadline)}",
        "link": _event_link(event.id),
        "actions": _actions(event.id),
    }


def _redone(entry: AuditEntry) -> Attention:
    data = entry.data if isinstance(entry.data, dict) else {}
    return {
        "key": f"redone-{entry.pk}",
        "text": (
            f"the reconciler settled {data.get('bets', '?')} bet(s) of event {entry.subject_id} "
            f"({data.get('status', entry.action)}) at {console_when(entry.at)}"
        ),
        "link": reverse("admin:betting_auditentry_change", args=[entry.pk]),
    }


def sample() -> PanelSample:
    """The panel now: four small queries (`selectors.console_*`), no lock; at most `LIMIT`
    rows per list."""
    now = timezone.now()
    open_total, events = selectors.console_events_open(limit=LIMIT)
    overdue_total, overdue = selectors.console_events_overdue(limit=LIMIT)
    backlog, oldest = selectors.console_settlement_backlog()
    redone = selectors.console_settlements_redone(since=now - REDONE_WINDOW, limit=LIMIT)
    lag = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    attention: list[Attention] = [_overdue(event) for event in overdue]
    if backlog:
        attention.append(
            {
                "key": "backlog",
                "text": (
                    f"{backlog} ended event(s) with bets still unsettled, the oldest ended "
                    f"{console_when(oldest)}"
                ),
                "link": reverse("admin:betting_event_changelist"),
            }
        )
    attention += [_redone(entry) for entry in redone]
    return {
        "counters": {BETS: {"label": "bets", "value": console_count_totals([BETS]).get(BETS, 0)}},
        "numbers": [
            {
                "key": "open",
                "label": "open events",
                "value": open_total,
                "link": reverse("admin:betting_event_changelist"),
            },
            {"key": "overdue", "label": "past deadline, not finished", "value": overdue_total},
            {"key": "settlement_lag", "label": "settlement lag (s)", "value": round(lag, 1)},
            {"key": "unsettled", "label": "ended, bets unsettled", "value": backlog},
        ],
        "attention": attention,
        "tables": [
            {
                "key": "open",
                "title": "Open events (soonest deadline first)",
                "columns": ["event", "coefficient", "deadline", "pending stake", "exposure"],
                "rows": [_open_row(event) for event in events],
            }
        ],
    }


def _event_id(params: Mapping[str, Any]) -> str:
    return schemas.event_id(params.get("event_id"), field="event_id")


def _done(event: Event) -> str:
    return f"Event {event.id} is {event.state}; its bets settle now."


def finish_win(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"event_id": str}`: finish the event with outcome win (`services.event_finish`); its
    bets settle after commit. Refuses with NotFound or PreconditionFailed
    (`event_already_final`)."""
    event = services.event_finish(
        event_id=_event_id(params), outcome="win", actor_id=user.pk, via=VIA
    )
    return _done(event)


def finish_lose(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"event_id": str}`: finish the event with outcome lose, as `finish_win`."""
    event = services.event_finish(
        event_id=_event_id(params), outcome="lose", actor_id=user.pk, via=VIA
    )
    return _done(event)


def cancel(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"event_id": str}`: cancel the event (`services.event_cancel`); its bets become void,
    stakes refunded after commit. Refuses with NotFound or PreconditionFailed
    (`event_already_final`)."""
    event = services.event_cancel(event_id=_event_id(params), actor_id=user.pk, via=VIA)
    return _done(event)


panel = ConsolePanel(
    name=PANEL,
    title="Betting",
    sample=sample,
    order=40,
    actions={
        "finish_win": ConsoleAction(label="Finish an event: win", run=finish_win),
        "finish_lose": ConsoleAction(label="Finish an event: lose", run=finish_lose),
        "cancel": ConsoleAction(label="Cancel an event", run=cancel),
    },
)
