"""The bot's one catch-all (`on_error`): any unexpected exception in a handler or in the
middleware is answered with a generic reply in the user's private chat only, logged once with
the update's correlation id (`tg-<update_id>`), and never answered twice."""

import logging
import time
from typing import Any

import pytest

from docbot import texts
from docbot.bot.backend import Backend
from docbot.bot.state import DialogStore
from tests.docbot.conftest import CHANNEL_CHAT, GROUP_CHAT, Dialog, outgoing

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]


def _failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "docbot_handler_failed"
    ]


def _wait_for_failure(caplog: pytest.LogCaptureFixture) -> None:
    deadline = time.monotonic() + 20
    while not _failures(caplog):
        assert time.monotonic() < deadline, "the failure was never logged"
        time.sleep(0.02)


async def _broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("internal detail 7f3a")


def test_an_unexpected_failure_is_answered_once_and_logged_once_with_the_update_id(
    dialog: Dialog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = dialog.env.fake
    monkeypatch.setattr(Backend, "types", _broken)
    since = fake.mark()
    update = fake.text_update(dialog.user_id, texts.MENU_BROWSE)
    dialog.send(update)
    fake.wait_text(dialog.user_id, texts.FAILED, since=since)
    monkeypatch.undo()
    dialog.barrier()

    said = [(c.method, c.text) for c in outgoing(fake, since)]
    assert said == [("sendMessage", texts.FAILED), ("sendMessage", texts.HELP)]
    assert "7f3a" not in " ".join(str(c.params) for c in fake.calls)
    (failure,) = _failures(caplog)
    assert failure["request_id"] == f"tg-{update['update_id']}"
    assert failure["update_id"] == update["update_id"]
    assert failure.get("exc_info") is not None
    assert not [r for r in caplog.records if r.name.startswith("telegram") and r.levelno >= 40]


@pytest.mark.parametrize(
    "where",
    ["group", "supergroup-callback", "channel", "edited", "private"],
)
def test_a_failure_before_the_policy_is_answered_only_in_the_users_private_chat(
    dialog: Dialog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.INFO)
    fake, user_id = dialog.env.fake, dialog.user_id
    updates = {
        "group": lambda: fake.text_update(user_id, "/start", chat=GROUP_CHAT),
        "supergroup-callback": lambda: fake.callback_update(user_id, "d:1", chat=GROUP_CHAT),
        "channel": lambda: fake.text_update(
            user_id, "/start", chat=CHANNEL_CHAT, kind="channel_post"
        ),
        "edited": lambda: fake.text_update(user_id, "/start", kind="edited_message"),
        "private": lambda: fake.text_update(user_id, "/start"),
    }
    monkeypatch.setattr(DialogStore, "admit", _broken)
    since = fake.mark()
    update = updates[where]()
    dialog.send(update)
    _wait_for_failure(caplog)
    if where == "private":
        fake.wait_text(user_id, texts.FAILED, since=since)
    elif where == "supergroup-callback":
        press_id = update["callback_query"]["id"]
        fake.wait_for(lambda c: c.params.get("callback_query_id") == press_id, since=since)
    monkeypatch.undo()
    dialog.barrier()

    said = [(c.method, c.chat_id, c.text) for c in outgoing(fake, since)]
    expected: list[tuple[str, int | None, str]] = [("sendMessage", user_id, texts.HELP)]
    if where == "private":
        expected.insert(0, ("sendMessage", user_id, texts.FAILED))
    if where == "supergroup-callback":  # answering a press posts nothing to the group
        expected.insert(0, ("answerCallbackQuery", None, texts.FAILED))
    assert said == expected
    assert len(_failures(caplog)) == 1


def test_a_reply_that_fails_is_logged_once_and_the_bot_keeps_serving(
    dialog: Dialog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = dialog.env.fake
    fake.fail_methods["sendMessage"] = 2  # the reply and the catch-all's generic reply
    update = fake.text_update(dialog.user_id, "/help")
    dialog.send(update)
    fake.wait_text(dialog.user_id, texts.FAILED)
    dialog.barrier()
    (failure,) = _failures(caplog)
    assert failure["request_id"] == f"tg-{update['update_id']}"
    assert len([c for c in fake.sent("sendMessage", dialog.user_id) if c.text == texts.FAILED]) == 1
