"""Betting reads. Querysets are lazy and unlocked; ordering is part of each contract."""

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from django.db.models import (
    Count,
    DecimalField,
    Exists,
    Max,
    Min,
    OuterRef,
    QuerySet,
    Subquery,
    Sum,
    Window,
)
from django.utils import timezone

from betting.models import AuditEntry, Bet, BetStatus, Event, EventChange, EventState
from common.exceptions import NotFound


def events_open() -> QuerySet[Event]:
    """Events open for betting: NEW with the deadline still ahead, soonest first."""
    return Event.objects.filter(state=EventState.NEW, deadline__gt=timezone.now()).order_by(
        "deadline", "id"
    )


#: An open event as `events_open_page` reads it: (id, name, coefficient, deadline, state,
#: version, sequence), the arguments of `schemas.event_json`.
EventRow = tuple[str, str, Decimal, datetime, str, int, int]


def events_open_page(*, limit: int, offset: int) -> tuple[int, list[EventRow]]:
    """The number of open events and one page of them (`events_open` order) as plain rows, in
    one query (a window count rides along); past the end, a COUNT tells the total."""
    rows = list(
        events_open()
        .annotate(total=Window(Count("*")))
        .values_list(
            "id", "name", "coefficient", "deadline", "state", "version", "sequence", "total"
        )[offset : offset + limit]
    )
    if not rows:
        return (events_open().count() if offset else 0), []
    return rows[0][-1], [row[:-1] for row in rows]


def events_list(*, state: str | None = None, open_only: bool = False) -> QuerySet[Event]:
    """Every event (or only the open ones, as `events_open`), optionally in one `EventState`,
    soonest deadline first, then by id."""
    events = events_open() if open_only else Event.objects.order_by("deadline", "id")
    return events.filter(state=state) if state else events


def event_get(*, event_id: str) -> Event:
    """One event; raises `NotFound` (`event_not_found`)."""
    event = Event.objects.filter(pk=event_id).first()
    if event is None:
        raise NotFound(f"event {event_id} not found", code="event_not_found")
    return event


def bets_of_user(
    *, user_id: int, status: str | None = None, event_id: str | None = None
) -> QuerySet[Bet]:
    """The user's own bets, newest first, optionally of one `BetStatus` and/or one event."""
    bets = Bet.objects.filter(user_id=user_id)
    if status:
        bets = bets.filter(status=status)
    if event_id:
        bets = bets.filter(event_id=event_id)
    return bets.order_by("-id")


def bet_of_user(*, user_id: int, bet_id: int) -> Bet:
    """Another user's bet is NotFound (`bet_not_found`), never Forbidden (no existence leak)."""
    bet = Bet.objects.filter(pk=bet_id, user_id=user_id).first()
    if bet is None:
        raise NotFound("bet not found", code="bet_not_found")
    return bet


def event_changes_after(*, sequence: int, limit: int = 1000) -> list[EventChange]:
    """Up to `limit` change-log rows numbered after `sequence`, in sequence order (gapless
    once committed: see `lock_objects.change_sequence_next`)."""
    return list(EventChange.objects.filter(sequence__gt=sequence).order_by("sequence")[:limit])


def event_changes_latest_per_event(*, up_to: int) -> list[EventChange]:
    """The state of every event as of sequence `up_to` (the WatchEvents snapshot)."""
    latest = (
        EventChange.objects.filter(sequence__lte=up_to)
        .values("event_id")
        .annotate(last=Max("sequence"))
        .values("last")
    )
    return list(EventChange.objects.filter(sequence__in=latest).order_by("sequence"))


def change_sequence_current() -> int:
    """The highest committed change sequence, 0 before the first change."""
    return EventChange.objects.aggregate(m=Max("sequence"))["m"] or 0


# --- the operator console (`betting.console`) -----------------------------------------------


def _pending_sum(column: str) -> Subquery:
    return Subquery(
        Bet.objects.filter(event_id=OuterRef("pk"), status=BetStatus.PENDING)
        .order_by()
        .values("event_id")
        .annotate(total=Sum(column))
        .values("total")[:1],
        output_field=DecimalField(max_digits=24, decimal_places=2),
    )


def console_events_open(*, limit: int = 20) -> tuple[int, Sequence[Event]]:
    """The number of open events (`events_open`) and the `limit` soonest, each annotated with
    its exposure: `pending_stake` (Σ amount) and `pending_payout` (Σ potential_payout) of its
    pending bets (Decimal, None without any). One query (a window count rides along; the sums
    read the `(event, status)` index), no lock."""
    events = list(
        events_open().annotate(
            total=Window(Count("*")),
            pending_stake=_pending_sum("amount"),
            pending_payout=_pending_sum("potential_payout"),
        )[:limit]
    )
    return (events[0].total if events else 0), events


def console_events_overdue(*, limit: int = 20) -> tuple[int, Sequence[Event]]:
    """Events still NEW whose deadline has passed (nobody finished or cancelled them): their
    number and the `limit` longest overdue first. One query on the `(state, deadline)` index,
    no lock."""
    events = list(
        Event.objects.filter(state=EventState.NEW, deadline__lte=timezone.now())
        .annotate(total=Window(Count("*")))
        .order_by("deadline", "id")[:limit]
    )
    return (events[0].total if events else 0), events


def console_settlement_backlog() -> tuple[int, datetime | None]:
    """Finished or cancelled events that still have pending bets (their settlement has not
    run yet, or failed): how many, and the oldest one's `finished_at` (None when there is
    none). One query (an index probe per ended event), no lock."""
    pending = Bet.objects.filter(event_id=OuterRef("pk"), status=BetStatus.PENDING)
    backlog = (
        Event.objects.exclude(state=EventState.NEW)
        .filter(Exists(pending))
        .aggregate(n=Count("id"), oldest=Min("finished_at"))
    )
    return backlog["n"], backlog["oldest"]


def console_settlements_redone(*, since: datetime, limit: int = 20) -> list[AuditEntry]:
    """Settlements the reconciler had to do because the settlement task had not (audit rows
    of bets settled `via="reconciler"`) at or after `since`, newest first. One query on the
    audit `at` index, no lock."""
    return list(
        AuditEntry.objects.filter(
            at__gte=since, subject=AuditEntry.Subject.BET, via="reconciler"
        ).order_by("-at", "-id")[:limit]
    )
