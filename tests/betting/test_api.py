"""Bet maker REST API over a real uvicorn socket."""

from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from betting import services
from betting.models import Bet, BetStatus, Event, IdempotencyKey
from tests.betting.factories import bet_place, event_create
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.timeout(60)


def place(http: httpx.Client, headers: dict[str, str], **body: object) -> httpx.Response:
    return http.post("/api/betting/bet", json=body, headers=headers)


def test_bet_freezes_coefficient_and_payout_is_right_to_the_cent(http: httpx.Client) -> None:
    event = event_create(coefficient="2.33")
    headers = auth_header(UserFactory.create())
    response = place(http, headers, event_id=event.id, amount="33.33")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["coefficient"] == "2.33"
    assert body["amount"] == "33.33"
    assert body["potential_payout"] == "77.66"
    assert body["status"] == "pending"
    staff = auth_header(StaffFactory.create())
    assert (
        http.post(
            f"/api/betting/events/{event.id}/odds", json={"coefficient": "5.00"}, headers=staff
        ).status_code
        == 200
    )
    bet = http.get(f"/api/betting/bets/{body['id']}", headers=headers).json()
    assert bet["coefficient"] == "2.33"
    assert bet["potential_payout"] == "77.66"
    finish = http.post(
        f"/api/betting/events/{event.id}/finish", json={"outcome": "win"}, headers=staff
    )
    assert finish.status_code == 200
    settled = http.get(f"/api/betting/bets/{body['id']}", headers=headers).json()
    assert settled["status"] == "won"
    assert settled["payout"] == "77.66"


def test_bets_alias_accepts_placement(http: httpx.Client) -> None:
    event = event_create()
    response = http.post(
        "/api/betting/bets",
        json={"event_id": event.id, "amount": "5"},
        headers=auth_header(UserFactory.create()),
    )
    assert response.status_code == 201
    assert response.json()["amount"] == "5.00"


@pytest.mark.parametrize("terminal", ["win", "lose", "cancel"])
def test_no_bet_on_a_finished_or_cancelled_event(http: httpx.Client, terminal: str) -> None:
    event = event_create()
    if terminal == "cancel":
        services.event_cancel(event_id=event.id, actor_id=None, via="test")
    else:
        services.event_finish(event_id=event.id, outcome=terminal, actor_id=None, via="test")
    response = place(http, auth_header(UserFactory.create()), event_id=event.id, amount="5")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "event_closed"
    assert Bet.objects.count() == 0


def test_no_bet_at_or_after_the_deadline(http: httpx.Client) -> None:
    event = event_create()
    Event.objects.filter(pk=event.pk).update(deadline=timezone.now())
    response = place(http, auth_header(UserFactory.create()), event_id=event.id, amount="5")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "betting_closed"


def test_unknown_event_is_404(http: httpx.Client) -> None:
    response = place(http, auth_header(UserFactory.create()), event_id="nope", amount="5")
    assert response.status_code == 404


def test_odds_change_policy(http: httpx.Client) -> None:
    event = event_create(coefficient="2.00")
    services.event_odds_update(
        event_id=event.id, coefficient=Decimal("2.50"), actor_id=None, via="test"
    )
    headers = auth_header(UserFactory.create())
    moved = place(http, headers, event_id=event.id, amount="5", expected_coefficient="2.00")
    assert moved.status_code == 409
    assert moved.json()["error"]["code"] == "odds_changed"
    assert moved.json()["error"]["details"] == {"coefficient": "2.50"}
    higher = place(
        http,
        headers,
        event_id=event.id,
        amount="5",
        expected_coefficient="2.00",
        odds_change="higher",
    )
    assert higher.status_code == 201
    assert higher.json()["coefficient"] == "2.50"
    lower = place(
        http,
        headers,
        event_id=event.id,
        amount="5",
        expected_coefficient="3.00",
        odds_change="higher",
    )
    assert lower.status_code == 409
    anything = place(
        http, headers, event_id=event.id, amount="5", expected_coefficient="3.00", odds_change="any"
    )
    assert anything.status_code == 201


def test_idempotency_key_replay_returns_the_same_bet(http: httpx.Client) -> None:
    event = event_create()
    headers = {**auth_header(UserFactory.create()), "Idempotency-Key": "k-1"}
    first = place(http, headers, event_id=event.id, amount="12.50")
    again = place(http, headers, event_id=event.id, amount="12.50")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert Bet.objects.count() == 1


