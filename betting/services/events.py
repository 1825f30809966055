"""Events of the line provider: create, change the odds, finish, cancel.

Lock order everywhere: the event (gate, row), then the change-sequence row (see lock_objects).
Every change appends one `EventChange` row numbered by the gapless global sequence, one audit
row, and after commit invalidates the cached open-events list and publishes `event.<kind>` on
`betting.events`.
"""

import time
from datetime import datetime
from decimal import Decimal
from typing import TypedDict

from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from betting import schemas, tasks
from betting.lock_objects import change_sequence_next, event_for_update
from betting.models import TERMINAL_STATES, AuditEntry, Event, EventChange, EventState
from betting.services.audit import audit_append
from betting.services.ranges import COEFFICIENT
from common.exceptions import Conflict, NotFound, PreconditionFailed, ValidationFailed
from realtime.services import publish

EVENTS_CACHE_GENERATION_KEY = "betting:events:generation"
EVENTS_TOPIC = "betting.events"

OUTCOME_STATES = {"win": EventState.FINISHED_WIN, "lose": EventState.FINISHED_LOSE}


class EventPayload(TypedDict):
    """An event as published on `betting.events` and kept in the audit trail."""

    id: str
    name: str
    coefficient: str  # decimal odds, 2 places ("1.85")
    deadline: str  # ISO 8601 with offset
    state: str  # an `EventState` value
    version: int  # +1 on every change of the event
    sequence: int  # the global change sequence of its last change


def _event_payload(event: Event) -> EventPayload:
    return {
        "id": event.id,
        "name": event.name,
        "coefficient": schemas.money_format(event.coefficient),
        "deadline": event.deadline.isoformat(),
        "state": event.state,
        "version": event.version,
        "sequence": event.sequence,
    }


def _events_cache_invalidate() -> None:
    cache.set(EVENTS_CACHE_GENERATION_KEY, time.time_ns(), None)


def _event_changed(event: Event, *, kind: str, actor_id: int | None, via: str) -> None:
    """Append the change log row under the sequence lock, audit it, and schedule the after-commit
    side effects (cache invalidation, realtime publish)."""
    event.sequence = change_sequence_next()
    event.save()
    EventChange.objects.create(
        sequence=event.sequence,
        event_id=event.id,
        kind=kind,
        name=event.name,
        coefficient=event.coefficient,
        deadline=event.deadline,
        state=event.state,
        version=event.version,
        at=event.updated_at,
    )
    payload = _event_payload(event)
    audit_append(
        subject=AuditEntry.Subject.EVENT,
        subject_id=event.id,
        action=kind,
        actor_id=actor_id,
        via=via,
        data=payload,
    )
    transaction.on_commit(_events_cache_invalidate)
    publish(EVENTS_TOPIC, {"type": f"event.{kind}", "event": payload})


def _aware(deadline: datetime) -> datetime:
    if timezone.is_naive(deadline):
        raise ValidationFailed(
            "deadline must carry a timezone",
            code="naive_datetime",
            details={"deadline": ["must carry a UTC offset"]},
        )
    return deadline


@transaction.atomic
def event_create(
    *,
    event_id: str,
    name: str,
    coefficient: Decimal,
    deadline: datetime,
    actor_id: int | None,
    via: str,
) -> Event:
    """Create an event in state NEW (version 1), taking the change-sequence lock for its
    `created` change.

    `event_id`, `name` and `coefficient` are judged by `betting.schemas` (the doors have parsed
    them already; this guards other callers). The deadline must be aware; the doors also require
    it to be in the future, the service does not (imports and tests create closed events).
    Not idempotent: an existing id is a `Conflict` (`event_exists`). Raises `InvalidValue` for
    a value outside its field's rules and `ValidationFailed` (`naive_datetime`)."""
    event_id = schemas.event_id(event_id, field="id")
    name = schemas.event_name(name, field="name")
    coefficient = COEFFICIENT.check(coefficient, field="coefficient")
    if Event.objects.filter(pk=event_id).exists():
        raise Conflict(f"event {event_id} already exists", code="event_exists")
    event = Event(
        id=event_id, name=name, coefficient=coefficient, deadline=_aware(deadline), version=1
    )
    try:
        with transaction.atomic():
            event.save(force_insert=True)
    except IntegrityError:
        raise Conflict(f"event {event_id} already exists", code="event_exists") from None
    _event_changed(event, kind=EventChange.Kind.CREATED, actor_id=actor_id, via=via)
    return event


