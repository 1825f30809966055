"""End-to-end dialogs: python-telegram-bot's real HTTP stack against the fake Bot API, the
real backend on a live ASGI server, in polling and in webhook mode."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from docbot.bot import texts
from docbot.models import Document
from tests.docbot.conftest import BotEnv, Dialog, PollingBot

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]


@pytest.fixture(params=["polling", "webhook"])
def dialog(request: pytest.FixtureRequest, bot_env: BotEnv) -> Iterator[Dialog]:
    if request.param == "polling":
        bot = PollingBot(bot_env.config("polling")).start()
        try:
            yield Dialog(bot_env, "polling")
        finally:
            bot.stop()
    else:
        request.getfixturevalue("webhook_registered")
        yield Dialog(bot_env, "webhook")


def test_add_flow_creates_a_type_names_the_document_and_stores_the_file(dialog: Dialog) -> None:
    dialog.say("/start", "I keep your documents")
    content = b"%PDF-1.4 passport scan " * 100
    confirmation = dialog.add_document("Passport", "My passport", content, new_type=True)

    assert confirmation.text == texts.STORED.format(name="My passport", size=len(content))
    document = Document.objects.get(name="My passport")
    assert document.status == Document.Status.STORED
    assert document.type.name == "Passport"
    assert document.size == len(content)
    stored = Path(dialog.env.media_root) / document.storage_name
    assert stored.read_bytes() == content
    import hashlib

    assert document.sha256 == hashlib.sha256(content).hexdigest()


def test_browse_flow_lists_types_pages_documents_and_sends_the_file_back(dialog: Dialog) -> None:
    for index in range(9):
        dialog.add_document(
            "Tickets", f"Ticket {index}", f"ticket {index}".encode() * 50, new_type=index == 0
        )
    fake = dialog.env.fake
    fake.clear()

    types = dialog.say(texts.MENU_BROWSE, texts.BROWSE_PICK_TYPE)
    assert [label for label, _ in types.buttons()] == ["Tickets (9)"]
    page_one = dialog.tap(dialog.button(types, "Tickets"), "page 1", method="editMessageText")
    names = [label for label, data in page_one.buttons() if data.startswith("d:")]
    assert names == [f"Ticket {i}" for i in range(8, 0, -1)]  # newest first, 8 per page

    page_two = dialog.tap(dialog.button(page_one, "Next"), "page 2", method="editMessageText")
    assert [label for label, data in page_two.buttons() if data.startswith("d:")] == ["Ticket 0"]

    sent = dialog.tap(dialog.button(page_two, "Ticket 0"), "Ticket 0", method="sendDocument")
    document = Document.objects.get(name="Ticket 0")
    assert sent.params["document"] == document.telegram_file_id
    assert {label for label, _ in sent.buttons()} == {
        texts.BUTTON_RENAME,
        texts.BUTTON_RETYPE,
        texts.BUTTON_DELETE,
        texts.BUTTON_SHARE,
    }
    assert fake.sent("answerCallbackQuery")


def test_same_content_again_is_reported_as_already_stored(dialog: Dialog) -> None:
    content = b"insurance policy" * 64
    dialog.add_document("Insurance", "Car", content, new_type=True)
    duplicate = dialog.add_document("Insurance", "Car again", content, new_type=False)
    assert duplicate.text == texts.DUPLICATE.format(existing="Car")
    assert list(Document.objects.values_list("name", flat=True)) == ["Car"]
