"""The console in a real browser: headless Chromium against a live server, logged in through the
admin login page; the page follows what happens without a reload, and its buttons act."""

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from websockets.sync.client import ClientConnection, connect

from common import console
from realtime import services as realtime_services
from tests.console.conftest import ConsolePage, Dial
from tests.factories import UserFactory

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
#: Where the screenshot goes (`CONSOLE_SCREENSHOT=docs/console.png` refreshes the README's).
SCREENSHOT = ROOT / os.environ.get("CONSOLE_SCREENSHOT", "var/console.png")
CHANGE_SECONDS_MS = 3000


def _socket_for(server_ws_url: str, user: Any) -> ClientConnection:
    ticket, _ = realtime_services.ticket_issue(user=user)
    return connect(f"{server_ws_url}/ws/?ticket={ticket}", open_timeout=10)


def _request(ws: ClientConnection, frame: dict[str, Any], kind: str) -> dict[str, Any]:
    ws.send(json.dumps({**frame, "ref": "r"}))
    while True:
        answer = json.loads(ws.recv(timeout=5))
        if answer.get("ref") == "r" and answer.get("type") in (kind, "error"):
            return answer


def test_console_shows_every_panel_and_follows_live_changes_without_reload(
    console_page: ConsolePage,
) -> None:
    page = console_page.page
    for panel in console.console_panels():
        card = console_page.panel(panel.name)
        expect(card.locator("h2")).to_have_text(panel.title)
        expect(card).to_have_attribute("data-status", "ok")
    expect(console_page.row("platform", "dependencies", "database")).to_contain_text("ready")
    page.evaluate("window.__notReloaded = true")

    # The page's own socket is the only one, once a heartbeat after it connected was sampled.
    sockets = 1
    expect(console_page.number("realtime", "sockets")).to_have_text(str(sockets))
    console_page.wait_fresh("realtime")
    total = console_page.counter_total("realtime", "messages")
    messages = int(total.get_attribute("data-value") or 0)
    chatter = UserFactory.create()
    with _socket_for(console_page.server.ws_url, chatter) as ws:
        # Someone connects: the open sockets go up.
        expect(console_page.number("realtime", "sockets")).to_have_text(
            str(sockets + 1), timeout=CHANGE_SECONDS_MS
        )
        # They say something: the message counter goes up, and the room is listed.
        ack = _request(ws, {"type": "sendMessage", "text": "hello console"}, "ack")
        assert ack["type"] == "ack", ack
        expect(total).to_have_attribute("data-value", str(messages + 1), timeout=CHANGE_SECONDS_MS)
        expect(console_page.row("realtime", "busiest_rooms", ack["room"])).to_be_visible()
        room_link = console_page.row("realtime", "busiest_rooms", ack["room"]).locator("a")
        room_id = realtime_services.room_default().pk
        expect(room_link).to_have_attribute("href", f"/admin/realtime/room/{room_id}/change/")
    # They leave: the open sockets go back down.
    expect(console_page.number("realtime", "sockets")).to_have_text(
        str(sockets), timeout=CHANGE_SECONDS_MS
    )
    assert page.evaluate("window.__notReloaded") is True
    expect(console_page.rate("realtime", "messages")).to_have_text(re.compile(r"^\d+\.\d\d/s$"))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_pressing_an_action_shows_its_answer_and_its_effect(
    dial: Dial, console_page: ConsolePage
) -> None:
    turn = console_page.action("dial", "turn", row="dials/main")
    turn.first.click()
    expect(console_page.flash("dial")).to_have_text("Turned the dial to 1.")
    expect(console_page.flash("dial")).to_have_attribute("data-kind", "ok")
    expect(console_page.number("dial", "position")).to_have_text("1", timeout=CHANGE_SECONDS_MS)
    turn.first.click()
    expect(console_page.attention("dial")).to_have_text(["the dial is high"])
    expect(console_page.attention("dial").locator("a")).to_have_attribute("href", "/admin/")
    # A refusal is shown in the action's line, and nothing changes.
    turn.last.click()
    expect(console_page.flash("dial")).to_have_text("Turn a lot: The dial stops at 3.")
    expect(console_page.flash("dial")).to_have_attribute("data-kind", "error")
    assert dial.position == 2
    expect(console_page.number("dial", "position")).to_have_text("2")


def test_reload_shows_the_numbers_the_live_page_showed(console_page: ConsolePage) -> None:
    page = console_page.page
    live = page.evaluate(
        "JSON.stringify(Object.fromEntries(Object.entries(window.quintetConsole.panels)"
        ".map(([k, v]) => [k, v.at])))"
    )
    console_page.reload()
    reloaded = json.loads(
        page.evaluate(
            "JSON.stringify(Object.fromEntries(Object.entries(window.quintetConsole.panels)"
            ".map(([k, v]) => [k, v.at])))"
        )
    )
    # After a reload every panel is at the same sample or a later one, never an older one.
    for name, at in json.loads(live).items():
        assert reloaded[name] >= at
