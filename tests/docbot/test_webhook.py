"""Webhook delivery through the ASGI app: the secret token, dedupe of update ids, flood
control, metrics, correlation ids, and the bot being off without a token."""

import asyncio
import logging
from typing import Any

import httpx
import pytest

from docbot import runtime
from docbot.bot import texts
from tests.docbot.conftest import WEBHOOK_SECRET, BotEnv

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("eager_tasks")]


@pytest.mark.parametrize("secret", [None, "", "wrong-secret", WEBHOOK_SECRET + "x"])
def test_webhook_without_the_right_secret_token_is_forbidden(
    webhook_registered: BotEnv, secret: str | None
) -> None:
    fake = webhook_registered.fake
    update = fake.text_update(1, "/help")
    headers = {} if secret is None else {"X-Telegram-Bot-Api-Secret-Token": secret}
    response = httpx.post(fake.webhook_url, json=update, headers=headers, timeout=10)
    assert response.status_code == 403
    assert fake.sent("sendMessage") == []


def test_a_repeated_update_id_is_processed_once(webhook_registered: BotEnv) -> None:
    fake = webhook_registered.fake
    update = fake.text_update(31, "/help")
    for _ in range(3):
        assert fake.deliver(update).status_code == 200
    fake.wait_text(31, "Add document: pick")
    assert len([c for c in fake.sent("sendMessage", 31) if c.text == texts.HELP]) == 1


def test_flood_control_answers_once_and_drops_the_rest(
    webhook_registered: BotEnv, settings: Any
) -> None:
    settings.DOCBOT_FLOOD_MAX_PER_SECOND = 3
    fake = webhook_registered.fake
    for _ in range(12):
        assert fake.deliver(fake.text_update(41, "/help")).status_code == 200
    replies = fake.sent("sendMessage", 41)
    slow_downs = [c for c in replies if c.text == texts.SLOW_DOWN]
    helps = [c for c in replies if c.text == texts.HELP]
    assert len(slow_downs) == 1
    assert 3 <= len(helps) < 12
    assert len(replies) == len(helps) + 1


def test_updates_metrics_and_integration_histogram_are_exported(
    webhook_registered: BotEnv,
) -> None:
    fake = webhook_registered.fake
    fake.deliver(fake.text_update(51, texts.MENU_BROWSE))
    fake.wait_text(51, texts.BROWSE_EMPTY)
    body = httpx.get(f"{webhook_registered.server.http_url}/metrics", timeout=10).text
    assert 'docbot_updates_total{mode="webhook",outcome="accepted"}' in body
    assert (
        'quintet_integration_call_seconds_count{operation="types_list",outcome="ok",target="docbot_backend"}'
        in body
    )
    assert "docbot_queue_messages_sent_total" in body
    assert "docbot_queue_messages_consumed_total" in body


def test_one_correlation_id_per_update_reaches_backend_and_task_logs(
    webhook_registered: BotEnv, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.docbot.conftest import Dialog

    caplog.set_level(logging.INFO)
    dialog = Dialog(webhook_registered, "webhook", user_id=61)
    fake = webhook_registered.fake
    dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    dialog.tap("an", texts.ADD_ASK_TYPE_NAME)
    dialog.say("Visa", "Now name the document")
    dialog.say("Schengen", "Now send the file")
    stored = fake.add_file(b"visa" * 100)
    update = fake.document_update(61, stored)
    since = fake.mark()
    fake.deliver(update)
    fake.wait_text(61, "Stored", since=since)
    correlation = f"tg-{update['update_id']}"

    def events(request_id: str) -> set[str]:
        found = set()
        for record in caplog.records:
            payload = record.msg if isinstance(record.msg, dict) else {}
            if payload.get("request_id") == request_id:
                found.add(str(payload.get("event")))
        return found

    seen = events(correlation)
    assert "docbot_update" in seen  # the bot, in the web process
    assert {"docbot_document_stored", "docbot_ingest_done"} <= seen  # backend and task


async def test_without_a_token_the_bot_is_off_and_says_so_once(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.TELEGRAM_BOT_TOKEN = ""
    runtime._off_said = False
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    stop.set()
    await runtime.run_embedded(stop)
    await runtime.run_embedded(stop)
    offs = [r for r in caplog.records if isinstance(r.msg, dict) and r.msg["event"] == "docbot_off"]
    assert len(offs) == 1
    assert "off" in runtime.describe()


def test_webhook_without_a_token_answers_not_found(http: httpx.Client, settings: Any) -> None:
    settings.TELEGRAM_BOT_TOKEN = ""
    response = http.post("/docbot/webhook", json={"update_id": 1})
    assert response.status_code == 404


def test_concurrent_first_deliveries_all_wait_for_one_initialized_bot(
    webhook_registered: BotEnv,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake = webhook_registered.fake
    updates = [fake.text_update(700 + i, "/help") for i in range(8)]
    since = fake.mark()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda u: fake.deliver(u).status_code, updates))
    assert statuses == [200] * 8
    assert len([c for c in fake.sent("sendMessage") if c.text == texts.HELP]) == 8
    assert [c.method for c in fake.calls[since:]].count("getMe") == 1
