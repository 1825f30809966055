"""Betting writes: events (line provider), bet placement, settlement, reconciliation.

Lock order everywhere: event row, then the change-sequence row (see lock_objects).
"""

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Sum
from django.utils import timezone
from prometheus_client import Counter

from betting import schemas
from betting.lock_objects import change_sequence_next, event_for_update
from betting.models import (
    TERMINAL_STATES,
    AuditEntry,
    Bet,
    BetStatus,
    Event,
    EventChange,
    EventState,
    IdempotencyKey,
)
from common.exceptions import (
    Conflict,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    ValidationFailed,
)
from realtime.services import publish

logger = structlog.get_logger(__name__)

EVENTS_CACHE_GENERATION_KEY = "betting:events:generation"
EVENTS_TOPIC = "betting.events"
BETS_TOPIC_PREFIX = "betting.bets"

BETS_PLACED = Counter("betting_bets_placed_total", "Bets accepted")
BETS_SETTLED = Counter("betting_bets_settled_total", "Bets settled", ["status"])

OUTCOME_STATES = {"win": EventState.FINISHED_WIN, "lose": EventState.FINISHED_LOSE}
ODDS_CHANGE_POLICIES = ("none", "higher", "any")


def _configured_range(minimum: str, maximum: str, *, name: str) -> schemas.MoneyRange:
    try:
        return schemas.money_range(minimum, maximum, name=name)
    except ValueError as error:
        raise ImproperlyConfigured(str(error)) from None


#: Accepted stakes and coefficients, read once from settings (a malformed value stops the
#: process at start). The doors parse client values with these ranges; the services re-check
#: values handed in by other callers with the same parser, so both give one judgement.
STAKE = _configured_range(
    settings.BETTING_MIN_STAKE, settings.BETTING_MAX_STAKE, name="BETTING_MIN/MAX_STAKE"
)
COEFFICIENT = _configured_range(
    settings.BETTING_MIN_COEFFICIENT,
    settings.BETTING_MAX_COEFFICIENT,
    name="BETTING_MIN/MAX_COEFFICIENT",
)


def event_as_payload(event: Event) -> dict[str, Any]:
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


