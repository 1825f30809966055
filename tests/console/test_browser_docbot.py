"""docbot on the console in real headless Chromium: an update reaches the real polling bot (from
the fake Bot API) and the page shows it within 3 s without a reload (updates counter, active
dialogs); a failed ingestion appears, and "Retry" on it stores the document (task in-process)."""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from config.celery import app as celery_app
from docbot import runtime, services, texts
from docbot.models import Document, IngestionFailure
from tests.console.conftest import ConsolePage
from tests.docbot.conftest import BotEnv, Dialog, PollingBot, point_settings_at
from tests.docbot.fake_telegram import FakeTelegram

pytestmark = pytest.mark.timeout(120)
WITHIN_MS = 3000
#: A user new to this process each time: "active dialogs" counts the users a process served in
#: the last five minutes, so a user already seen by an earlier test would not add one.
USERS = itertools.count(737373)


def total(view: ConsolePage, panel: str, key: str) -> int:
    return int(view.counter_total(panel, key).get_attribute("data-value") or 0)


@contextmanager
def docbot_scenario(view: ConsolePage, settings: Any, media: Path) -> Iterator[dict[str, Any]]:
    """A user talks to the bot, a failed ingestion is retried from the page; yields what the
    panel showed, the bot still polling."""
    fake = FakeTelegram().start()
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    bot: PollingBot | None = None
    try:
        point_settings_at(settings, fake, view.server, media)
        runtime.reset_for_tests()
        env = BotEnv(fake, view.server, media)
        bot = PollingBot(env.config("polling")).start()
        yield _an_update_arrives_and_an_ingestion_is_retried(view, env)
    finally:
        if bot is not None:
            bot.stop()
        runtime.reset_for_tests()
        celery_app.conf.task_always_eager = previous
        fake.stop()


def _an_update_arrives_and_an_ingestion_is_retried(
    view: ConsolePage, env: BotEnv
) -> dict[str, Any]:
    user = next(USERS)
    updates = total(view, "docbot", "docbot.updates")
    dialogs = int(view.number("docbot", "dialogs").inner_text())

    Dialog(env, "polling", user_id=user).say("/help", "Add document: pick")

    expect(view.counter_total("docbot", "docbot.updates")).to_have_attribute(
        "data-value", str(updates + 1), timeout=WITHIN_MS
    )
    expect(view.number("docbot", "dialogs")).to_have_text(str(dialogs + 1), timeout=WITHIN_MS)
    shown: dict[str, Any] = {
        "updates counted": total(view, "docbot", "docbot.updates") - updates,
        "active dialogs": view.number("docbot", "dialogs").inner_text(),
    }

    # The user's upload failed earlier (the Bot API was down); the file is there now.
    owner = services.telegram_account_user(telegram_user_id=user)
    doc_type = services.type_create(user=owner, name="Passport")
    scan = env.fake.add_file(b"%PDF passport scan", name="passport.pdf")
    failed = Document.objects.create(
        user=owner,
        type=doc_type,
        name="Passport scan",
        telegram_file_id=scan.file_id,
        status=Document.Status.FAILED,
    )
    failure = IngestionFailure.objects.create(
        document_id=failed.pk, user=owner, error="Bot API unreachable: connection refused"
    )
    item = view.attention("docbot").and_(view.page.locator(f'[data-key="failure-{failed.pk}"]'))
    expect(item).to_contain_text("Bot API unreachable", timeout=WITHIN_MS)
    expect(item.locator("a")).to_have_attribute(
        "href", f"/admin/docbot/ingestionfailure/{failure.pk}/change/"
    )
    expect(view.number("docbot", "failed")).to_have_text("1")
    shown["failure shown"] = item.inner_text()

    view.action("docbot", "retry", row=f"attention/failure-{failed.pk}").click()

    expect(view.flash("docbot")).to_have_text(
        f"Document Passport scan (#{failed.pk}) queued for ingestion again."
    )
    expect(item).to_have_count(0, timeout=WITHIN_MS)
    expect(view.number("docbot", "failed")).to_have_text("0", timeout=WITHIN_MS)
    failed.refresh_from_db()
    assert failed.status == Document.Status.STORED
    size = len(b"%PDF passport scan")
    env.fake.wait_text(user, texts.STORED.format(name="Passport scan", size=size))
    shown["after retry"] = view.flash("docbot").inner_text()
    return shown


def test_a_bot_update_shows_live_and_a_failed_ingestion_is_retried_from_the_page(
    console_page: ConsolePage, settings: Any, tmp_path: Path
) -> None:
    console_page.page.evaluate("window.__notReloaded = true")
    with docbot_scenario(console_page, settings, tmp_path / "media"):
        assert console_page.page.evaluate("window.__notReloaded") is True
