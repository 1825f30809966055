"""The Telegram update policy (input-policy.md) end to end, in polling and in webhook mode:
private chats only, channel posts ignored, a group told once and given nothing from the vault,
edits never advancing a dialog, unsupported message kinds re-prompted (issue 10, item 7)."""

from typing import Any

import pytest

from docbot import texts
from docbot.models import DocumentType, TelegramAccount
from tests.docbot.conftest import Dialog, outgoing
from tests.docbot.factories import stored_document, telegram_user

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]

GROUPS: dict[str, dict[str, Any]] = {
    "group": {"id": -4001, "type": "group", "title": "Family"},
    "supergroup": {"id": -1004002, "type": "supergroup", "title": "Friends"},
}
CHANNEL: dict[str, Any] = {"id": -1009001, "type": "channel", "title": "News"}
UNSUPPORTED: dict[str, dict[str, Any]] = {
    "voice": {"voice": {"file_id": "VOICE1", "file_unique_id": "v1", "duration": 3}},
    "sticker": {
        "sticker": {
            "file_id": "STICKER1",
            "file_unique_id": "s1",
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
        }
    },
    "video_note": {
        "video_note": {"file_id": "VN1", "file_unique_id": "vn1", "length": 240, "duration": 2}
    },
    "location": {"location": {"latitude": 52.52, "longitude": 13.405}},
    "contact": {"contact": {"phone_number": "+10000000", "first_name": "Ann"}},
    "dice": {"dice": {"emoji": "\U0001f3b2", "value": 3}},
    "unknown command": {
        "text": "/frobnicate",
        "entities": [{"type": "bot_command", "offset": 0, "length": 11}],
    },
}


def _at_step(dialog: Dialog, step: str) -> str:
    """Walk the dialog to `step`; returns the step's own hint."""
    if step == "none":
        return texts.UNKNOWN_INPUT
    if step == "search":
        dialog.say("/search", texts.SEARCH_ASK)
        return texts.SEARCH_ASK
    menu = dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    if step == "add_pick_type":
        return texts.ADD_PICK_TYPE_HINT
    dialog.tap(dialog.button(menu, texts.ADD_NEW_TYPE_BUTTON), texts.ADD_ASK_TYPE_NAME)
    if step == "add_type_name":
        return texts.ADD_ASK_TYPE_NAME
    dialog.say("Visa", "Type: Visa. Now name the document")
    if step == "add_doc_name":
        return texts.ADD_ASK_DOC_NAME.format(type="Visa")
    dialog.say("Schengen", "Now send the file")
    return texts.ADD_FILE_EXPECTED


def _texts_since(dialog: Dialog, since: int) -> list[tuple[str, int | None, str]]:
    return [(c.method, c.chat_id, c.text) for c in outgoing(dialog.env.fake, since)]


@pytest.mark.parametrize("kind", ["channel_post", "edited_channel_post"])
def test_channel_posts_and_their_edits_are_ignored_silently(dialog: Dialog, kind: str) -> None:
    fake = dialog.env.fake
    since = fake.mark()
    for text in ["/start", "/help", texts.MENU_BROWSE, "hello"]:
        dialog.send(fake.text_update(dialog.user_id, text, chat=CHANNEL, kind=kind))
    dialog.barrier()
    assert _texts_since(dialog, since) == [("sendMessage", dialog.user_id, texts.HELP)]
    assert not TelegramAccount.objects.filter(telegram_user_id__lte=0).exists()


@pytest.mark.parametrize("group", list(GROUPS))
def test_a_group_is_told_once_to_use_a_private_chat_and_gets_nothing_from_the_vault(
    dialog: Dialog, group: str
) -> None:
    fake, chat = dialog.env.fake, GROUPS[group]
    document = stored_document(telegram_user(dialog.user_id), name="Passport scan")
    since = fake.mark()
    for text in ["/start", texts.MENU_BROWSE, texts.MENU_ADD, "/search Passport", "Passport"]:
        dialog.send(fake.text_update(dialog.user_id, text, chat=chat))
    dialog.send(fake.message_update(dialog.user_id, chat=chat, **UNSUPPORTED["voice"]))
    presses = [
        fake.callback_update(dialog.user_id, data, chat=chat)
        for data in (f"d:{document.pk}", f"bt:{document.type_id}", f"s:{document.pk}", "an")
    ]
    for press in presses:
        dialog.send(press)
    fake.wait_text(chat["id"], texts.PRIVATE_ONLY, since=since)
    dialog.barrier()

    said = _texts_since(dialog, since)
    to_group = [entry for entry in said if entry[1] == chat["id"]]
    assert to_group == [("sendMessage", chat["id"], texts.PRIVATE_ONLY)]
    assert not [entry for entry in said if entry[0] in {"sendDocument", "sendPhoto"}]
    assert [entry for entry in said if entry[0] == "sendMessage" and entry[1] != chat["id"]] == [
        ("sendMessage", dialog.user_id, texts.HELP)
    ]
    for press in presses:
        answers = fake.answers(press["callback_query"]["id"])
        assert [a.params.get("text") for a in answers] == [texts.STALE_BUTTON]


