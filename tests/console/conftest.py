"""Console fixtures: the publisher ticking fast in-process, a hub that records what is published,
and `console_page`, a staff user's real headless Chromium (Debian's `chromium`, driven by
Playwright; never a downloaded browser) logged in through /admin/login/ and showing /console/
on a live ASGI server.

App panels' browser steps reuse `console_page`:

    def test_...(console_page: ConsolePage) -> None:
        ...make something happen (an agent connects, a message arrives)...
        expect(console_page.number("warehouse", "ledger_rows")).to_have_text("1", timeout=3000)
        console_page.action("warehouse", "replay", row="dead_letters/17").click()
        expect(console_page.flash("warehouse")).to_contain_text("replayed")
"""

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connections

from common import console
from common.console import (
    ConsoleAction,
    ConsoleHub,
    ConsolePanel,
    PanelSample,
    console_hub,
    console_hub_register,
)
from common.console_publisher import console_tick
from common.exceptions import ValidationFailed
from common.heartbeat import process_heartbeat_start
from common.parsers import integer
from tests.conftest import LiveServer, start_live_server
from tests.factories import StaffFactory

CHROMIUM = os.environ.get("CONSOLE_TEST_CHROMIUM", "/usr/bin/chromium")
#: How often the in-process publisher samples during browser tests (production: 2 s).
FAST_SAMPLE_SECONDS = 0.25


