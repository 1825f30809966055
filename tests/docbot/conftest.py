"""docbot fixtures: the fake Bot API, settings pointing the bot at it and at the live backend,
a polling bot in its own thread, and a dialog driver for both modes."""

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from config.celery import app as celery_app
from docbot import runtime, texts
from docbot.bot.application import BotSettings, run_polling, settings_from_django
from docbot.bot.polling import PollLease
from tests.conftest import LiveServer
from tests.docbot.fake_telegram import Call, FakeTelegram

WEBHOOK_SECRET = "s3cret-hook-token"
GROUP_CHAT = {"id": -1004002, "type": "supergroup", "title": "Friends"}
CHANNEL_CHAT = {"id": -1009001, "type": "channel", "title": "News"}
# Calls the bot makes for itself, not to say anything to anyone.
BOOKKEEPING = {"getMe", "setWebhook", "deleteWebhook", "getFile", "downloadFile"}


def outgoing(fake: FakeTelegram, since: int = 0) -> list[Call]:
    """What the bot said (messages, edits, files, button answers) since `since`."""
    with fake._changed:
        return [c for c in fake.calls[since:] if c.method not in BOOKKEEPING]


@pytest.fixture
def fake_telegram() -> Iterator[FakeTelegram]:
    fake = FakeTelegram().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def eager_tasks() -> Iterator[None]:
    """Tasks run in-process even when a broker is configured (the real-worker test opts out)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = previous


@dataclass
class BotEnv:
    fake: FakeTelegram
    server: LiveServer
    media_root: Path

    def config(self, mode: str = "polling") -> BotSettings:
        return settings_from_django(service_token=runtime.service_token_sync(), mode=mode)


def point_settings_at(settings: Any, fake: FakeTelegram, server: LiveServer, media: Path) -> None:
    settings.TELEGRAM_BOT_TOKEN = fake.token
    settings.TELEGRAM_API_BASE_URL = fake.base_url
    settings.TELEGRAM_FILE_BASE_URL = fake.base_file_url
    settings.TELEGRAM_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.DOCBOT_BACKEND_URL = server.http_url
    settings.DOCBOT_PUBLIC_BASE_URL = server.http_url
    settings.DOCBOT_FLOOD_MAX_PER_SECOND = 50
    settings.DOCBOT_RATE_LIMIT_PER_SECOND = 30.0
    settings.MEDIA_ROOT = str(media)


@pytest.fixture
def bot_env(
    settings: Any, fake_telegram: FakeTelegram, asgi_server: LiveServer, tmp_path: Path
) -> Iterator[BotEnv]:
    media = tmp_path / "media"
    point_settings_at(settings, fake_telegram, asgi_server, media)
    runtime.reset_for_tests()
    try:
        yield BotEnv(fake_telegram, asgi_server, media)
    finally:
        runtime.reset_for_tests()


class PollingBot:
    """run_polling (the same coroutine runall and run_docbot use) in a thread of its own."""

    def __init__(self, config: BotSettings, *, lease: PollLease | None = None) -> None:
        self.config = config
        self.lease = lease or runtime.poll_lease(config.token)  # run_docbot's by default
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="docbot-polling", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await run_polling(self.config, self._stop, lease=self.lease, poll_timeout=1)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> "PollingBot":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "polling bot did not stop"
        if self.error is not None:
            raise self.error


@dataclass
class Dialog:
    """Drives one user's conversation in polling or webhook mode and waits for the replies."""

    env: BotEnv
    mode: str
    user_id: int = 424242

    def send(self, update: dict[str, Any]) -> None:
        if self.mode == "polling":
            self.env.fake.push(update)
        else:
            response = self.env.fake.deliver(update)
            assert response.status_code == 200, response.text

    def say(self, text: str, expect: str) -> Call:
        since = self.env.fake.mark()
        self.send(self.env.fake.text_update(self.user_id, text))
        return self.env.fake.wait_text(self.user_id, expect, since=since)

    def tap(self, data: str, expect: str, method: str | None = None) -> Call:
        """Press a button; returns the call that says `expect`, once the press is answered."""
        since = self.env.fake.mark()
        press = self.env.fake.callback_update(self.user_id, data)
        self.send(press)
        said = self.env.fake.wait_for(
            lambda c: (
                c.chat_id == self.user_id
                and expect in c.text
                and (method is None or c.method == method)
            ),
            since=since,
        )
        press_id = press["callback_query"]["id"]
        self.env.fake.wait_for(
            lambda c: (
                c.method == "answerCallbackQuery" and c.params["callback_query_id"] == press_id
            ),
            since=since,
        )
        return said

    def barrier(self) -> None:
        """Returns once the updates sent before it were handled: a /help is answered after
        them (webhook delivery is synchronous; polling hands updates over in order and the
        ones before it need no backend round trip)."""
        self.say("/help", "Add document: pick")
        if self.mode == "polling":
            time.sleep(0.3)

    def button(self, call: Call, label_fragment: str) -> str:
        for text, data in call.buttons():
            if label_fragment in text:
                return data
        raise AssertionError(f"no button {label_fragment!r} in {call.buttons()}")

    def add_document(self, type_name: str, name: str, content: bytes, *, new_type: bool) -> Call:
        """The whole add flow; returns the worker's confirmation."""
        menu = self.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
        if new_type:
            self.tap(self.button(menu, texts.ADD_NEW_TYPE_BUTTON), texts.ADD_ASK_TYPE_NAME)
            self.say(type_name, f"Type: {type_name}. Now name the document")
        else:
            self.tap(self.button(menu, type_name), "Now name the document")
        self.say(name, "Now send the file")
        stored = self.env.fake.add_file(content, name=f"{name.replace(' ', '_')}.pdf")
        since = self.env.fake.mark()
        self.send(self.env.fake.document_update(self.user_id, stored))
        return self.env.fake.wait_for(
            lambda c: (
                c.chat_id == self.user_id
                and (f"Stored \u201c{name}\u201d" in c.text or "already stored as" in c.text)
            ),
            since=since,
        )


@pytest.fixture(params=["polling", "webhook"])
def dialog(request: pytest.FixtureRequest, bot_env: BotEnv) -> Iterator[Dialog]:
    """One user's dialog with the bot, polling (run_polling in a thread) or through the
    registered webhook."""
    if request.param == "polling":
        bot = PollingBot(bot_env.config("polling")).start()
        try:
            yield Dialog(bot_env, "polling")
        finally:
            bot.stop()
    else:
        request.getfixturevalue("webhook_registered")
        yield Dialog(bot_env, "webhook")


@pytest.fixture
def webhook_registered(bot_env: BotEnv) -> BotEnv:
    """`run_docbot --set-webhook URL` registers the webhook (with the secret) at the fake."""
    call_command("run_docbot", set_webhook=f"{bot_env.server.http_url}/docbot/webhook")
    assert bot_env.fake.webhook_url.endswith("/docbot/webhook")
    assert bot_env.fake.webhook_secret == WEBHOOK_SECRET
    return bot_env
