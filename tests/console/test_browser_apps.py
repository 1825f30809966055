"""The four app panels on one live page in real headless Chromium: the scenarios of
test_browser_{vmcontrol,warehouse,betting,docbot}.py one after another on the same page without
a reload, then a few things left for a human (a failed command, a dead letter, an overdue event,
a failed ingestion) and a screenshot. What each panel showed goes to var/console-apps.json.

`CONSOLE_APPS_SCREENSHOT=docs/console-apps.png` refreshes the README's picture (default:
var/console-apps.png, so a test run never changes a tracked file)."""

import json
import os
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from docbot import services as docbot_services
from docbot.models import Document, IngestionFailure
from tests.betting.factories import event_create
from tests.console.conftest import ConsolePage
from tests.console.test_browser_betting import betting_scenario
from tests.console.test_browser_docbot import docbot_scenario
from tests.console.test_browser_vmcontrol import vmcontrol_scenario
from tests.console.test_browser_warehouse import warehouse_scenario
from vmcontrol.models import Command, CommandStatus, VirtualMachine
from warehouse import queue

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / os.environ.get("CONSOLE_APPS_SCREENSHOT", "var/console-apps.png")
SHOWN = ROOT / "var" / "console-apps.json"
WITHIN_MS = 3000
APPS = ("vmcontrol", "warehouse", "betting", "docbot")


def panel_as_shown(view: ConsolePage, name: str) -> dict[str, Any]:
    """The panel's numbers, counters (total and rate), attention items and table rows as the
    page shows them."""
    card = view.panel(name)
    return {
        "numbers": {
            node.get_attribute("data-number"): node.locator(".value").inner_text()
            for node in card.locator("[data-number]").all()
        },
        "counters": {
            node.get_attribute("data-counter"): {
                "total": node.locator(".total").get_attribute("data-value"),
                "rate": node.locator(".rate").inner_text(),
            }
            for node in card.locator("[data-counter]").all()
        },
        "attention": [item.inner_text() for item in view.attention(name).all()],
        "rows": [row.inner_text() for row in card.locator("tr[data-row]").all()],
    }


def leave_work_for_a_human(view: ConsolePage) -> None:
    vm = VirtualMachine.objects.get(name="web-1")
    command = Command.objects.create(
        vm=vm,
        name="update_specs",
        args={"cpu_cores": 64, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]},
        status=CommandStatus.FAILED,
        error={"code": "no_capacity", "message": "the host has no 64 cores"},
    )
    expect(view.action("vmcontrol", "retry", row=f"attention/command-{command.pk}")).to_be_visible(
        timeout=WITHIN_MS
    )
    queue.envelopes_publish([b'{"id": "cut off in the middle'])
    expect(view.number("warehouse", "dead_letters")).to_have_text("1", timeout=WITHIN_MS)
    late = event_create(event_id="late-3", deadline_in=timedelta(minutes=-10))
    expect(view.action("betting", "cancel", row=f"attention/overdue-{late.id}")).to_be_visible(
        timeout=WITHIN_MS
    )
    owner = docbot_services.telegram_account_user(telegram_user_id=747474)
    doc_type = docbot_services.type_create(user=owner, name="Insurance")
    lost = Document.objects.create(
        user=owner, type=doc_type, name="Policy", telegram_file_id="gone", status="failed"
    )
    IngestionFailure.objects.create(
        document_id=lost.pk, user=owner, error="Bot API refused getFile: file not found"
    )
    expect(view.action("docbot", "retry", row=f"attention/failure-{lost.pk}")).to_be_visible(
        timeout=WITHIN_MS
    )


def test_the_four_app_panels_follow_their_apps_on_one_page(
    console_page: ConsolePage, settings: Any, tmp_path: Path
) -> None:
    page = console_page.page
    page.evaluate("window.__notReloaded = true")
    # pytest-django's `settings` must take its snapshot before the scenarios' override_settings
    # (LIFO): the docbot scenario writes to it while the warehouse override is active, and its
    # teardown would otherwise restore that override (strict stock) for every later test.
    settings.DEBUG = settings.DEBUG
    shown: dict[str, Any] = {}
    with ExitStack() as running:
        shown["vmcontrol"] = running.enter_context(vmcontrol_scenario(console_page))
        shown["warehouse"] = running.enter_context(
            warehouse_scenario(console_page, tmp_path / "queue")
        )
        shown["betting"] = running.enter_context(betting_scenario(console_page))
        shown["docbot"] = running.enter_context(
            docbot_scenario(console_page, settings, tmp_path / "media")
        )
        leave_work_for_a_human(console_page)
        assert page.evaluate("window.__notReloaded") is True
        final = {name: panel_as_shown(console_page, name) for name in APPS}
        for name in APPS:
            expect(console_page.panel(name)).to_have_attribute("data-status", "ok")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    record = {"during the scenarios": shown, "at the screenshot": final}
    SHOWN.parent.mkdir(parents=True, exist_ok=True)
    SHOWN.write_text(json.dumps(record, indent=2, ensure_ascii=False))