class FastPublisher:
    """`console_tick` every `every` seconds in a thread, as the beat task does in production."""

    def __init__(self, every: float = FAST_SAMPLE_SECONDS) -> None:
        self.every = every
        self.stop_event = threading.Event()
        self.ticks = 0
        self.thread = threading.Thread(target=self._run, name="console-publisher", daemon=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if console_tick(min_gap=0):
                    self.ticks += 1
            finally:
                # Test databases cannot be dropped while a thread keeps a connection open.
                connections.close_all()
            self.stop_event.wait(self.every)

    def start(self) -> "FastPublisher":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


@pytest.fixture
def console_server(transactional_db: None) -> Iterator[LiveServer]:
    """A live ASGI server (HTTP and /ws/) with the console publisher ticking fast beside it."""
    server = start_live_server()
    process_heartbeat_start("asgi")  # the live server's process reports like a real one
    publisher = FastPublisher().start()
    try:
        yield server
    finally:
        publisher.stop()
        server.stop()


@dataclass
class RecordingHub:
    """Wraps the registered hub: every publish is recorded, then passed on."""

    inner: ConsoleHub | None
    published: list[tuple[str, Any]] = field(default_factory=list)

    def publish(self, topic: str, payload: Any) -> None:
        self.published.append((topic, payload))
        if self.inner is not None:
            self.inner.publish(topic, payload)

    def last(self, topic: str) -> Any:
        return [payload for t, payload in self.published if t == topic][-1]


@pytest.fixture
def recording_hub() -> Iterator[RecordingHub]:
    original = console_hub()
    recorder = RecordingHub(original)
    declare = original.declare_staff_topic if original is not None else (lambda topic: None)
    hello = original.hello if original is not None else ()
    console_hub_register(
        ConsoleHub(declare_staff_topic=declare, publish=recorder.publish, hello=hello)
    )
    try:
        yield recorder
    finally:
        if original is not None:
            console_hub_register(original)


@pytest.fixture
def extra_panel() -> Iterator[list[str]]:
    """Register test panels with `console.console_panel_register` and append their names here;
    they are removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        console._PANELS.pop(name, None)


class Dial:
    """A stand-in app for the action path: a dial an operator can turn, refusing > 3."""

    def __init__(self) -> None:
        self.position = 0

    def sample(self) -> PanelSample:
        return {
            "counters": {"turns": {"label": "turns", "value": self.position}},
            "numbers": [{"key": "position", "label": "position", "value": self.position}],
            "attention": (
                [{"key": "high", "text": "the dial is high", "link": "/admin/"}]
                if self.position >= 2
                else []
            ),
            "tables": [
                {
                    "key": "dials",
                    "title": "Dials",
                    "columns": ["dial", "position"],
                    "rows": [
                        {
                            "key": "main",
                            "cells": ["main", self.position],
                            "link": "/admin/",
                            "actions": [
                                {"action": "turn", "label": "Turn", "params": {"by": 1}},
                                {"action": "turn", "label": "Turn a lot", "params": {"by": 9}},
                            ],
                        }
                    ],
                }
            ],
        }

    def turn(self, *, params: Any, user: Any) -> str:
        by = integer(params.get("by"), field="by", min_value=1, max_value=9)
        if self.position + by > 3:
            raise ValidationFailed("The dial stops at 3.", code="dial_stop")
        self.position += by
        return f"Turned the dial to {self.position}."


@pytest.fixture
def dial(extra_panel: list[str]) -> Dial:
    dial = Dial()
    console.console_panel_register(
        ConsolePanel(
            name="dial",
            title="Dial",
            sample=dial.sample,
            order=1000,
            actions={"turn": ConsoleAction(label="Turn", run=dial.turn)},
        )
    )
    extra_panel.append("dial")
    return dial


@dataclass
class ConsolePage:
    """A logged-in staff user's /console/ in headless Chromium, and locators for its parts."""

    page: Any  # playwright.sync_api.Page
    server: LiveServer
    user: Any

    def panel(self, name: str) -> Any:
        return self.page.locator(f"#panel-{name}")

    def number(self, panel: str, key: str) -> Any:
        """The value of a `numbers` entry (its text is the value as shown)."""
        return self.panel(panel).locator(f'[data-number="{key}"] .value')

    def counter_total(self, panel: str, key: str) -> Any:
        """A counter's total (`data-value` holds the integer)."""
        return self.panel(panel).locator(f'[data-counter="{key}"] .total')

    def rate(self, panel: str, key: str) -> Any:
        return self.panel(panel).locator(f'[data-counter="{key}"] .rate')

    def attention(self, panel: str) -> Any:
        """The panel's "needs a human" items (`li`, each with `data-key`)."""
        return self.panel(panel).locator("[data-attention] li")

    def row(self, panel: str, table: str, key: str) -> Any:
        return self.panel(panel).locator(f'[data-table="{table}"] tr[data-row="{key}"]')

    def action(self, panel: str, action: str, *, row: str | None = None) -> Any:
        """An action button; `row` = `<table key>/<row key>` or `attention/<item key>`."""
        scope = self.panel(panel)
        if row is not None:
            where, _, key = row.partition("/")
            scope = (
                scope.locator(f'[data-attention] li[data-key="{key}"]')
                if where == "attention"
                else scope.locator(f'[data-table="{where}"] tr[data-row="{key}"]')
            )
        return scope.locator(f'button[data-action="{action}"]')

    def flash(self, panel: str) -> Any:
        """The line an action answered (`data-kind` ok / error)."""
        return self.panel(panel).locator("[data-flash]")

    def wait_fresh(self, panel: str, timeout_ms: int = 3000) -> None:
        """Wait until the page shows a sample of `panel` taken after now: read a baseline from
        the page only after this, or it may be a tick older than what you just changed."""
        self.page.wait_for_function(
            "([name, after]) => Number(document.getElementById(`panel-${name}`).dataset.at)"
            " > after",
            arg=[panel, time.time()],
            timeout=timeout_ms,
        )

    def reload(self) -> None:
        self.page.reload()
        self.wait_live()

    def wait_live(self) -> None:
        from playwright.sync_api import expect

        expect(self.page.locator("#connection")).to_have_attribute(
            "data-state", "live", timeout=15000
        )


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium from the system (Playwright drives it; nothing is downloaded).

    Playwright's sync API keeps its event loop marked running on the test's thread, which makes
    Django refuse ORM calls there; the test body is plain synchronous code, so it is allowed
    (pytest-django's documented setting for Playwright)."""
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()
            # With Playwright's loop running, Django's connections live in a context-local slot
            # of their own, which pytest-django does not close: the test database could not be
            # dropped.
            connections.close_all()


@pytest.fixture
def console_page(console_server: LiveServer, browser: Any) -> Iterator[ConsolePage]:
    """/console/ for a fresh staff user, logged in through the admin login page (the redirect
    from /console/ included), live on /ws/ with every panel sampled at least once. The
    publisher ticks every FAST_SAMPLE_SECONDS, so a change shows within one tick."""
    from playwright.sync_api import expect

    from tests.factories import TEST_PASSWORD

    user = StaffFactory.create()
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(15000)
    try:
        page.goto(f"{console_server.http_url}/console/")
        assert "/admin/login/" in page.url and "next=/console/" in page.url
        page.fill("#id_username", user.username)
        page.fill("#id_password", TEST_PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url("**/console/")
        console_page = ConsolePage(page=page, server=console_server, user=user)
        console_page.wait_live()
        for name in [panel.name for panel in console.console_panels()]:
            expect(console_page.panel(name)).not_to_have_attribute("data-at", "")
        yield console_page
    finally:
        context.close()
