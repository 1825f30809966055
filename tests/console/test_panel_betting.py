"""betting's console panel: its sample over events and bets made through the services (exposure,
overdue events, the settlement backlog and the reconciler's redone settlements), and the
finish/cancel actions with their refusals. Settlement runs in-process after commit."""

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from betting import services
from betting.models import AuditEntry, Bet, BetStatus, Event, EventState
from common.console import ConsolePanel, PanelSample, console_panel
from common.exceptions import NotFound, PreconditionFailed
from common.heartbeat import console_flush
from common.parsers import InvalidValue
from config.celery import app as celery_app
from tests.betting.factories import bet_place, event_create
from tests.factories import StaffFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _settle_in_process() -> Iterator[None]:
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = previous


def panel() -> ConsolePanel:
    found = console_panel("betting")
    assert found is not None, "BettingConfig.ready registers the panel"
    return found


def numbers(sample: PanelSample) -> dict[str, Any]:
    return {number["key"]: number["value"] for number in sample["numbers"]}


def sample_now() -> PanelSample:
    console_flush()
    return panel().sample()


def actions(event_id: str) -> list[dict[str, Any]]:
    params = {"event_id": event_id}
    return [
        {"action": "finish_win", "label": "Win", "params": params},
        {"action": "finish_lose", "label": "Lose", "params": params},
        {"action": "cancel", "label": "Cancel", "params": params},
    ]


def test_the_panel_shows_open_events_with_their_exposure_and_the_overdue_ones() -> None:
    punter = UserFactory.create()
    soon = event_create(coefficient="2.00", deadline_in=timedelta(hours=1))
    later = event_create(coefficient="1.50", deadline_in=timedelta(hours=2))
    overdue = event_create(event_id="cup:final_1", deadline_in=timedelta(minutes=-5))
    before = sample_now()["counters"]["betting.bets"]["value"]
    bet_place(user=punter, event=soon, amount="10.00")
    bet_place(user=punter, event=soon, amount="5.50")

    sample = sample_now()

    assert sample["counters"]["betting.bets"]["value"] - before == 2
    shown = numbers(sample)
    assert (shown["open"], shown["overdue"], shown["unsettled"]) == (2, 1, 0)
    assert shown["settlement_lag"] == 0
    [table] = sample["tables"]
    assert [row["key"] for row in table["rows"]] == [soon.id, later.id]
    first, second = table["rows"]
    assert first["cells"][:2] + first["cells"][3:] == [soon.name, "2.00", "15.50", "31.00"]
    assert second["cells"][3:] == ["0.00", "0.00"]
    assert first["actions"] == actions(soon.id)
    [attention] = sample["attention"]
    assert attention["key"] == "overdue-cup:final_1"
    assert attention["actions"] == actions("cup:final_1")
    page = Client()
    page.force_login(StaffFactory.create(is_superuser=True))
    answer = page.get(attention["link"])
    assert answer.status_code == 200 and overdue.name in answer.content.decode()


def test_an_unsettled_ended_event_shows_as_lag_until_the_reconciler_redoes_it() -> None:
    punter = UserFactory.create()
    event = event_create()
    bet_place(user=punter, event=event, amount="10.00")
    bet_place(user=punter, event=event, amount="20.00")
    # A finish whose settlement task was lost: the state changed, the bets did not.
    Event.objects.filter(pk=event.id).update(
        state=EventState.FINISHED_WIN, finished_at=timezone.now() - timedelta(seconds=30)
    )

    waiting = sample_now()

    shown = numbers(waiting)
    assert shown["unsettled"] == 1 and shown["settlement_lag"] >= 30
    assert [a["key"] for a in waiting["attention"]] == ["backlog"]
    assert services.settlements_reconcile() == 2

    redone = sample_now()

    assert (numbers(redone)["unsettled"], numbers(redone)["settlement_lag"]) == (0, 0)
    [attention] = redone["attention"]
    entry = AuditEntry.objects.get(via="reconciler")
    assert attention["text"].startswith(
        f"the reconciler settled 2 bet(s) of event {event.id} (won)"
    )
    assert attention["link"] == f"/admin/betting/auditentry/{entry.pk}/change/"


def test_finish_and_cancel_actions_settle_the_bets_and_refuse_a_second_outcome() -> None:
    staff = StaffFactory.create()
    punter = UserFactory.create()
    won, voided = event_create(coefficient="3.00"), event_create()
    bet_place(user=punter, event=won, amount="10.00")
    bet_place(user=punter, event=voided, amount="7.00")
    run = {name: action.run for name, action in panel().actions.items()}

    line = run["finish_win"](params={"event_id": won.id}, user=staff)

    assert line == f"Event {won.id} is finished_win; its bets settle now."
    bet = Bet.objects.get(event=won)
    assert (bet.status, bet.payout) == (BetStatus.WON, Decimal("30.00"))
    assert AuditEntry.objects.filter(subject_id=won.id, via="console", actor_id=staff.pk).exists()
    assert run["cancel"](params={"event_id": voided.id}, user=staff).endswith(
        "is cancelled; its bets settle now."
    )
    bet = Bet.objects.get(event=voided)
    assert (bet.status, bet.payout) == (BetStatus.VOID, Decimal("7.00"))
    assert numbers(sample_now())["open"] == 0
    with pytest.raises(PreconditionFailed):
        run["finish_lose"](params={"event_id": won.id}, user=staff)
    with pytest.raises(NotFound):
        run["cancel"](params={"event_id": "no-such-event"}, user=staff)
    with pytest.raises(InvalidValue):
        run["finish_win"](params={"event_id": "two words"}, user=staff)
    assert Event.objects.get(pk=won.id).state == EventState.FINISHED_WIN
