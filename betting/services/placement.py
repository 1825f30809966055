"""Bet placement: at the event's current coefficient, checked under the event row's shared lock
(placements on one event run concurrently; writers of the event exclude them), with an optional
Idempotency-Key so a retried request never places a second bet.

Database work per bet: on PostgreSQL one statement (its own transaction) without a key, two with
one (the claim commits first, so a duplicate sees it in flight); on SQLite one transaction."""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from prometheus_client import Counter

from betting import schemas
from betting.lock_objects import EVENT_FOR_SHARE_SQL
from betting.models import Bet, BetStatus, Event, EventState, IdempotencyKey
from betting.services.ranges import COEFFICIENT, STAKE
from common.console import console_count
from common.exceptions import (
    ApplicationError,
    Conflict,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    ValidationFailed,
)

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


@dataclass(frozen=True)
class _Claim:
    """This request's claim of an Idempotency-Key: its row and the instant it was (re)taken,
    which is the claim's token: a request whose token is no longer on the row lost its claim."""

    id: int
    taken_at: datetime


def _idempotency_claim(*, user_id: int, key: str, request_hash: str) -> _Claim | IdempotencyKey:
    """Claim (user, key) with one statement that commits on its own (autocommit) and never
    fails on a duplicate, so it needs no savepoint: the new claim, or the finished earlier
    claim to replay. A claim still in flight after `BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS` was
    left by a request that died between its claim and its bet (a killed web process) and is
    taken over (same body only); its late original, if it is alive after all, then finds its
    token gone and places nothing (`_place_sql`). Raises `Unprocessable`
    (`idempotency_key_reused`) or `Conflict` (`in_flight`) as `bet_place` says."""
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS)
    in_flight = IdempotencyKey.State.IN_FLIGHT.value
    with connection.cursor() as cursor:
        cursor.execute(
            'INSERT INTO betting_idempotencykey (user_id, "key", request_hash, state, created_at)'
            ' VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id, "key") DO UPDATE'
            " SET created_at = excluded.created_at"
            " WHERE betting_idempotencykey.state = %s"
            " AND betting_idempotencykey.created_at < %s"
            " AND betting_idempotencykey.request_hash = excluded.request_hash"
            " RETURNING id",
            [
                user_id,
                key,
                request_hash,
                in_flight,
                connection.ops.adapt_datetimefield_value(now),
                in_flight,
                connection.ops.adapt_datetimefield_value(stale_before),
            ],
        )
        row = cursor.fetchone()
    if row is not None:
        return _Claim(id=int(row[0]), taken_at=now)
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


def _claim_lost() -> Conflict:
    return Conflict(
        "this request's Idempotency-Key claim expired and was taken over by a retry",
        code="in_flight",
    )


def _refusal(
    *,
    event_id: str,
    terms: tuple[str, datetime, Decimal],
    now: datetime,
    expected_coefficient: Decimal | None,
    odds_change: str,
) -> ApplicationError | None:
    """Why an event with these (state, deadline, coefficient) takes no bet now, if it does not.
    `_PLACE_SQL` states the same rules in SQL."""
    state, deadline, current = terms
    if state != EventState.NEW:
        return PreconditionFailed(f"event {event_id} is {state}", code="event_closed")
    if now >= deadline:
        return PreconditionFailed("the betting deadline has passed", code="betting_closed")
    if expected_coefficient is not None and current != expected_coefficient:
        moved_up = current > expected_coefficient
        if odds_change == "none" or (odds_change == "higher" and not moved_up):
            return Conflict(
                "the coefficient has changed",
                code="odds_changed",
                details={"coefficient": schemas.money_format(current)},
            )
    return None


def _place_sql(odds_rule: str) -> str:
    """PostgreSQL placement in one statement (one round trip, one transaction in autocommit):
    the event row under the shared lock, the bet inserted only if `_refusal` would find nothing
    (the same rules, `odds_rule` being its odds rule; `round` of a positive numeric is half-up,
    as `schemas.payout_of`), the claim of an Idempotency-Key marked done with it. The claim row
    is locked by its token first (`_idempotency_claim`): a claim taken over meanwhile places no
    bet, and a takeover waits for this statement. Answers the event's terms, the new bet, if
    any, and whether the claim was held; no row when the event does not exist."""
    return f"""WITH event AS ({EVENT_FOR_SHARE_SQL}),
held AS (
    SELECT id FROM betting_idempotencykey
    WHERE id = %(claim_id)s AND created_at = %(claim_at)s
          AND state = '{IdempotencyKey.State.IN_FLIGHT.value}'
    FOR UPDATE
),
bet AS (
    INSERT INTO betting_bet (user_id, event_id, amount, coefficient, potential_payout, status,
                             payout, created_at, settled_at)
    SELECT %(user_id)s, %(event_id)s, %(amount)s, coefficient,
           round(%(amount)s * coefficient, 2), '{BetStatus.PENDING.value}', NULL, %(now)s, NULL
    FROM event
    WHERE state = '{EventState.NEW.value}' AND %(now)s < deadline AND {odds_rule}
          AND (%(claim_id)s::bigint IS NULL OR EXISTS (SELECT 1 FROM held))
    RETURNING id, potential_payout
),
claim AS (
    UPDATE betting_idempotencykey
    SET state = '{IdempotencyKey.State.DONE.value}', bet_id = bet.id, response_status = 201
    FROM bet WHERE betting_idempotencykey.id = %(claim_id)s
)
SELECT event.state, event.deadline, event.coefficient, bet.id, bet.potential_payout,
       %(claim_id)s::bigint IS NULL OR EXISTS (SELECT 1 FROM held)
FROM event LEFT JOIN bet ON TRUE"""  # noqa: S608 (code constants only; values are parameters)


