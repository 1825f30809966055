"""Issue 11, item 6, over real HTTP and the fake Bot API: the chat the bot and its workers write
to is the acting Telegram user's own private chat, and a document is made only from a file that
same user sent the bot. A caller can name neither a chat nor a Telegram file id."""

from typing import Any

import httpx
import pytest

from docbot import services
from docbot.models import Document, ReceivedFile, TelegramAccount
from docbot.tasks import ingest_document
from tests.docbot.conftest import BotEnv, Dialog, outgoing
from tests.docbot.fake_telegram import FakeTelegram
from tests.factories import UserFactory, auth_header

pytestmark = pytest.mark.usefixtures("eager_tasks")

OWNER, INTRUDER, VICTIM_CHAT = 6601, 6602, 6603


@pytest.fixture
def telegram(bot_env: BotEnv) -> FakeTelegram:
    return bot_env.fake


@pytest.fixture
def service_token(transactional_db: None) -> str:
    return services.service_token_issue()


def _as(token: str, telegram_user_id: int) -> dict[str, str]:
    return {"Authorization": f"Token {token}", "X-Telegram-User-Id": str(telegram_user_id)}


def _type(http: httpx.Client, headers: dict[str, str], name: str = "Bills") -> int:
    response = http.post("/api/docbot/types/", json={"name": name}, headers=headers)
    assert response.status_code == 201, response.text
    type_id: int = response.json()["id"]
    return type_id


def _receive(http: httpx.Client, headers: dict[str, str], file_id: str, unique: str) -> int:
    body = {"file_id": file_id, "file_unique_id": unique, "size": 10}
    response = http.post("/api/docbot/received-files/", json=body, headers=headers)
    assert response.status_code == 201, response.text
    received_id: int = response.json()["id"]
    return received_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chat_id", VICTIM_CHAT),
        ("chat_id", -1004002),  # a group
        ("chat_id", OWNER),  # even the right one: the server decides
        ("file_id", "FILE-of-someone-else"),
        ("file_unique_id", "U-someone-else"),
        ("size", 1),
        ("mime_type", "text/html"),
        ("file_name", "x.pdf"),
    ],
)
def test_a_document_request_naming_a_chat_or_file_is_refused_and_nothing_is_sent(
    http: httpx.Client, telegram: FakeTelegram, service_token: str, field: str, value: Any
) -> None:
    headers = _as(service_token, OWNER)
    stored = telegram.add_file(b"%PDF mine", name="mine.pdf")
    body = {
        "type_id": _type(http, headers),
        "name": "May",
        "file": _receive(http, headers, stored.file_id, stored.file_unique_id),
        field: value,
    }
    response = http.post("/api/docbot/documents/", json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["details"]
    assert not Document.objects.exists()
    assert telegram.calls == []


def test_the_workers_notice_goes_to_the_acting_users_own_chat_only(
    http: httpx.Client, telegram: FakeTelegram, service_token: str
) -> None:
    headers = _as(service_token, OWNER)
    stored = telegram.add_file(b"%PDF notice", name="notice.pdf")
    received = _receive(http, headers, stored.file_id, stored.file_unique_id)
    body = {"type_id": _type(http, headers), "name": "May", "file": received}
    created = http.post("/api/docbot/documents/", json=body, headers=headers)
    assert created.status_code == 202, created.text
    telegram.wait_text(OWNER, "Stored \u201cMay\u201d")
    assert {c.chat_id for c in telegram.sent("sendMessage")} == {OWNER}


def test_another_users_received_file_cannot_make_a_document(
    http: httpx.Client, telegram: FakeTelegram, service_token: str
) -> None:
    stored = telegram.add_file(b"%PDF the owner's passport", name="passport.pdf")
    theirs = _receive(http, _as(service_token, OWNER), stored.file_id, stored.file_unique_id)
    intruder = _as(service_token, INTRUDER)
    body = {"type_id": _type(http, intruder), "name": "Stolen", "file": theirs}
    response = http.post("/api/docbot/documents/", json=body, headers=intruder)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "file_not_found"
    assert not Document.objects.exists()
    assert telegram.sent("getFile") == []
    assert telegram.sent("sendMessage") == []


def test_a_regular_account_can_neither_record_a_file_nor_make_a_document(
    http: httpx.Client, telegram: FakeTelegram, service_token: str
) -> None:
    stored = telegram.add_file(b"%PDF the owner's", name="owner.pdf")
    theirs = _receive(http, _as(service_token, OWNER), stored.file_id, stored.file_unique_id)
    headers = {**auth_header(UserFactory.create()), "X-Telegram-User-Id": str(OWNER)}
    recorded = http.post(
        "/api/docbot/received-files/",
        json={"file_id": stored.file_id, "file_unique_id": "U-copy"},
        headers=headers,
    )
    assert recorded.status_code == 403
    assert recorded.json()["error"]["code"] == "telegram_bot_only"
    own_type = _type(http, headers)
    made = http.post(
        "/api/docbot/documents/",
        json={"type_id": own_type, "name": "Copy", "file": theirs},
        headers=headers,
    )
    assert made.status_code == 403
    assert made.json()["error"]["code"] == "telegram_account_required"
    assert ReceivedFile.objects.count() == 1
    assert not Document.objects.exists()
    assert telegram.calls == []


def test_the_bot_records_each_file_as_received_from_its_sender(dialog: Dialog) -> None:
    dialog.say("/start", "Hi!")
    confirmation = dialog.add_document("Tickets", "Train", b"%PDF train", new_type=True)
    assert confirmation.chat_id == dialog.user_id
    account = TelegramAccount.objects.get(telegram_user_id=dialog.user_id)
    (received,) = ReceivedFile.objects.all()
    assert received.account == account
    document = Document.objects.get()
    assert document.user == account.user
    assert document.telegram_file_unique_id == received.file_unique_id
    chats = {c.chat_id for c in outgoing(dialog.env.fake) if c.chat_id is not None}
    assert chats == {dialog.user_id}


def test_a_document_of_an_account_without_telegram_is_stored_without_messaging_anyone(
    telegram: FakeTelegram,
) -> None:
    """Rows from before the fix (made by regular accounts naming any chat) notify nobody."""
    owner = UserFactory.create()
    stored = telegram.add_file(b"%PDF old row", name="old.pdf")
    document = Document.objects.create(
        user=owner,
        type=services.type_create(user=owner, name="Old"),
        name="Old",
        telegram_file_id=stored.file_id,
    )
    assert ingest_document.delay(document.pk).get() == "stored"
    assert telegram.sent("sendMessage") == []
