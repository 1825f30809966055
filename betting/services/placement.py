"""Bet placement: at the event's current coefficient, checked under the event row lock, with
an optional Idempotency-Key so a retried request never places a second bet."""

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone
from prometheus_client import Counter

from betting import schemas
from betting.models import Bet, EventState, IdempotencyKey
from betting.services.events import event_locked
from betting.services.ranges import COEFFICIENT, STAKE
from common.exceptions import Conflict, PreconditionFailed, Unprocessable, ValidationFailed

BETS_PLACED = Counter("betting_bets_placed_total", "Bets accepted")

ODDS_CHANGE_POLICIES = ("none", "higher", "any")


@dataclass(frozen=True)
class Placement:
    """`bet_place`'s answer: the bet, whether it is the replay of an earlier request with the
    same Idempotency-Key, and the HTTP status that request was answered with."""

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
    event = event_locked(event_id)
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
    """Accept a bet of `amount` (2 decimal places) at the current coefficient (frozen on the
    bet, with `potential_payout = amount * coefficient` rounded half up to cents) if the event
    is NEW and `now < deadline`, checked under the event row lock inside the inserting
    transaction (finishing takes the same lock, so no bet lands after a finish).

    `amount` and `expected_coefficient` are judged by `STAKE`/`COEFFICIENT` and the key by
    `schemas.idempotency_key` (the same rules the doors applied; this guards other callers).
    `odds_change` says which move of the coefficient away from `expected_coefficient` is still
    accepted: `none`, `higher` or `any`.

    With `idempotency_key`: a replay returns the same bet (`replayed=True`); the same key with
    a different body is `Unprocessable` (`idempotency_key_reused`); a duplicate still in flight
    is a `Conflict` (`in_flight`). A failed placement releases the key. Also raises
    `InvalidValue`, `ValidationFailed` (`invalid_policy`), `NotFound` (`event_not_found`),
    `PreconditionFailed` (`event_closed`, `betting_closed`) and `Conflict` (`odds_changed`,
    with the current coefficient in `details`)."""
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
