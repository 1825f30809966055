"""betting on the console in real headless Chromium: a new event and a bet placed through the REST
API show within 3 s without a reload (the open event's exposure, the bets counter); "Finish: win"
on its row finishes it from the page and its bet is paid (settlement in-process here)."""

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from betting.models import Bet, BetStatus, Event, EventState
from config.celery import app as celery_app
from tests.betting.factories import event_create
from tests.console.conftest import ConsolePage
from tests.factories import UserFactory, auth_header

pytestmark = pytest.mark.timeout(120)
WITHIN_MS = 3000


def total(view: ConsolePage, panel: str, key: str) -> int:
    return int(view.counter_total(panel, key).get_attribute("data-value") or 0)


@contextmanager
def betting_scenario(view: ConsolePage) -> Iterator[dict[str, Any]]:
    """An event opens, a bet is placed, the event is finished from the page; yields what the
    panel showed, with a second event still open (for a screenshot)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield _a_bet_is_placed_and_the_event_finished(view)
    finally:
        celery_app.conf.task_always_eager = previous


def _a_bet_is_placed_and_the_event_finished(view: ConsolePage) -> dict[str, Any]:
    bets = total(view, "betting", "betting.bets")
    derby = event_create(event_id="derby-1", coefficient="2.50")
    event_create(event_id="final-2", coefficient="1.80")
    row = view.row("betting", "open", derby.id)
    expect(row).to_contain_text(derby.name, timeout=WITHIN_MS)
    expect(row.locator("td").nth(3)).to_have_text("0.00")
    expect(row.locator("a")).to_have_attribute("href", "/admin/betting/event/derby-1/change/")
    expect(view.number("betting", "open")).to_have_text("2", timeout=WITHIN_MS)

    punter = UserFactory.create()
    placed = httpx.post(
        f"{view.server.http_url}/api/betting/bet",
        json={"event_id": derby.id, "amount": "10.00"},
        headers=auth_header(punter),
        timeout=10,
    )
    assert placed.status_code == 201, placed.text

    expect(row.locator("td").nth(3)).to_have_text("10.00", timeout=WITHIN_MS)
    expect(row.locator("td").nth(4)).to_have_text("25.00")
    expect(view.counter_total("betting", "betting.bets")).to_have_attribute(
        "data-value", str(bets + 1), timeout=WITHIN_MS
    )
    shown: dict[str, Any] = {
        "open events": view.number("betting", "open").inner_text(),
        "derby row": row.inner_text(),
        "bets counted": total(view, "betting", "betting.bets") - bets,
    }

    view.action("betting", "finish_win", row=f"open/{derby.id}").click()

    expect(view.flash("betting")).to_have_text(
        "Event derby-1 is finished_win; its bets settle now."
    )
    expect(row).to_have_count(0, timeout=WITHIN_MS)
    expect(view.number("betting", "open")).to_have_text("1", timeout=WITHIN_MS)
    assert Event.objects.get(pk=derby.id).state == EventState.FINISHED_WIN
    bet = Bet.objects.get(event_id=derby.id)
    assert (bet.status, bet.payout) == (BetStatus.WON, Decimal("25.00"))
    expect(view.number("betting", "unsettled")).to_have_text("0")
    shown["after finish"] = view.flash("betting").inner_text()
    return shown


def test_a_bet_shows_live_as_exposure_and_the_event_is_finished_from_the_page(
    console_page: ConsolePage,
) -> None:
    console_page.page.evaluate("window.__notReloaded = true")
    with betting_scenario(console_page):
        assert console_page.page.evaluate("window.__notReloaded") is True
