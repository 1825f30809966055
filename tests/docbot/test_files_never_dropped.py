"""A message carrying a file is never dropped (issue 13, item 12): flood control counts it but
lets it through, and one user's updates are handled in the order they came, so a file sent
right after its name (9 ms later, in one getUpdates batch) is stored, not answered with the
previous step's hint."""

import asyncio
import time
from typing import Any

import pytest
from telegram import Update

from docbot import services, texts
from docbot.bot.handlers import carries_file
from docbot.bot.state import DialogStore
from docbot.models import Document
from tests.docbot.conftest import Dialog
from tests.docbot.factories import telegram_user

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]


@pytest.fixture
def strict_flood(bot_env: Any, settings: Any) -> None:
    """Two updates a second per user (read when the bot is built, after this fixture)."""
    settings.DOCBOT_FLOOD_MAX_PER_SECOND = 2


def _at_step(user_id: int, state: dict[str, Any]) -> None:
    """Put the user at a dialog step directly (driving the dialog there would itself trip a
    strict flood limit)."""
    asyncio.run(DialogStore(ttl_seconds=600).set(user_id, state))


def _at_file_step(user_id: int, name: str) -> None:
    doc_type = services.type_create(user=telegram_user(user_id), name="Receipts")
    _at_step(
        user_id,
        {"step": "add_file", "type_id": doc_type.pk, "type_name": "Receipts", "name": name},
    )


def _next_second() -> None:
    """Start at the top of a second, so the burst falls in one flood window."""
    time.sleep(1 - time.time() % 1 + 0.02)


def test_a_file_in_a_burst_past_the_flood_limit_is_stored(
    strict_flood: None, dialog: Dialog
) -> None:
    user_id = 8800 if dialog.mode == "polling" else 8801
    fake = dialog.env.fake
    _at_file_step(user_id, "Lunch")
    stored = fake.add_file(b"receipt " * 300, name="lunch.pdf")
    since = fake.mark()
    _next_second()
    for _ in range(4):
        dialog.send(fake.text_update(user_id, "/help"))
    dialog.send(fake.document_update(user_id, stored))
    fake.wait_text(user_id, "Stored \u201cLunch\u201d", since=since)
    said = [c.text for c in fake.sent("sendMessage", user_id)[-8:]]
    assert texts.SLOW_DOWN in said  # the flood limit was hit, and the file still went through
    assert Document.objects.get(name="Lunch").status == Document.Status.STORED


def test_a_file_sent_right_after_its_name_is_stored(dialog: Dialog) -> None:
    user_id = 8810 if dialog.mode == "polling" else 8811
    fake = dialog.env.fake
    doc_type = services.type_create(user=telegram_user(user_id), name="Tickets")
    _at_step(user_id, {"step": "add_doc_name", "type_id": doc_type.pk, "type_name": "Tickets"})
    stored = fake.add_file(b"boarding pass " * 100, name="pass.pdf")
    since = fake.mark()
    dialog.send(fake.text_update(user_id, "Flight home"))
    time.sleep(0.009)
    dialog.send(fake.document_update(user_id, stored))
    fake.wait_text(user_id, "Stored \u201cFlight home\u201d", since=since)
    assert texts.ADD_FILE_EXPECTED not in [c.text for c in fake.sent("sendMessage", user_id)]


@pytest.mark.parametrize(
    "content",
    [
        {"document": {"file_id": "F1", "file_unique_id": "U1"}},
        {"photo": [{"file_id": "F1", "file_unique_id": "U1", "width": 9, "height": 9}]},
        {"voice": {"file_id": "F1", "file_unique_id": "U1", "duration": 1}},
        {"audio": {"file_id": "F1", "file_unique_id": "U1", "duration": 1}},
        {
            "video": {
                "file_id": "F1",
                "file_unique_id": "U1",
                "width": 9,
                "height": 9,
                "duration": 1,
            }
        },
        {
            "sticker": {
                "file_id": "F1",
                "file_unique_id": "U1",
                "type": "regular",
                "width": 9,
                "height": 9,
                "is_animated": False,
                "is_video": False,
            }
        },
    ],
)
def test_every_kind_of_file_message_is_exempt_from_flood_drops(content: dict[str, Any]) -> None:
    update = Update.de_json(
        {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "date": 0,
                "chat": {"id": 5, "type": "private"},
                "from": {"id": 5, "is_bot": False, "first_name": "A"},
                **content,
            },
        },
        None,
    )
    assert update is not None and carries_file(update)


def test_text_and_buttons_are_still_subject_to_flood_control() -> None:
    for content in ({"text": "hi"}, {"location": {"latitude": 1.0, "longitude": 2.0}}):
        update = Update.de_json(
            {
                "update_id": 1,
                "message": {
                    "message_id": 1,
                    "date": 0,
                    "chat": {"id": 5, "type": "private"},
                    "from": {"id": 5, "is_bot": False, "first_name": "A"},
                    **content,
                },
            },
            None,
        )
        assert update is not None and not carries_file(update)
