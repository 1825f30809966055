"""What the hot paths cost the database, pinned (issue 14 item 2), and the bodies they build
without serializers, pinned to the serializers' bytes.

A plain bet is one statement on PostgreSQL (its own transaction: no BEGIN, COMMIT or SAVEPOINT
round trips) and one short transaction on SQLite; an Idempotency-Key adds only its claim. The
open-events list is one query whatever its length, none when cached.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from betting import api, schemas, selectors, services
from betting.models import Bet, Event
from common.exceptions import Conflict, PreconditionFailed
from tests.betting.factories import event_create
from tests.factories import UserFactory, token_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.django_db(transaction=True)]

POSTGRES = "postgresql"
#: SQLite: BEGIN IMMEDIATE, the event read, the insert, COMMIT (Django logs BEGIN and COMMIT).
SQLITE_PLAIN_BET = ["BEGIN", "SELECT", "INSERT", "COMMIT"]


def _statements(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"].split(None, 1)[0].upper() for query in queries.captured_queries]


def _betting(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in queries.captured_queries if "betting_" in query["sql"]]


def _client(user: object) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Token {token_for(user)}")


def test_a_plain_bet_is_one_statement_on_postgres_and_one_transaction_on_sqlite() -> None:
    event = event_create()
    user = UserFactory.create()
    with CaptureQueriesContext(connection) as queries:
        services.bet_place(user_id=user.pk, event_id=event.id, amount=Decimal("5.00"))
    if connection.vendor == POSTGRES:
        assert _statements(queries) == ["WITH"]
        assert "FOR SHARE" in queries.captured_queries[0]["sql"]
    else:
        assert _statements(queries) == SQLITE_PLAIN_BET


def test_a_bet_over_http_costs_its_statement_and_no_transaction_round_trips() -> None:
    event = event_create()
    client = _client(UserFactory.create())
    body = {"event_id": event.id, "amount": "5.00"}
    client.post("/api/betting/bet", body, content_type="application/json")  # warm
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/api/betting/bet", body, content_type="application/json")
    assert response.status_code == 201
    statements = _statements(queries)
    if connection.vendor == POSTGRES:
        assert len(_betting(queries)) == 1
        assert not {"BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"} & set(statements)
        assert len(statements) <= 2  # the token lookup (common/) and the bet
    else:
        assert statements.count("BEGIN") == 1
        assert "SAVEPOINT" not in statements
        assert len(_betting(queries)) == 2


def test_an_idempotency_key_adds_only_its_claim_and_a_replay_reads_two_rows() -> None:
    event = event_create()
    user = UserFactory.create()

    def place() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            services.bet_place(
                user_id=user.pk, event_id=event.id, amount=Decimal("5.00"), idempotency_key="k"
            )
        return _statements(queries)

    first, replay = place(), place()
    if connection.vendor == POSTGRES:
        assert first == ["INSERT", "WITH"]
    else:
        assert first == ["INSERT", *SQLITE_PLAIN_BET[:-1], "UPDATE", "COMMIT"]
    assert replay == ["INSERT", "SELECT", "SELECT"]  # the claim refused, the claim, the bet
    assert Bet.objects.count() == 1


def test_a_refused_bet_tells_why_from_the_same_statement() -> None:
    event = event_create()
    Event.objects.filter(pk=event.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    user = UserFactory.create()
    with CaptureQueriesContext(connection) as queries, pytest.raises(PreconditionFailed) as refused:
        services.bet_place(user_id=user.pk, event_id=event.id, amount=Decimal("5.00"))
    assert refused.value.code == "betting_closed"
    if connection.vendor == POSTGRES:
        assert _statements(queries) == ["WITH"]


@pytest.mark.parametrize("events", [3, 40])
def test_the_uncached_event_list_is_one_query_whatever_its_length(
    settings: pytest.FixtureRequest, events: int
) -> None:
    settings.BETTING_EVENTS_CACHE_SECONDS = 0  # type: ignore[attr-defined]
    for _ in range(events):
        event_create()
    client = _client(UserFactory.create())
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/betting/events?limit=200")
    assert response.status_code == 200
    assert len(response.json()["results"]) == events
    assert len(_betting(queries)) == 1


def test_a_cached_event_list_reads_no_row_and_is_the_same_bytes() -> None:
    for _ in range(3):
        event_create()
    client = _client(UserFactory.create())
    pages = []
    for _ in range(3):  # generation set, then rendered and kept, then served from the store
        with CaptureQueriesContext(connection) as queries:
            pages.append(client.get("/api/betting/events?limit=2").content)
    assert len(_betting(queries)) == 0
    assert pages[0] == pages[1] == pages[2]


def test_an_event_list_page_past_the_end_still_counts_the_open_events() -> None:
    for _ in range(3):
        event_create()
    assert selectors.events_open_page(limit=2, offset=5) == (3, [])
    count, rows = selectors.events_open_page(limit=2, offset=2)
    assert count == 3 and len(rows) == 1


def test_the_event_list_body_is_the_serializers_to_the_byte() -> None:
    deadlines = [
        datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2099, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    ]
    for deadline in deadlines:
        services.event_create(
            event_id=f"shape-{deadline.microsecond}",
            name="Naïve “quotes” \u2028 line",
            coefficient=Decimal("1.5"),
            deadline=deadline,
            actor_id=None,
            via="test",
        )
    client = _client(UserFactory.create())
    body = client.get("/api/betting/events?limit=1&offset=1", HTTP_HOST="testserver").content
    expected = {
        "count": 2,
        "next": None,
        "previous": "http://testserver/api/betting/events?limit=1",
        "results": api.EventOutputSerializer(selectors.events_open()[1:], many=True).data,
    }
    assert body == JSONRenderer().render(expected)


def test_a_bet_body_is_the_serializers_to_the_byte() -> None:
    event = event_create(coefficient="2.35")
    user = UserFactory.create()
    render = JSONRenderer().render
    # Built from what the placement statement answered, without reading the row back.
    placed = services.bet_place(user_id=user.pk, event_id=event.id, amount=Decimal("3.3")).bet
    stored = Bet.objects.get(pk=placed.pk)
    assert render(api._bet_body(placed)) == render(api._bet_body(stored))
    assert render(api._bet_body(stored)) == render(api.BetOutputSerializer(stored).data)
    services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    settled = Bet.objects.get(pk=placed.pk)
    assert settled.payout == Decimal("7.76")
    assert render(api._bet_body(settled)) == render(api.BetOutputSerializer(settled).data)
    assert schemas.timestamp_format(datetime(2030, 1, 2, tzinfo=UTC)) == "2030-01-02T00:00:00Z"


@pytest.mark.parametrize("policy", ["none", "higher", "any"])
@pytest.mark.parametrize("expected", [None, "1.50", "2.00", "2.50"])
def test_the_placement_statement_applies_every_odds_rule(policy: str, expected: str | None) -> None:
    event = event_create(coefficient="2.00")
    user = UserFactory.create()
    accepted = (
        expected is None
        or policy == "any"
        or Decimal(expected) == Decimal("2.00")
        or (policy == "higher" and Decimal(expected) < Decimal("2.00"))
    )

    def place() -> services.Placement:
        return services.bet_place(
            user_id=user.pk,
            event_id=event.id,
            amount=Decimal("1.00"),
            expected_coefficient=None if expected is None else Decimal(expected),
            odds_change=policy,
        )

    if accepted:
        assert place().bet.coefficient == Decimal("2.00")
    else:
        with pytest.raises(Conflict) as refused:
            place()
        assert refused.value.details == {"coefficient": "2.00"}
    assert Bet.objects.count() == int(accepted)
