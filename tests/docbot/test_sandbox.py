"""Trying the bot without Telegram (issue 13, item 12): with no TELEGRAM_BOT_TOKEN, runall's
docbot process serves the bot against the built-in Bot API sandbox, reached by
python-telegram-bot through its real HTTP stack, and a staff member chats with it at
/docbot/sandbox/ over a real socket: types, presses the bot's buttons, uploads a file."""

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from django.test import Client

from docbot import runtime, sandbox, telegram, texts
from docbot.models import Document
from tests.admin_http import AdminSession
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]

ROOT = Path(__file__).resolve().parents[2]
Message = dict[str, Any]


class EmbeddedBot:
    """`runtime.run_embedded`, the coroutine runall runs for docbot, in a thread of its own."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="docbot-embedded", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await runtime.run_embedded(self._stop)

        asyncio.run(main())

    def start(self) -> "EmbeddedBot":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the embedded bot did not stop"


@pytest.fixture
def sandbox_on(
    settings: Any, asgi_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> LiveServer:
    """No token, DOCBOT_SANDBOX on, a fresh sandbox; the bot and the links reach the server."""
    settings.TELEGRAM_BOT_TOKEN = ""
    settings.DOCBOT_SANDBOX = True
    settings.DOCBOT_BACKEND_URL = asgi_server.http_url
    settings.DOCBOT_PUBLIC_BASE_URL = asgi_server.http_url
    settings.DOCBOT_FLOOD_MAX_PER_SECOND = 50
    settings.MEDIA_ROOT = str(tmp_path / "media")
    monkeypatch.setattr(sandbox, "SANDBOX", sandbox.Sandbox())
    runtime.reset_for_tests()
    return asgi_server


@pytest.fixture
def sandbox_bot(sandbox_on: LiveServer) -> Iterator[LiveServer]:
    bot = EmbeddedBot().start()
    try:
        deadline = time.monotonic() + 10
        while not runtime.sandbox_served_here() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runtime.sandbox_served_here()
        yield sandbox_on
    finally:
        bot.stop()
        runtime.reset_for_tests()


@dataclass
class Operator:
    """A staff member's browser on the chat page: logged in through /admin/ (CSRF cookie and
    token), posting the page's forms and reading the chat back as JSON."""

    session: AdminSession

    @property
    def http(self) -> httpx.Client:
        return self.session.http

    def _post(self, path: str, data: dict[str, str], **kwargs: Any) -> httpx.Response:
        response = self.http.post(
            path,
            data={**data, "csrfmiddlewaretoken": self.http.cookies["csrftoken"]},
            headers={"Accept": "application/json", "Referer": f"{self.http.base_url}{path}"},
            **kwargs,
        )
        assert response.status_code == 200, response.text
        return response

    def messages(self) -> list[Message]:
        response = self.http.get("/docbot/sandbox/messages")
        assert response.status_code == 200, response.text
        messages: list[Message] = response.json()["messages"]
        return messages

    def wait(self, predicate: Callable[[Message], bool], since: int) -> Message:
        """The first message of the bot's, newer than message `since` or edited, matching."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for message in self.messages():
                fresh = message["message_id"] > since or "edit_date" in message
                if message["outgoing"] and fresh and predicate(message):
                    return message
            time.sleep(0.1)
        said = [(m["message_id"], m.get("text") or m.get("caption")) for m in self.messages()]
        raise AssertionError(f"the bot never said it; the chat: {said[-8:]}")

    def last_id(self) -> int:
        return max((m["message_id"] for m in self.messages()), default=0)

    def say(self, text: str, expect: str) -> Message:
        since = self.last_id()
        self._post("/docbot/sandbox/send", {"text": text})
        return self.wait(lambda m: expect in (m.get("text") or m.get("caption") or ""), since)

    def press(self, message: Message, label: str, expect: Callable[[Message], bool]) -> Message:
        rows = message["reply_markup"]["inline_keyboard"]
        data = next(b["callback_data"] for row in rows for b in row if label in b["text"])
        since = self.last_id()
        self._post(
            "/docbot/sandbox/press", {"message_id": str(message["message_id"]), "data": data}
        )
        return self.wait(expect, since)

    def upload(self, name: str, content: bytes, expect: str) -> Message:
        since = self.last_id()
        self._post(
            "/docbot/sandbox/upload",
            {},
            files={"file": (name, content, "application/pdf")},
        )
        return self.wait(lambda m: expect in (m.get("text") or ""), since)


def _text(expected: str) -> Callable[[Message], bool]:
    return lambda m: expected in (m.get("text") or m.get("caption") or "")


def test_the_sandbox_dialogue_end_to_end_over_a_real_socket(sandbox_bot: LiveServer) -> None:
    staff = StaffFactory.create()
    operator = Operator(AdminSession(sandbox_bot.http_url, staff.username))
    page = operator.http.get("/docbot/sandbox/")
    assert page.status_code == 200
    assert "Docbot sandbox" in page.text and 'name="text"' in page.text

    operator.say("/start", texts.WELCOME)
    assert operator.http.get("/docbot/sandbox/messages").json()["keyboard"] == [
        [texts.MENU_ADD, texts.MENU_BROWSE]
    ]
    operator.say("/help", texts.HELP)

    menu = operator.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    operator.press(menu, texts.ADD_NEW_TYPE_BUTTON, _text(texts.ADD_ASK_TYPE_NAME))
    operator.say("Passport", "Type: Passport. Now name the document")
    operator.say("My passport", "Now send the file")
    content = b"%PDF-1.4 sandbox scan " * 200
    operator.upload("passport scan.pdf", content, "Stored \u201cMy passport\u201d")
    document = Document.objects.get(name="My passport")
    assert document.status == Document.Status.STORED
    assert document.file_name == "passport scan.pdf"

    types = operator.say(texts.MENU_BROWSE, texts.BROWSE_PICK_TYPE)
    page_one = operator.press(types, "Passport (1)", _text("Passport: page 1"))
    sent = operator.press(page_one, "My passport", lambda m: "document" in m)
    assert sent["caption"] == "My passport (Passport)"
    file_id = sent["document"]["file_id"]
    assert operator.http.get(f"/docbot/sandbox/files/{file_id}").content == content

    link = operator.press(sent, texts.BUTTON_SHARE, _text("valid until"))
    assert re.search(
        r"\(passport scan\.pdf\), valid until \d{4}-\d\d-\d\d \d\d:\d\d UTC, in 24 hours:",
        link["text"],
    ), link["text"]
    url = link["text"].rsplit("\n", 1)[1]
    assert unquote(url).endswith("/passport scan.pdf")
    download = httpx.get(url, timeout=10)
    assert download.content == content
    assert download.headers["content-disposition"] == 'attachment; filename="passport scan.pdf"'
    # The chat page renders the same chat (server-side; the script only refreshes it).
    assert "Link to" in operator.http.get("/docbot/sandbox/").text


def test_the_page_and_its_endpoints_are_for_staff_only(sandbox_bot: LiveServer) -> None:
    anonymous = httpx.Client(base_url=sandbox_bot.http_url, timeout=10)
    page = anonymous.get("/docbot/sandbox/")
    assert page.status_code == 302
    assert page.headers["location"].startswith("/admin/login/")
    assert anonymous.get("/docbot/sandbox/messages").status_code == 403
    assert anonymous.post("/docbot/sandbox/send", data={"text": "hi"}).status_code == 403

    client = Client()
    client.force_login(UserFactory.create())
    member = httpx.Client(
        base_url=sandbox_bot.http_url,
        cookies={"sessionid": client.cookies["sessionid"].value},
        timeout=10,
    )
    assert member.get("/docbot/sandbox/").status_code == 302
    assert member.get("/docbot/sandbox/messages").status_code == 403


def test_the_bot_api_stand_in_wants_the_installations_token(sandbox_bot: LiveServer) -> None:
    base = f"{sandbox_bot.http_url}/docbot/sandbox/bot"
    me = httpx.post(f"{base}{telegram.sandbox_token()}/getMe", timeout=10).json()
    assert me == {"ok": True, "result": sandbox.BOT_USER}
    forged = httpx.post(f"{base}{telegram.SANDBOX_BOT_ID}:guess/getMe", timeout=10)
    assert forged.status_code == 401
    assert forged.json()["ok"] is False
    unknown = httpx.post(f"{base}{telegram.sandbox_token()}/sendInvoice", timeout=10)
    assert unknown.status_code == 404


def test_a_real_token_turns_the_sandbox_off(sandbox_bot: LiveServer, settings: Any) -> None:
    settings.TELEGRAM_BOT_TOKEN = "123456:REAL-token"
    staff = StaffFactory.create()
    operator = AdminSession(sandbox_bot.http_url, staff.username)
    assert operator.get("/docbot/sandbox/").status_code == 404
    assert operator.get("/docbot/sandbox/messages").status_code == 404
    token = telegram.sandbox_token()
    assert httpx.post(f"{sandbox_bot.http_url}/docbot/sandbox/bot{token}/getMe").status_code == 404


def test_a_process_that_does_not_run_the_sandbox_bot_says_where_it_is(
    sandbox_on: LiveServer,
) -> None:
    staff = StaffFactory.create()
    operator = AdminSession(sandbox_on.http_url, staff.username)
    page = operator.get("/docbot/sandbox/")
    assert page.status_code == 404
    assert "make run" in page.text
    assert operator.get("/docbot/sandbox/messages").status_code == 503
    token = telegram.sandbox_token()
    assert httpx.post(f"{sandbox_on.http_url}/docbot/sandbox/bot{token}/getMe").status_code == 404


def test_the_runall_banner_says_where_the_sandbox_is(settings: Any) -> None:
    settings.TELEGRAM_BOT_TOKEN = ""
    settings.DOCBOT_SANDBOX = True
    settings.DOCBOT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"
    assert "sandbox chat http://127.0.0.1:8000/docbot/sandbox/" in runtime.describe()
    settings.DOCBOT_SANDBOX = False
    assert "off" in runtime.describe()


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"DJANGO_DEBUG": "true"}, "True"),
        ({"DJANGO_DEBUG": "false"}, "False"),
        ({"DJANGO_DEBUG": "false", "DOCBOT_SANDBOX": "true"}, "True"),
        ({"DJANGO_DEBUG": "true", "DOCBOT_SANDBOX": "false"}, "False"),
    ],
)
def test_the_sandbox_is_off_in_production_settings_unless_asked_for(
    environment: dict[str, str], expected: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_SECRET_KEY": "a-long-secret-key-for-this-test-only-0123456789-abcdefghijkl",
        **environment,
    }
    probe = "import django; django.setup(); from django.conf import settings; "
    probe += "print(settings.DOCBOT_SANDBOX)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
