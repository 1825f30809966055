"""End-to-end dialogs: python-telegram-bot's real HTTP stack against the fake Bot API, the
real backend on a live ASGI server, in polling and in webhook mode."""

from pathlib import Path

import httpx
import pytest

from docbot import texts
from docbot.models import Document
from tests.docbot.conftest import BotEnv, Dialog

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]


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


def test_photo_document_actions_share_rename_retype_and_delete(
    webhook_registered: BotEnv,
) -> None:
    dialog = Dialog(webhook_registered, "webhook", user_id=5150)
    fake = webhook_registered.fake
    dialog.add_document("Other", "Spare", b"spare" * 10, new_type=True)
    menu = dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    dialog.tap(dialog.button(menu, texts.ADD_NEW_TYPE_BUTTON), texts.ADD_ASK_TYPE_NAME)
    dialog.say("Photos", "Now name the document")
    dialog.say("Selfie", "Now send the file")
    photo = fake.add_file(b"\xff\xd8jpeg" * 500, name="selfie.jpg")
    since = fake.mark()
    dialog.send(fake.photo_update(5150, photo))
    fake.wait_text(5150, "Stored \u201cSelfie\u201d", since=since)
    document = Document.objects.get(name="Selfie")
    assert document.telegram_file_id == photo.file_id  # the largest size, not the thumbnail

    sent = dialog.tap(f"d:{document.pk}", "Selfie", method="sendPhoto")
    assert sent.params["photo"] == photo.file_id

    link_message = dialog.tap(dialog.button(sent, texts.BUTTON_SHARE), "valid until")
    url = link_message.text.rsplit("\n", 1)[1]
    assert httpx.get(url, timeout=10).content == photo.content

    dialog.tap(dialog.button(sent, texts.BUTTON_RENAME), "New name for")
    dialog.say("Passport photo", "Renamed to")
    retype = dialog.tap(dialog.button(sent, texts.BUTTON_RETYPE), "to which type")
    dialog.tap(dialog.button(retype, "Other"), "Moved \u201cPassport photo\u201d to Other")
    document.refresh_from_db()
    assert (document.name, document.type.name) == ("Passport photo", "Other")

    confirm = dialog.tap(dialog.button(sent, texts.BUTTON_DELETE), "for good?")
    dialog.tap(dialog.button(confirm, texts.BUTTON_YES), "Deleted")
    assert not Document.objects.filter(pk=document.pk).exists()
    assert not (webhook_registered.media_root / document.storage_name).exists()


def test_search_finds_documents_by_name(webhook_registered: BotEnv) -> None:
    dialog = Dialog(webhook_registered, "webhook", user_id=5151)
    dialog.add_document("Insurance", "Health policy", b"h" * 99, new_type=True)
    dialog.add_document("Insurance", "Car policy", b"c" * 99, new_type=False)
    dialog.say("/search", texts.SEARCH_ASK)
    found = dialog.say("HEALTH", "Found 1")
    assert [label for label, _ in found.buttons()] == ["Health policy (Insurance)"]
    dialog.say("/search nothing-like-this", "Nothing matches")


async def test_runall_process_polls_when_a_token_is_set(bot_env: BotEnv) -> None:
    import asyncio

    from common.processes import embedded_processes
    from docbot import runtime

    assert "docbot" in [process.name for process in embedded_processes()]
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_embedded(stop))
    for _ in range(200):
        if bot_env.fake.sent("getMe") and bot_env.fake.sent("deleteWebhook"):
            break
        await asyncio.sleep(0.05)
    assert bot_env.fake.sent("getMe")
    stop.set()
    await asyncio.wait_for(task, 20)