def event_locked(event_id: str) -> Event:
    """The event, locked exclusively (`lock_objects.event_for_update`) until the caller's
    transaction ends; raises `NotFound` (`event_not_found`)."""
    event = event_for_update(event_id=event_id)
    if event is None:
        raise NotFound(f"event {event_id} not found", code="event_not_found")
    return event


@transaction.atomic
def event_odds_update(
    *, event_id: str, coefficient: Decimal, actor_id: int | None, via: str
) -> Event:
    """Change the coefficient (decimal odds, 2 places, within `COEFFICIENT`) of a NEW event
    under its exclusive lock; the version goes up by one. Idempotent: the same value is a no-op.
    Raises `InvalidValue`, `NotFound` (`event_not_found`) and `PreconditionFailed`
    (`event_closed`) once the event is finished or cancelled."""
    coefficient = COEFFICIENT.check(coefficient, field="coefficient")
    event = event_locked(event_id)
    if event.state != EventState.NEW:
        raise PreconditionFailed(f"event {event_id} is {event.state}", code="event_closed")
    if event.coefficient == coefficient:
        return event
    event.coefficient = coefficient
    event.version += 1
    _event_changed(event, kind=EventChange.Kind.ODDS, actor_id=actor_id, via=via)
    return event


def _event_terminate(
    *, event_id: str, target: EventState, kind: str, actor_id: int | None, via: str
) -> Event:
    event = event_locked(event_id)
    if event.state == target:
        return event
    if event.state in TERMINAL_STATES:
        raise PreconditionFailed(
            f"event {event_id} is already {event.state}", code="event_already_final"
        )
    event.state = target
    event.version += 1
    event.finished_at = timezone.now()
    _event_changed(event, kind=kind, actor_id=actor_id, via=via)
    tasks.settle_event.delay_on_commit(event_id)
    return event


@transaction.atomic
def event_finish(*, event_id: str, outcome: str, actor_id: int | None, via: str) -> Event:
    """Finish a NEW event with outcome "win" or "lose" under the event's exclusive lock (it
    waits for the placements holding the event shared), then settle its bets after commit (the
    `betting.settle_event` task). Idempotent: re-sending the same outcome is a no-op. Raises
    `ValidationFailed` (`invalid_outcome`), `NotFound` (`event_not_found`) and
    `PreconditionFailed` (`event_already_final`) when it already ended otherwise."""
    if outcome not in OUTCOME_STATES:
        raise ValidationFailed("outcome must be win or lose", code="invalid_outcome")
    return _event_terminate(
        event_id=event_id,
        target=OUTCOME_STATES[outcome],
        kind=EventChange.Kind.FINISHED,
        actor_id=actor_id,
        via=via,
    )


@transaction.atomic
def event_cancel(*, event_id: str, actor_id: int | None, via: str) -> Event:
    """Cancel a NEW event under its exclusive lock; its bets become void with the stake refunded
    (settled after commit). Idempotent: cancelling again is a no-op. Raises `NotFound`
    (`event_not_found`) and `PreconditionFailed` (`event_already_final`) once finished."""
    return _event_terminate(
        event_id=event_id,
        target=EventState.CANCELLED,
        kind=EventChange.Kind.CANCELLED,
        actor_id=actor_id,
        via=via,
    )
