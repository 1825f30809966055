"""Webhook delivery through the ASGI app: the secret token, dedupe of update ids, flood
control, metrics, correlation ids, and the bot being off without a token."""

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

from docbot import runtime, texts
from tests.docbot.conftest import WEBHOOK_SECRET, BotEnv
from tests.factories import StaffFactory, auth_header

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
    staff = auth_header(StaffFactory())
    body = httpx.get(
        f"{webhook_registered.server.http_url}/metrics", headers=staff, timeout=10
    ).text
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
    settings.DOCBOT_SANDBOX = (
        False  # else the bot serves the sandbox (tests/docbot/test_sandbox.py)
    )
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


def _update(
    kind: str = "message", drop: tuple[str, ...] = (), sender: Any = None, **fields: Any
) -> bytes:
    """A private /help message update with `fields` (and `from`: `sender`) replaced and `drop`
    removed."""
    message = {
        "message_id": 1,
        "date": 1_767_225_600,
        "chat": {"id": 81, "type": "private"},
        "from": {"id": 81, "is_bot": False, "first_name": "U"},
        "text": "/help",
        **fields,
    }
    if sender is not None:
        message["from"] = sender
    for key in drop:
        del message[key]
    return json.dumps({"update_id": 5, kind: message}).encode()


NOT_AN_UPDATE: list[tuple[bytes, str]] = [
    (b"[]", "update"),
    (b"{}", "update_id"),
    (b"null", "update"),
    (b"1", "update"),
    (b'"update"', "update"),
    (b"true", "update"),
    (b'{"update_id": "5"}', "update_id"),
    (b'{"update_id": -1}', "update_id"),
    (b'{"update_id": 1.5}', "update_id"),
    (b'{"update_id": true}', "update_id"),
    (b'{"update_id": 99999999999999999999999}', "update_id"),
    (b'{"update_id": 5, "message": "hi"}', "message"),
    (b'{"update_id": 5, "message": {}}', "message.message_id"),
    (_update(drop=("chat", "date")), "message.date"),
    (_update(drop=("chat",)), "message.chat"),
    (_update(chat="81"), "message.chat"),
    (_update(chat={"id": "81", "type": "private"}), "message.chat.id"),
    (_update(chat={"id": 1e3, "type": "private"}), "message.chat.id"),
    (_update(chat={"id": 2**60, "type": "private"}), "message.chat.id"),
    (_update(chat={"id": 81, "type": "pri\nvate"}), "message.chat.type"),
    (_update(date=-1), "message.date"),
    (_update(text=5), "message.text"),
    (_update(text="x" * 4097), "message.text"),
    (_update(sender={"id": 0, "is_bot": False, "first_name": "U"}), "message.from.id"),
    (
        _update(entities=[{"type": "bot_command", "offset": "0", "length": 5}]),
        "message.entities[0].offset",
    ),
    (_update(document={"file_id": "a b", "file_unique_id": "u"}), "message.document.file_id"),
    (_update("edited_message", message_id="1"), "edited_message.message_id"),
    (_update("channel_post", chat={"id": -5, "type": 7}), "channel_post.chat.type"),
    (
        b'{"update_id": 5, "callback_query": {"id": "c", "chat_instance": "1", "data": "d:1"}}',
        "callback_query.from",
    ),
    (
        b'{"update_id": 5, "callback_query": {"id": "c", "from": {"id": 81, "is_bot": false,'
        b' "first_name": "U"}, "chat_instance": "1", "data": 7}}',
        "callback_query.data",
    ),
    (
        b'{"update_id": 5, "message_reaction_count": {"chat": {"id": {}, "type": "group"},'
        b' "message_id": 1, "date": 1767225600, "reactions": []}}',
        "message_reaction_count.chat.id",
    ),
    (
        b'{"update_id": 5, "message_reaction_count": {"chat": {"id": -5, "type": ["group"]},'
        b' "message_id": 1, "date": 1767225600, "reactions": []}}',
        "message_reaction_count.chat.type",
    ),
    (b"", "body"),
    (b"{", "body"),
    (b'{"update_id": 5,}', "body"),
    (b"\xff\xfe{}", "body"),
    (b'{"update_id": NaN}', "body"),
    (b'{"update_id": 5, "message": {"text": "\\ud800"}}', "message.text"),
    (b'{"update_id": 5, "\\udc00": 1}', "body"),
    (b'{"update_id": 5, "message": {"text": "a\\u0000b"}}', "message.text"),
    (b"[" * 5000 + b"]" * 5000, "body"),
    (b'{"update_id": 5, "x": ' + b"[" * 100 + b"]" * 100 + b"}", "body"),
    (b'{"update_id": 5, "x": "' + b"a" * (1024 * 1024) + b'"}', "body"),
]


@pytest.mark.parametrize(("body", "field"), NOT_AN_UPDATE)
def test_a_body_that_is_not_clean_json_or_not_an_update_is_a_400_naming_the_field(
    webhook_registered: BotEnv, body: bytes, field: str
) -> None:
    fake = webhook_registered.fake
    response = httpx.post(
        fake.webhook_url,
        content=body,
        headers={
            "X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET,
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["details"], error
    assert [c for c in fake.calls if c.method not in {"getMe", "setWebhook"}] == []
    fake.deliver(fake.text_update(82, "/help"))
    fake.wait_text(82, "Add document: pick")


@pytest.mark.parametrize(
    "update",
    [
        {"update_id": 901, "something_new": {"id": 1}},
        {"update_id": 902},
        {
            "update_id": 903,
            "message_reaction_count": {
                "chat": {"id": -5, "type": "group"},
                "message_id": 1,
                "date": 1_767_225_600,
                "reactions": [{"type": {"type": "emoji", "emoji": "+"}, "total_count": 2}],
            },
        },
        {
            "update_id": 904,
            "inline_query": {
                "id": "i",
                "query": "",
                "offset": "",
                "from": {"id": 83, "is_bot": False, "first_name": "U"},
            },
        },
    ],
)
def test_an_update_of_a_kind_the_bot_does_not_serve_is_accepted_and_ignored(
    webhook_registered: BotEnv, update: dict[str, Any]
) -> None:
    fake = webhook_registered.fake
    response = fake.deliver(update)
    assert response.status_code == 200, response.text
    assert [c for c in fake.calls if c.method not in {"getMe", "setWebhook"}] == []