def _audit(
    *, subject: str, subject_id: str, action: str, actor_id: int | None, via: str, data: Any
) -> None:
    AuditEntry.objects.create(
        subject=subject, subject_id=subject_id, action=action, actor_id=actor_id, via=via, data=data
    )


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
    payload = event_as_payload(event)
    _audit(
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
    """Create an event in state NEW. An existing id is a Conflict.

    `event_id`, `name` and `coefficient` are judged by `betting.schemas` (the doors have parsed
    them already; this guards other callers). The deadline must be aware; the doors also require
    it to be in the future, the service does not (imports and tests create closed events)."""
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


def _event_locked(event_id: str) -> Event:
    event = event_for_update(event_id=event_id).first()
    if event is None:
        raise NotFound(f"event {event_id} not found", code="event_not_found")
    return event


@transaction.atomic
def event_odds_update(
    *, event_id: str, coefficient: Decimal, actor_id: int | None, via: str
) -> Event:
    """Change the coefficient of a NEW event (locks the event row). Same value: no-op."""
    coefficient = COEFFICIENT.check(coefficient, field="coefficient")
    event = _event_locked(event_id)
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
    event = _event_locked(event_id)
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
    from betting.tasks import settle_event

    settle_event.delay_on_commit(event_id)
    return event


@transaction.atomic
def event_finish(*, event_id: str, outcome: str, actor_id: int | None, via: str) -> Event:
    """Finish a NEW event with outcome "win" or "lose" under the event row lock (which placement
    also takes), then settle its bets after commit. Re-sending the same outcome is a no-op."""
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
    """Cancel a NEW event; its bets become void with the stake refunded (after commit)."""
    return _event_terminate(
        event_id=event_id,
        target=EventState.CANCELLED,
        kind=EventChange.Kind.CANCELLED,
        actor_id=actor_id,
        via=via,
    )


@dataclass(frozen=True)
class Placement:
    bet: Bet
    replayed: bool
    status_code: int = 201


def _request_hash(
    *, event_id: str, amount: Decimal, expected_coefficient: Decimal | None, odds_change: str
) -> str:
    canonical = json.dumps(
        [
            event_id,
            schemas.money_format(amount),
            None if expected_coefficient is None else schemas.money_format(expected_coefficient),
            odds_change,
        ]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_claim(*, user_id: int, key: str, request_hash: str) -> IdempotencyKey:
    """Claim (user, key) in its own transaction; an existing claim decides the answer."""
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(
                user_id=user_id, key=key, request_hash=request_hash
            )
    except IntegrityError:
        pass
    existing = IdempotencyKey.objects.filter(user_id=user_id, key=key).first()
    if existing is None:  # the other request failed and released the key meanwhile
        raise Conflict("the request with this Idempotency-Key is in flight", code="in_flight")
    if existing.request_hash != request_hash:
        raise Unprocessable(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
    if existing.state == IdempotencyKey.State.IN_FLIGHT:
        raise Conflict("the request with this Idempotency-Key is in flight", code="in_flight")
    return existing


def _bet_insert(
    *,
    user_id: int,
    event_id: str,
    amount: Decimal,
    expected_coefficient: Decimal | None,
    odds_change: str,
) -> Bet:
    event = _event_locked(event_id)
    if event.state != EventState.NEW:
        raise PreconditionFailed(f"event {event_id} is {event.state}", code="event_closed")
    if timezone.now() >= event.deadline:
        raise PreconditionFailed("the betting deadline has passed", code="betting_closed")
    current = event.coefficient
    if expected_coefficient is not None and current != expected_coefficient:
        moved_up = current > expected_coefficient
        if odds_change == "none" or (odds_change == "higher" and not moved_up):
            raise Conflict(
                "the coefficient has changed",
                code="odds_changed",
                details={"coefficient": schemas.money_format(current)},
            )
    bet = Bet.objects.create(
        user_id=user_id,
        event_id=event_id,
        amount=amount,
        coefficient=current,
        potential_payout=schemas.payout_of(amount, current),
    )
    BETS_PLACED.inc()
    return bet


def bet_place(
    *,
    user_id: int,
    event_id: str,
    amount: Decimal,
    expected_coefficient: Decimal | None = None,
    odds_change: str = "none",
    idempotency_key: str | None = None,
) -> Placement:
    """Accept a bet at the current coefficient (frozen on the bet) if the event is NEW and
    `now < deadline`, checked under the event row lock inside the inserting transaction.

    `amount` and `expected_coefficient` are judged by `STAKE`/`COEFFICIENT` and the key by
    `schemas.idempotency_key` (the same rules the doors applied; this guards other callers).
    With `idempotency_key`: a replay returns the same bet; the same key with a different body is
    Unprocessable; a duplicate still in flight is a Conflict. A failed placement releases the key.
    """
    amount = STAKE.check(amount, field="amount")
    if expected_coefficient is not None:
        expected_coefficient = COEFFICIENT.check(expected_coefficient, field="expected_coefficient")
    if odds_change not in ODDS_CHANGE_POLICIES:
        raise ValidationFailed(
            "odds_change must be none, higher or any",
            code="invalid_policy",
            details={"odds_change": ["must be one of none, higher, any"]},
        )
    claim: IdempotencyKey | None = None
    if idempotency_key is not None:
        idempotency_key = schemas.idempotency_key(idempotency_key)
        claim = _idempotency_claim(
            user_id=user_id,
            key=idempotency_key,
            request_hash=_request_hash(
                event_id=event_id,
                amount=amount,
                expected_coefficient=expected_coefficient,
                odds_change=odds_change,
            ),
        )
        if claim.state == IdempotencyKey.State.DONE:
            assert claim.bet_id is not None
            bet = Bet.objects.get(pk=claim.bet_id)
            return Placement(bet=bet, replayed=True, status_code=claim.response_status or 201)
    try:
        with transaction.atomic():
            bet = _bet_insert(
                user_id=user_id,
                event_id=event_id,
                amount=amount,
                expected_coefficient=expected_coefficient,
                odds_change=odds_change,
            )
            if claim is not None:
                IdempotencyKey.objects.filter(pk=claim.pk).update(
                    state=IdempotencyKey.State.DONE, bet=bet, response_status=201
                )
    except Exception:
        if claim is not None:
            IdempotencyKey.objects.filter(
                pk=claim.pk, state=IdempotencyKey.State.IN_FLIGHT
            ).delete()
        raise
    return Placement(bet=bet, replayed=False)


SETTLEMENT_BY_STATE: dict[str, tuple[str, Any]] = {
    EventState.FINISHED_WIN: (BetStatus.WON, F("potential_payout")),
    EventState.FINISHED_LOSE: (BetStatus.LOST, Decimal("0.00")),
    EventState.CANCELLED: (BetStatus.VOID, F("amount")),
}


@transaction.atomic
def event_bets_settle(*, event_id: str, via: str = "task") -> int:
    """Settle every pending bet of a finished/cancelled event with one set-based UPDATE
    (`WHERE event = X AND status = pending`). Idempotent: a repeat changes 0 rows. Returns the
    number of bets settled; notifies each owner after commit."""
    event = Event.objects.filter(pk=event_id).first()
    if event is None or event.state not in SETTLEMENT_BY_STATE:
        return 0
    status, payout = SETTLEMENT_BY_STATE[event.state]
    now = timezone.now()
    settled = Bet.objects.filter(event_id=event_id, status=BetStatus.PENDING).update(
        status=status, payout=payout, settled_at=now
    )
    if not settled:
        return 0
    BETS_SETTLED.labels(status).inc(settled)
    _audit(
        subject=AuditEntry.Subject.BET,
        subject_id=event_id,
        action=f"settled_{status}",
        actor_id=None,
        via=via,
        data={"event_id": event_id, "status": status, "bets": settled, "at": now.isoformat()},
    )
    per_user = (
        Bet.objects.filter(event_id=event_id, status=status, settled_at=now)
        .values("user_id")
        .annotate(bets=Count("id"), payout=Sum("payout"))
        .order_by("user_id")
    )
    for row in per_user:
        publish(
            f"{BETS_TOPIC_PREFIX}.{row['user_id']}",
            {
                "type": "bets.settled",
                "event_id": event_id,
                "status": status,
                "bets": row["bets"],
                "payout": schemas.money_format(row["payout"]),
            },
        )
    logger.info("bets_settled", event_id=event_id, status=status, bets=settled, via=via)
    return settled


def settlements_reconcile() -> int:
    """Settle every finished/cancelled event that still has pending bets (periodic safety net
    for lost or failed settlement tasks). Returns the number of bets settled."""
    event_ids = list(
        Bet.objects.filter(status=BetStatus.PENDING)
        .exclude(event__state=EventState.NEW)
        .values_list("event_id", flat=True)
        .distinct()
    )
    return sum(event_bets_settle(event_id=event_id, via="reconciler") for event_id in event_ids)
