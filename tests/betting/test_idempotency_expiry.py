"""An Idempotency-Key claim left in flight by a request that died (a killed web process between
its claim and its bet) expires: a retry takes it over and places the bet once, and the dead
request's claim, should it wake up after all, places nothing."""

from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.test import override_settings
from django.utils import timezone

from betting.models import Bet, IdempotencyKey
from betting.services import placement
from tests.betting.factories import event_create
from tests.factories import UserFactory, auth_header

pytestmark = pytest.mark.timeout(60)


def _place(http: httpx.Client, headers: dict[str, str], event_id: str) -> httpx.Response:
    return http.post(
        "/api/betting/bet", headers=headers, json={"event_id": event_id, "amount": "7"}
    )


def _strand(*, user_id: int, key: str, event_id: str, age: timedelta) -> placement._Claim:
    """A claim as a request that died right after claiming would leave it, `age` old."""
    request_hash = placement._request_hash(
        event_id=event_id, amount=Decimal("7"), expected_coefficient=None, odds_change="none"
    )
    claim = placement._idempotency_claim(user_id=user_id, key=key, request_hash=request_hash)
    assert isinstance(claim, placement._Claim)
    taken_at = timezone.now() - age
    IdempotencyKey.objects.filter(pk=claim.id).update(created_at=taken_at)
    return placement._Claim(id=claim.id, taken_at=taken_at)


@override_settings(BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS=30)
def test_a_retry_takes_over_a_claim_its_dead_request_left_in_flight(http: httpx.Client) -> None:
    event = event_create()
    user = UserFactory.create()
    _strand(user_id=user.pk, key="k-dead", event_id=event.id, age=timedelta(seconds=31))
    headers = {**auth_header(user), "Idempotency-Key": "k-dead"}
    retried = _place(http, headers, event.id)
    assert retried.status_code == 201, retried.text
    again = _place(http, headers, event.id)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == retried.json()
    assert Bet.objects.count() == 1
    assert IdempotencyKey.objects.get(key="k-dead").state == IdempotencyKey.State.DONE


@override_settings(BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS=30)
def test_a_claim_younger_than_the_lease_is_still_in_flight(http: httpx.Client) -> None:
    event = event_create()
    user = UserFactory.create()
    _strand(user_id=user.pk, key="k-young", event_id=event.id, age=timedelta(seconds=29))
    duplicate = _place(http, {**auth_header(user), "Idempotency-Key": "k-young"}, event.id)
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "in_flight"
    assert Bet.objects.count() == 0


@override_settings(BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS=30)
def test_a_stale_claim_with_another_body_is_not_taken_over(http: httpx.Client) -> None:
    event = event_create()
    user = UserFactory.create()
    _strand(user_id=user.pk, key="k-body", event_id=event.id, age=timedelta(minutes=5))
    other = http.post(
        "/api/betting/bet",
        headers={**auth_header(user), "Idempotency-Key": "k-body"},
        json={"event_id": event.id, "amount": "8"},
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert Bet.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@override_settings(BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS=30)
@pytest.mark.parametrize("late_original_first", [False, True])
def test_the_request_whose_claim_was_taken_over_places_nothing(late_original_first: bool) -> None:
    event = event_create()
    user = UserFactory.create()
    stranded = _strand(user_id=user.pk, key="k-slow", event_id=event.id, age=timedelta(minutes=1))
    late_original: dict[str, Any] = {
        "user_id": user.pk,
        "event_id": event.id,
        "amount": Decimal("7"),
        "expected_coefficient": None,
        "odds_change": "none",
    }
    insert = (
        placement._bet_insert_shared
        if placement.connection.vendor == "postgresql"
        else placement._bet_insert_serialized
    )
    if late_original_first:
        # The original woke up before any retry: its claim is still its own, so it places.
        insert(**late_original, claim=stranded)
        retried = placement.bet_place(**late_original, idempotency_key="k-slow")
        assert retried.replayed
    else:
        retried = placement.bet_place(**late_original, idempotency_key="k-slow")
        assert not retried.replayed
        with pytest.raises(placement.Conflict) as lost:
            insert(**late_original, claim=stranded)
        assert lost.value.code == "in_flight"
    assert Bet.objects.count() == 1
    assert IdempotencyKey.objects.get(key="k-slow").state == IdempotencyKey.State.DONE