def test_idempotency_key_with_a_different_body_is_422(http: httpx.Client) -> None:
    event = event_create()
    headers = {**auth_header(UserFactory.create()), "Idempotency-Key": "k-2"}
    assert place(http, headers, event_id=event.id, amount="12.50").status_code == 201
    other = place(http, headers, event_id=event.id, amount="13.00")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert Bet.objects.count() == 1


def test_idempotency_key_still_in_flight_is_409(http: httpx.Client) -> None:
    event = event_create()
    user = UserFactory.create()
    headers = {**auth_header(user), "Idempotency-Key": "k-3"}
    # The first request has claimed the key and not finished yet (its claim row is committed
    # before the bet transaction starts): a duplicate arriving now must not place a second bet.
    first = place(http, {**headers, "Idempotency-Key": "k-probe"}, event_id=event.id, amount="7")
    claim = IdempotencyKey.objects.get(key="k-probe")
    IdempotencyKey.objects.create(
        user=user, key="k-3", request_hash=claim.request_hash, state=IdempotencyKey.State.IN_FLIGHT
    )
    duplicate = place(http, headers, event_id=event.id, amount="7")
    assert first.status_code == 201
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "in_flight"
    assert Bet.objects.count() == 1


def test_failed_placement_releases_the_idempotency_key(http: httpx.Client) -> None:
    event = event_create()
    headers = {**auth_header(UserFactory.create()), "Idempotency-Key": "k-4"}
    Event.objects.filter(pk=event.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    assert place(http, headers, event_id=event.id, amount="7").status_code == 409
    Event.objects.filter(pk=event.pk).update(deadline=timezone.now() + timedelta(hours=1))
    assert place(http, headers, event_id=event.id, amount="7").status_code == 201


def test_bettor_sees_only_own_bets_and_another_users_bet_is_404(http: httpx.Client) -> None:
    event = event_create()
    alice, bob = UserFactory.create(), UserFactory.create()
    mine = bet_place(user=alice, event=event)
    theirs = bet_place(user=bob, event=event)
    alice_headers = auth_header(alice)
    assert http.get(f"/api/betting/bets/{mine.pk}", headers=alice_headers).status_code == 200
    foreign = http.get(f"/api/betting/bets/{theirs.pk}", headers=alice_headers)
    assert foreign.status_code == 404
    listed = http.get("/api/betting/bets", headers=alice_headers).json()
    assert [bet["id"] for bet in listed["results"]] == [mine.pk]


@pytest.mark.parametrize("reader", ["bettor", "staff"])
def test_no_read_path_shows_another_users_bet(http: httpx.Client, reader: str) -> None:
    event = event_create()
    owner = UserFactory.create()
    theirs = bet_place(user=owner, event=event, amount="77.00")
    other = (StaffFactory if reader == "staff" else UserFactory).create()
    mine = bet_place(user=other, event=event, amount="5.00")
    headers = auth_header(other)
    foreign = http.get(f"/api/betting/bets/{theirs.pk}", headers=headers)
    missing = http.get(f"/api/betting/bets/{theirs.pk + 1000}", headers=headers)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]
    for query in ("", f"?event_id={event.id}", "?status=pending", "?limit=500"):
        listed = http.get(f"/api/betting/bets{query}", headers=headers)
        assert [bet["id"] for bet in listed.json()["results"]] == [mine.pk], query
    events = http.get("/api/betting/events", headers=headers).json()["results"]
    assert [event_row["id"] for event_row in events] == [event.id]
    assert not {"amount", "user", "user_id", "bets"} & set(events[0])


def test_an_idempotency_key_is_per_user_and_never_replays_another_users_bet(
    http: httpx.Client,
) -> None:
    event = event_create()
    alice, bob = UserFactory.create(), UserFactory.create()
    key = {"Idempotency-Key": "shared-key"}
    alices = place(http, {**auth_header(alice), **key}, event_id=event.id, amount="12.50")
    bobs = place(http, {**auth_header(bob), **key}, event_id=event.id, amount="12.50")
    assert alices.status_code == bobs.status_code == 201
    assert "Idempotent-Replayed" not in bobs.headers
    assert bobs.json()["id"] != alices.json()["id"]
    assert Bet.objects.get(pk=bobs.json()["id"]).user_id == bob.pk
    different = place(http, {**auth_header(bob), **key}, event_id=event.id, amount="1.00")
    assert different.status_code == 422
    assert "id" not in different.json()


