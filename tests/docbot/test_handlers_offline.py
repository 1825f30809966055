"""A middle dialog step, offline: python-telegram-bot's request layer is replaced by a recorder
and the backend client by an in-memory transport (no sockets at all)."""

import json
from typing import Any

import httpx
import pytest
from telegram.request import BaseRequest, RequestData

from docbot import texts
from docbot.bot.application import BotSettings, build_application, process_webhook_body
from docbot.bot.state import DialogStore

BOT = {"id": 1, "is_bot": True, "first_name": "Docbot", "username": "docbot_bot"}


class RecordingRequest(BaseRequest):
    """Answers every Bot API call locally and remembers what the bot sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    @property
    def read_timeout(self) -> float | None:
        return 1.0

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        name = url.rsplit("/", 1)[1]
        params = request_data.json_parameters if request_data else {}
        self.calls.append((name, params))
        if name == "getMe":
            result: Any = BOT
        else:
            result = {
                "message_id": len(self.calls),
                "date": 0,
                "chat": {"id": int(params.get("chat_id", 0)), "type": "private"},
                "text": params.get("text", ""),
            }
        return 200, json.dumps({"ok": True, "result": result}).encode()


class FakeBackend:
    """The backend API's answers for the name check, recording the queries made."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        name = request.url.params.get("name", "")
        results = [{"id": 9, "name": name}] if name in self.taken else []
        return httpx.Response(200, json={"next": None, "previous": None, "results": results})


def text_update(update_id: int, user_id: int, text: str) -> bytes:
    return json.dumps(
        {
            "update_id": update_id,
            "message": {
                "message_id": update_id,
                "date": 0,
                "chat": {"id": user_id, "type": "private"},
                "from": {"id": user_id, "is_bot": False, "first_name": "U"},
                "text": text,
            },
        }
    ).encode()


@pytest.fixture
async def bot() -> Any:
    request = RecordingRequest()
    backend = FakeBackend(taken={"Old passport"})
    config = BotSettings(
        token="1:offline",
        base_url="http://offline.invalid/bot",
        base_file_url="http://offline.invalid/file/bot",
        backend_url="http://backend.invalid",
        service_token="svc",
        mode="webhook",
        rate_limit_per_second=0,
    )
    application = build_application(
        config,
        request=request,
        backend_transport=httpx.MockTransport(backend),
        store=DialogStore(ttl_seconds=60),
    )
    await application.initialize()
    yield application, request, backend
    await application.shutdown()


AT_NAME_STEP = {"step": "add_doc_name", "type_id": 5, "type_name": "Passport"}


async def test_document_name_step_checks_the_name_and_asks_for_the_file(bot: Any) -> None:
    application, request, backend = bot
    store: DialogStore = application.bot_data["store"]
    await store.set(77, AT_NAME_STEP)

    await process_webhook_body(application, text_update(1, 77, "  My   passport "))

    assert request.calls[-1] == (
        "sendMessage",
        {"chat_id": "77", "text": texts.ADD_ASK_FILE.format(name="My passport")},
    )
    assert await store.get(77) == {**AT_NAME_STEP, "step": "add_file", "name": "My passport"}
    (query,) = backend.requests
    assert query.url.params["type"] == "5" and query.url.params["name"] == "My passport"
    assert query.headers["X-Telegram-User-Id"] == "77"
    assert query.headers["X-Request-ID"] == "tg-1"


async def test_document_name_step_reasks_when_the_name_is_taken(bot: Any) -> None:
    application, request, _ = bot
    store: DialogStore = application.bot_data["store"]
    await store.set(78, AT_NAME_STEP)

    await process_webhook_body(application, text_update(2, 78, "Old passport"))

    assert request.calls[-1][1]["text"] == texts.NAME_TAKEN.format(
        name="Old passport", type="Passport"
    )
    assert await store.get(78) == AT_NAME_STEP


async def test_document_name_step_rejects_a_too_long_name_without_asking_the_backend(
    bot: Any,
) -> None:
    application, request, backend = bot
    store: DialogStore = application.bot_data["store"]
    await store.set(79, AT_NAME_STEP)

    await process_webhook_body(application, text_update(3, 79, "x" * 129))

    assert request.calls[-1][1]["text"] == texts.NAME_TOO_LONG.format(limit=128)
    assert backend.requests == []
    assert await store.get(79) == AT_NAME_STEP
