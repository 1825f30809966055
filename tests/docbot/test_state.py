"""Dialog state lives in the shared store: a conversation continues across a bot restart and
across two Application instances (two web workers) serving the same user's updates. With
REDIS_URL set (CI) the store is Redis; on the embedded default it is process memory."""

import json
from typing import Any

import pytest

from docbot import texts
from docbot.bot.application import (
    BotSettings,
    application_close,
    build_application,
    process_webhook_body,
)
from docbot.models import Document
from tests.docbot.conftest import BotEnv
from tests.docbot.fake_telegram import FakeTelegram

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("eager_tasks")]


@pytest.fixture
def webhook_config(bot_env: BotEnv) -> BotSettings:
    return bot_env.config("webhook")


async def feed(application: Any, update: dict[str, Any]) -> None:
    await process_webhook_body(application, json.dumps(update).encode())


def last_text(fake: FakeTelegram, user_id: int) -> str:
    return fake.sent(chat_id=user_id)[-1].text


async def test_two_workers_and_a_restart_share_one_users_dialog(
    bot_env: BotEnv, webhook_config: BotSettings
) -> None:
    fake, user = bot_env.fake, 90210
    worker_a = build_application(webhook_config)
    worker_b = build_application(webhook_config)
    await worker_a.initialize()
    await worker_b.initialize()

    await feed(worker_a, fake.text_update(user, texts.MENU_ADD))
    assert last_text(fake, user) == texts.ADD_PICK_TYPE
    await feed(worker_b, fake.callback_update(user, "an"))
    assert last_text(fake, user) == texts.ADD_ASK_TYPE_NAME
    await feed(worker_a, fake.text_update(user, "Diplomas"))
    assert last_text(fake, user) == texts.ADD_ASK_DOC_NAME.format(type="Diplomas")

    await application_close(worker_a)
    await application_close(worker_b)
    restarted = build_application(webhook_config)
    await restarted.initialize()
    try:
        await feed(restarted, fake.text_update(user, "Master"))
        assert last_text(fake, user) == texts.ADD_ASK_FILE.format(name="Master")
        stored = fake.add_file(b"diploma" * 30)
        await feed(restarted, fake.document_update(user, stored))
    finally:
        await application_close(restarted)

    fake.wait_text(user, "Stored \u201cMaster\u201d")
    document = await Document.objects.select_related("type").aget(name="Master")
    assert document.type.name == "Diplomas"


async def test_cancel_works_at_every_step(bot_env: BotEnv, webhook_config: BotSettings) -> None:
    fake, user = bot_env.fake, 90211
    application = build_application(webhook_config)
    await application.initialize()
    try:
        await feed(application, fake.text_update(user, texts.MENU_ADD))
        await feed(application, fake.callback_update(user, "an"))
        await feed(application, fake.text_update(user, "/cancel"))
        assert last_text(fake, user) == texts.CANCELLED
        await feed(application, fake.text_update(user, "Diplomas"))
        assert last_text(fake, user) == texts.UNKNOWN_INPUT
    finally:
        await application_close(application)