def test_a_private_chat_whose_sender_is_someone_else_is_ignored(dialog: Dialog) -> None:
    fake = dialog.env.fake
    stored_document(telegram_user(dialog.user_id))
    forged = fake.text_update(777001, texts.MENU_BROWSE)
    forged["message"]["chat"] = {"id": dialog.user_id, "type": "private"}
    since = fake.mark()
    dialog.send(forged)
    dialog.barrier()
    assert _texts_since(dialog, since) == [("sendMessage", dialog.user_id, texts.HELP)]


@pytest.mark.parametrize("text", ["Visa", "/start", "/cancel", texts.MENU_BROWSE])
def test_edited_messages_never_advance_a_dialog(dialog: Dialog, text: str) -> None:
    fake = dialog.env.fake
    _at_step(dialog, "add_type_name")
    since = fake.mark()
    dialog.send(fake.text_update(dialog.user_id, text, kind="edited_message"))
    dialog.barrier()
    assert _texts_since(dialog, since) == [("sendMessage", dialog.user_id, texts.HELP)]
    assert not DocumentType.objects.exists()
    dialog.say("Visa", "Type: Visa. Now name the document")


@pytest.mark.parametrize(
    "step", ["none", "add_pick_type", "add_type_name", "add_doc_name", "add_file", "search"]
)
def test_unsupported_message_kinds_get_the_steps_hint_again(dialog: Dialog, step: str) -> None:
    fake = dialog.env.fake
    hint = _at_step(dialog, step)
    for kind, content in UNSUPPORTED.items():
        since = fake.mark()
        dialog.send(fake.message_update(dialog.user_id, **content))
        reply = fake.wait_for(lambda c: c.chat_id == dialog.user_id, since=since)
        assert (reply.method, reply.text) == ("sendMessage", hint), kind
    if step == "add_file":  # the step did not move: the file is still expected
        stored = fake.add_file(b"%PDF visa" * 20, name="visa.pdf")
        since = fake.mark()
        dialog.send(fake.document_update(dialog.user_id, stored))
        fake.wait_text(dialog.user_id, "Stored \u201cSchengen\u201d", since=since)


def test_a_file_at_a_step_that_expects_text_gets_the_steps_hint(dialog: Dialog) -> None:
    fake = dialog.env.fake
    hint = _at_step(dialog, "add_doc_name")
    stored = fake.add_file(b"early" * 20, name="early.pdf")
    since = fake.mark()
    dialog.send(fake.document_update(dialog.user_id, stored))
    assert fake.wait_for(lambda c: c.chat_id == dialog.user_id, since=since).text == hint
    dialog.say("Schengen", "Now send the file")


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("bad\x01name", texts.NAME_INVALID),
        ("tab\x0bvertical", texts.NAME_INVALID),
        ("esc\x1b[31m", texts.NAME_INVALID),
        ("   \n  ", texts.NAME_EMPTY),
        ("x" * 65, texts.NAME_TOO_LONG.format(limit=64)),
    ],
)
def test_a_typed_name_with_control_characters_is_refused_in_words(
    webhook_registered: Any, name: str, reply: str
) -> None:
    dialog = Dialog(webhook_registered, "webhook", user_id=4242)
    _at_step(dialog, "add_type_name")
    dialog.say(name, reply)
    assert not DocumentType.objects.exists()
    dialog.say("Multi\nline   name", "Type: Multi line name.")


@pytest.mark.parametrize(
    "file_name", ["evil\r\nname.pdf", "nul\x00.pdf", "bell\x07.pdf", "x" * 256 + ".pdf"]
)
def test_a_file_whose_name_is_not_clean_text_is_refused_in_words(
    webhook_registered: Any, file_name: str
) -> None:
    dialog = Dialog(webhook_registered, "webhook", user_id=4243)
    fake = webhook_registered.fake
    _at_step(dialog, "add_file")
    stored = fake.add_file(b"%PDF" * 30, name="ok.pdf")
    update = fake.document_update(dialog.user_id, stored)
    update["message"]["document"]["file_name"] = file_name
    since = fake.mark()
    response = fake.deliver(update)
    if "\x00" in file_name:  # NUL is never clean JSON text: the update itself is refused
        assert response.status_code == 400
        assert response.json()["error"]["details"] == {
            "message.document.file_name": ["contains NUL"]
        }
        return
    assert response.status_code == 200
    assert fake.wait_text(dialog.user_id, "", since=since).text == texts.FILE_NAME_INVALID
    since = fake.mark()
    dialog.send(fake.document_update(dialog.user_id, stored))
    fake.wait_text(dialog.user_id, "Stored \u201cSchengen\u201d", since=since)
