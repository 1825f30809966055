"""Settlement: one set-based UPDATE per outcome, idempotent, reconciled, audited, published."""

import asyncio
import json
from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async
from websockets.asyncio.client import connect

from betting import services
from betting.models import AuditEntry, Bet, BetStatus, Event, EventState
from betting.tasks import reconcile_settlements, settle_event
from tests.betting.factories import bet_place, event_create
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = [pytest.mark.timeout(60), pytest.mark.django_db(transaction=True)]


def statuses(event: Event) -> list[tuple[str, Decimal | None]]:
    return list(Bet.objects.filter(event=event).order_by("id").values_list("status", "payout"))


def test_win_settles_every_pending_bet_as_won_with_payout_to_the_cent() -> None:
    event = event_create(coefficient="1.95")
    user = UserFactory.create()
    for amount in ("10.00", "3.33", "1.01"):
        bet_place(user=user, event=event, amount=amount)
    services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    assert statuses(event) == [
        ("won", Decimal("19.50")),
        ("won", Decimal("6.49")),
        ("won", Decimal("1.97")),
    ]


def test_lose_settles_every_pending_bet_as_lost_with_zero_payout() -> None:
    event = event_create()
    for _ in range(3):
        bet_place(user=UserFactory.create(), event=event)
    services.event_finish(event_id=event.id, outcome="lose", actor_id=None, via="test")
    assert statuses(event) == [("lost", Decimal("0.00"))] * 3


def test_cancel_voids_every_pending_bet_and_refunds_the_stake() -> None:
    event = event_create(coefficient="3.00")
    user = UserFactory.create()
    bet_place(user=user, event=event, amount="12.34")
    bet_place(user=user, event=event, amount="5.00")
    services.event_cancel(event_id=event.id, actor_id=None, via="test")
    assert statuses(event) == [("void", Decimal("12.34")), ("void", Decimal("5.00"))]


def test_repeated_or_redelivered_settlement_changes_zero_rows() -> None:
    event = event_create()
    for _ in range(4):
        bet_place(user=UserFactory.create(), event=event)
    services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    audits = AuditEntry.objects.filter(subject="bet").count()
    before = statuses(event)
    assert services.event_bets_settle(event_id=event.id) == 0
    assert settle_event.apply(args=[event.id]).get() == 0
    assert statuses(event) == before
    assert AuditEntry.objects.filter(subject="bet").count() == audits == 1


def test_resending_the_same_terminal_state_is_a_no_op() -> None:
    event = event_create()
    first = services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    again = services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    assert again.version == first.version
    assert again.sequence == first.sequence


def test_settling_a_new_event_does_nothing() -> None:
    event = event_create()
    bet_place(user=UserFactory.create(), event=event)
    assert services.event_bets_settle(event_id=event.id) == 0
    assert statuses(event) == [("pending", None)]


def test_reconciler_settles_finished_events_whose_settlement_was_lost() -> None:
    lost, cancelled, running = event_create(), event_create(), event_create()
    for event in (lost, cancelled, running):
        bet_place(user=UserFactory.create(), event=event, amount="2.00")
    # The finish committed but its settlement message never ran (lost with a dead worker).
    Event.objects.filter(pk=lost.pk).update(state=EventState.FINISHED_WIN)
    Event.objects.filter(pk=cancelled.pk).update(state=EventState.CANCELLED)
    assert reconcile_settlements.apply().get() == 2
    assert statuses(lost) == [("won", Decimal("3.50"))]
    assert statuses(cancelled) == [("void", Decimal("2.00"))]
    assert statuses(running) == [("pending", None)]
    assert not Bet.objects.filter(status=BetStatus.PENDING).exclude(event=running).exists()
    assert reconcile_settlements.apply().get() == 0


def test_audit_records_event_changes_and_bet_settlements_with_their_path() -> None:
    event = event_create()
    bet_place(user=UserFactory.create(), event=event)
    staff = StaffFactory.create()
    services.event_odds_update(
        event_id=event.id, coefficient=Decimal("2.10"), actor_id=staff.pk, via="rest"
    )
    services.event_finish(event_id=event.id, outcome="lose", actor_id=staff.pk, via="admin")
    trail = list(
        AuditEntry.objects.order_by("id").values_list("subject", "action", "actor_id", "via")
    )
    assert trail == [
        ("event", "created", None, "test"),
        ("event", "odds", staff.pk, "rest"),
        ("event", "finished", staff.pk, "admin"),
        ("bet", "settled_lost", None, "task"),
    ]
    assert AuditEntry.objects.get(action="odds").data["coefficient"] == "2.10"


async def _ticket(server: LiveServer, user: object) -> str:
    headers = await sync_to_async(auth_header)(user)
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        response = await client.post("/api/realtime/ticket", headers=headers)
    return str(response.json()["ticket"])


async def _frame(ws: object) -> dict[str, object]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), 5)))  # type: ignore[attr-defined]


async def test_odds_changes_and_settlements_are_published_to_realtime(
    asgi_server: LiveServer,
) -> None:
    bettor = await sync_to_async(UserFactory.create)()
    staff = await sync_to_async(StaffFactory.create)()
    event = await sync_to_async(event_create)(coefficient="2.00")
    await sync_to_async(bet_place)(user=bettor, event=event, amount="4.00")
    ticket = await _ticket(asgi_server, bettor)
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        mine = f"betting.bets.{bettor.pk}"
        for topic in ("betting.events", mine):
            await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
            assert (await _frame(ws))["type"] == "subscribed"
        headers = await sync_to_async(auth_header)(staff)
        async with httpx.AsyncClient(base_url=asgi_server.http_url, headers=headers) as client:
            odds = await client.post(
                f"/api/betting/events/{event.id}/odds", json={"coefficient": "2.20"}
            )
            assert odds.status_code == 200
            changed = await _frame(ws)
            assert changed["topic"] == "betting.events"
            payload = changed["payload"]
            assert isinstance(payload, dict)
            assert payload["type"] == "event.odds"
            assert payload["event"]["coefficient"] == "2.20"
            finish = await client.post(
                f"/api/betting/events/{event.id}/finish", json={"outcome": "win"}
            )
            assert finish.status_code == 200
        frames = [await _frame(ws), await _frame(ws)]
        by_topic = {frame["topic"]: frame["payload"] for frame in frames}
        assert by_topic["betting.events"]["type"] == "event.finished"  # type: ignore[index]
        assert by_topic[mine] == {
            "type": "bets.settled",
            "event_id": event.id,
            "status": "won",
            "bets": 1,
            "payout": "8.00",
        }
