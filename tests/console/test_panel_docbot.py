"""docbot's console panel: its sample over documents and ingestion failures, the retry action
against the fake Bot API (the real ingestion task, in-process), and the updates counter and
active-dialogs gauge fed by the real polling bot."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import console_store
from common.console import ConsolePanel, PanelSample, console_gauges_read, console_panel
from common.exceptions import Conflict, NotFound
from common.heartbeat import PROCESSES_KEY, console_flush
from common.parsers import InvalidValue
from config.celery import app as celery_app
from docbot import metrics, services, texts
from docbot.models import Document, IngestionFailure
from tests.conftest import LiveServer
from tests.docbot.conftest import BotEnv, Dialog, PollingBot, point_settings_at
from tests.docbot.fake_telegram import FakeTelegram
from tests.factories import StaffFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


@pytest.fixture
def fake_telegram() -> Iterator[FakeTelegram]:
    fake = FakeTelegram().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def telegram(settings: Any, fake_telegram: FakeTelegram, tmp_path: Path) -> Iterator[FakeTelegram]:
    """The fake Bot API configured, and the ingestion task run in-process after commit."""
    settings.TELEGRAM_BOT_TOKEN = fake_telegram.token
    settings.TELEGRAM_API_BASE_URL = fake_telegram.base_url
    settings.TELEGRAM_FILE_BASE_URL = fake_telegram.base_file_url
    settings.MEDIA_ROOT = str(tmp_path)
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield fake_telegram
    finally:
        celery_app.conf.task_always_eager = previous


def panel() -> ConsolePanel:
    found = console_panel("docbot")
    assert found is not None, "DocbotConfig.ready registers the panel"
    return found


def numbers(sample: PanelSample) -> dict[str, Any]:
    return {number["key"]: number["value"] for number in sample["numbers"]}


def document(owner: Any, name: str, status: str, file_id: str = "unknown") -> Document:
    doc_type = services.type_create(user=owner, name=f"T {name}")
    return Document.objects.create(
        user=owner, type=doc_type, name=name, telegram_file_id=file_id, status=status
    )


def test_the_panel_counts_documents_and_lists_the_failures_still_failed(
    telegram: FakeTelegram,
) -> None:
    owner = services.telegram_account_user(telegram_user_id=31)
    document(owner, "Waiting", Document.Status.PENDING)
    broken = document(owner, "Broken", Document.Status.FAILED)
    healed = document(owner, "Healed", Document.Status.STORED)
    IngestionFailure.objects.create(document_id=broken.pk, user=owner, error="first: timeout")
    newest = IngestionFailure.objects.create(
        document_id=broken.pk, user=owner, error="second: Bot API said 400"
    )
    IngestionFailure.objects.create(document_id=healed.pk, user=owner, error="long ago")

    sample = panel().sample()

    shown = numbers(sample)
    assert (shown["pending"], shown["failed"]) == (1, 1)
    [failure] = sample["attention"]
    assert failure["key"] == f"failure-{broken.pk}"
    assert f"document Broken (#{broken.pk}) failed" in failure["text"]
    assert failure["text"].endswith("second: Bot API said 400")
    assert failure["link"] == f"/admin/docbot/ingestionfailure/{newest.pk}/change/"
    assert failure["actions"] == [
        {"action": "retry", "label": "Retry", "params": {"document_id": broken.pk}}
    ]


def test_retry_action_ingests_a_failed_document_again_and_refuses_any_other(
    telegram: FakeTelegram,
) -> None:
    staff = StaffFactory.create()
    owner = services.telegram_account_user(telegram_user_id=32)
    stored_file = telegram.add_file(b"%PDF scan", name="scan.pdf")
    failed = document(owner, "Scan", Document.Status.FAILED, file_id=stored_file.file_id)
    IngestionFailure.objects.create(document_id=failed.pk, user=owner, error="Bot API down")
    retry = panel().actions["retry"].run

    line = retry(params={"document_id": failed.pk}, user=staff)

    assert line == f"Document Scan (#{failed.pk}) queued for ingestion again."
    failed.refresh_from_db()
    assert failed.status == Document.Status.STORED and failed.size == len(b"%PDF scan")
    telegram.wait_text(32, texts.STORED.format(name="Scan", size=len(b"%PDF scan")))
    sample = panel().sample()
    assert numbers(sample)["failed"] == 0 and sample["attention"] == []
    with pytest.raises(Conflict):
        retry(params={"document_id": failed.pk}, user=staff)
    with pytest.raises(NotFound):
        retry(params={"document_id": failed.pk + 1000}, user=staff)
    with pytest.raises(InvalidValue):
        retry(params={"document_id": -1}, user=staff)


def test_a_retry_that_fails_again_leaves_the_document_failed_and_listed(
    telegram: FakeTelegram,
) -> None:
    owner = services.telegram_account_user(telegram_user_id=33)
    failed = document(owner, "Gone", Document.Status.FAILED, file_id="no-such-file")

    panel().actions["retry"].run(params={"document_id": failed.pk}, user=StaffFactory.create())

    failed.refresh_from_db()
    assert failed.status == Document.Status.FAILED
    assert [a["key"] for a in panel().sample()["attention"]] == [f"failure-{failed.pk}"]


def test_updates_are_counted_and_their_users_shown_in_active_dialogs(
    settings: Any, fake_telegram: FakeTelegram, asgi_server: LiveServer, tmp_path: Path
) -> None:
    point_settings_at(settings, fake_telegram, asgi_server, tmp_path / "media")
    env = BotEnv(fake_telegram, asgi_server, tmp_path / "media")
    console_flush()
    before = panel().sample()["counters"]["docbot.updates"]["value"]
    bot = PollingBot(env.config("polling")).start()
    try:
        dialog = Dialog(env, "polling", user_id=515151)
        dialog.say("/help", "Add document: pick")
        Dialog(env, "polling", user_id=616161).say("/help", "Add document: pick")
    finally:
        bot.stop()
    console_flush()
    # This process's heartbeat record, as the bot process's heartbeat thread writes it.
    now = time.time()
    record = {"kind": "bot", "host": "test", "pid": 1, "names": [], "started": now, "at": now}
    console_store.record_put(
        PROCESSES_KEY, "bot:test:1", {**record, "gauges": console_gauges_read()}, keep_seconds=60
    )

    sample = panel().sample()

    assert sample["counters"]["docbot.updates"]["value"] - before == 2
    assert metrics.dialogs_active() >= 2
    assert numbers(sample)["dialogs"] == metrics.dialogs_active()