def test_bet_history_is_newest_first_cursor_paginated_and_filtered(http: httpx.Client) -> None:
    first, second = event_create(), event_create()
    user = UserFactory.create()
    ids = [bet_place(user=user, event=first).pk for _ in range(3)]
    ids.append(bet_place(user=user, event=second).pk)
    services.event_finish(event_id=second.id, outcome="lose", actor_id=None, via="test")
    headers = auth_header(user)
    page = http.get("/api/betting/bets?limit=2", headers=headers).json()
    assert [bet["id"] for bet in page["results"]] == ids[::-1][:2]
    rest = http.get(page["next"], headers=headers).json()
    assert [bet["id"] for bet in rest["results"]] == ids[::-1][2:]
    lost = http.get("/api/betting/bets?status=lost", headers=headers).json()["results"]
    assert [(bet["id"], bet["payout"]) for bet in lost] == [(ids[3], "0.00")]
    by_event = http.get(f"/api/betting/bets?event_id={first.id}", headers=headers).json()
    assert sorted(bet["id"] for bet in by_event["results"]) == ids[:3]
    assert http.get("/api/betting/bets?status=bogus", headers=headers).status_code == 400


def test_events_lists_only_open_events_and_cache_is_invalidated_on_change(
    http: httpx.Client,
) -> None:
    open_event = event_create(coefficient="1.50")
    closed = event_create()
    services.event_cancel(event_id=closed.id, actor_id=None, via="test")
    event_create(deadline_in=timedelta(seconds=-5))
    headers = auth_header(UserFactory.create())
    listed = http.get("/api/betting/events", headers=headers).json()
    assert [event["id"] for event in listed["results"]] == [open_event.id]
    assert listed["results"][0]["coefficient"] == "1.50"
    staff = auth_header(StaffFactory.create())
    http.post(
        f"/api/betting/events/{open_event.id}/odds", json={"coefficient": "1.65"}, headers=staff
    )
    relisted = http.get("/api/betting/events", headers=headers).json()
    assert relisted["results"][0]["coefficient"] == "1.65"


def test_events_are_paginated(http: httpx.Client) -> None:
    for _ in range(3):
        event_create()
    headers = auth_header(UserFactory.create())
    page = http.get("/api/betting/events?limit=2", headers=headers).json()
    assert page["count"] == 3
    assert len(page["results"]) == 2


def test_staff_endpoints_require_staff(http: httpx.Client) -> None:
    event = event_create()
    user = auth_header(UserFactory.create())
    deadline = (timezone.now() + timedelta(hours=1)).isoformat()
    body = {"id": "x1", "name": "X", "coefficient": "1.20", "deadline": deadline}
    assert http.post("/api/betting/events", json=body, headers=user).status_code == 403
    assert http.post(f"/api/betting/events/{event.id}/cancel", headers=user).status_code == 403
    assert http.get("/api/betting/events").status_code == 401
    staff = auth_header(StaffFactory.create())
    created = http.post("/api/betting/events", json=body, headers=staff)
    assert created.status_code == 201
    assert created.json()["state"] == "new"
    assert http.post("/api/betting/events", json=body, headers=staff).status_code == 409
    assert http.post("/api/betting/events/x1/cancel", headers=staff).json()["state"] == "cancelled"
    again = http.post("/api/betting/events/x1/cancel", headers=staff)
    assert again.status_code == 200
    finish = http.post("/api/betting/events/x1/finish", json={"outcome": "win"}, headers=staff)
    assert finish.status_code == 409
    assert finish.json()["error"]["code"] == "event_already_final"


def test_money_columns_are_exact_decimals_in_the_database(http: httpx.Client) -> None:
    event = event_create(coefficient="1.10")
    bet = bet_place(user=UserFactory.create(), event=event, amount="3.35")
    with connection.cursor() as cursor:
        cursor.execute("select potential_payout from betting_bet where id = %s", [bet.pk])
        (stored,) = cursor.fetchone()
    assert Decimal(str(stored)) == Decimal("3.69")
    assert Bet.objects.get(pk=bet.pk).status == BetStatus.PENDING