#: The placement statement by odds policy (`any` also when no coefficient is expected).
_PLACE_SQL = {
    "any": _place_sql("TRUE"),
    "none": _place_sql("coefficient = %(expected)s"),
    "higher": _place_sql("coefficient >= %(expected)s"),
}

_BET_FIELDS = [field.attname for field in Bet._meta.concrete_fields]


def _bet_insert_shared(
    *,
    user_id: int,
    event_id: str,
    amount: Decimal,
    expected_coefficient: Decimal | None,
    odds_change: str,
    claim: _Claim | None,
) -> Bet:
    """PostgreSQL: `_place_sql`. Its shared lock lets placements on one event run concurrently;
    finishing, cancelling and odds changes (exclusive lock) wait for them and they for those."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            _PLACE_SQL["any" if expected_coefficient is None else odds_change],
            {
                "event_id": event_id,
                "user_id": user_id,
                "amount": amount,
                "now": now,
                "expected": expected_coefficient,
                "claim_id": claim.id if claim else None,
                "claim_at": claim.taken_at if claim else None,
            },
        )
        row = cursor.fetchone()
    if row is None:
        raise NotFound(f"event {event_id} not found", code="event_not_found")
    state, deadline, coefficient, bet_id, payout, held = row
    if not held:
        raise _claim_lost()
    if bet_id is None:
        refusal = _refusal(
            event_id=event_id,
            terms=(state, deadline, coefficient),
            now=now,
            expected_coefficient=expected_coefficient,
            odds_change=odds_change,
        )
        if refusal is None:  # the SQL and Python rules disagree: a bug, never a silent no-op
            raise RuntimeError(f"placement on {event_id} refused by SQL alone")
        raise refusal
    values = {
        "id": bet_id,
        "user_id": user_id,
        "event_id": event_id,
        "amount": amount,
        "coefficient": coefficient,
        "potential_payout": payout,
        "status": BetStatus.PENDING.value,
        "payout": None,
        "created_at": now,
        "settled_at": None,
    }
    return Bet.from_db(connection.alias, _BET_FIELDS, [values[name] for name in _BET_FIELDS])


def _bet_insert_serialized(
    *,
    user_id: int,
    event_id: str,
    amount: Decimal,
    expected_coefficient: Decimal | None,
    odds_change: str,
    claim: _Claim | None,
) -> Bet:
    """SQLite: read, judge and insert in one transaction; SQLite has no row locks, and its
    write transactions (BEGIN IMMEDIATE, see settings) exclude each other and every writer of
    the event."""
    with transaction.atomic():
        now = timezone.now()
        terms = (
            Event.objects.filter(pk=event_id)
            .values_list("state", "deadline", "coefficient")
            .first()
        )
        if terms is None:
            raise NotFound(f"event {event_id} not found", code="event_not_found")
        refusal = _refusal(
            event_id=event_id,
            terms=terms,
            now=now,
            expected_coefficient=expected_coefficient,
            odds_change=odds_change,
        )
        if refusal is not None:
            raise refusal
        coefficient = terms[2]
        bet = Bet.objects.create(
            user_id=user_id,
            event_id=event_id,
            amount=amount,
            coefficient=coefficient,
            potential_payout=schemas.payout_of(amount, coefficient),
        )
        if claim is not None and not (
            IdempotencyKey.objects.filter(
                pk=claim.id, created_at=claim.taken_at, state=IdempotencyKey.State.IN_FLIGHT
            ).update(state=IdempotencyKey.State.DONE, bet=bet, response_status=201)
        ):
            raise _claim_lost()  # rolls the bet back with the transaction
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
    is NEW and `now < deadline`, checked inside the inserting transaction under the event
    row's shared lock (`lock_objects`): placements do not wait for each other, finishing,
    cancelling or changing the odds takes the row exclusively, so no bet lands after a finish
    commits and the coefficient frozen on the bet is the one current when it commits.

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
    held: _Claim | None = None
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
        if isinstance(claim, IdempotencyKey):
            assert claim.bet_id is not None
            bet = Bet.objects.get(pk=claim.bet_id)
            return Placement(bet=bet, replayed=True, status_code=claim.response_status or 201)
        held = claim
    insert = _bet_insert_shared if connection.vendor == "postgresql" else _bet_insert_serialized
    try:
        bet = insert(
            user_id=user_id,
            event_id=event_id,
            amount=amount,
            expected_coefficient=expected_coefficient,
            odds_change=odds_change,
            claim=held,
        )
    except Exception:
        if held is not None:
            IdempotencyKey.objects.filter(
                pk=held.id, created_at=held.taken_at, state=IdempotencyKey.State.IN_FLIGHT
            ).delete()
        raise
    BETS_PLACED.inc()
    console_count("betting.bets")
    return Placement(bet=bet, replayed=False)
