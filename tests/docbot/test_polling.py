"""The tolerant polling loop (issue 10, item 8), against the fake Bot API through PTB's HTTP
stack: an update the library cannot parse is logged, skipped and confirmed (the offset moves
past it), repeated failures back off, and a poison update never delays the ones after it."""

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from docbot import texts
from tests.docbot.conftest import BotEnv, Dialog, PollingBot, outgoing

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]

USER = 6101


def _message(**fields: Any) -> dict[str, Any]:
    base = {
        "message_id": 1,
        "date": 1_767_225_600,
        "chat": {"id": USER, "type": "private"},
        "from": {"id": USER, "is_bot": False, "first_name": "U"},
        "text": "/help",
        "entities": [{"type": "bot_command", "offset": 0, "length": 5}],
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


# Each is a confirmable update (it has a usable update_id) the bot must refuse and skip.
POISON: dict[str, dict[str, Any]] = {
    "no chat and no date": {"message": {"message_id": 1, "text": "/help"}},
    "message is a string": {"message": "/help"},
    "message is a list": {"message": [1, 2]},
    "chat id as a string": {"message": _message(chat={"id": str(USER), "type": "private"})},
    "chat id beyond 52 bits": {"message": _message(chat={"id": 2**70, "type": "private"})},
    "chat id a float": {"message": _message(chat={"id": 6101.0, "type": "private"})},
    "sender id negative": {"message": _message(**{"from": {"id": -5, "is_bot": False}})},
    "is_bot a string": {"message": _message(**{"from": {"id": USER, "is_bot": "no"}})},
    "text a number": {"message": _message(text=5)},
    "text with NUL": {"message": _message(text="/help\x00")},
    "text with a lone surrogate": {"message": _message(text="/help\ud800")},
    "entities not a list": {"message": _message(entities={"type": "bot_command"})},
    "entity offset negative": {
        "message": _message(entities=[{"type": "bot_command", "offset": -1, "length": 5}])
    },
    "date out of range": {"message": _message(date=10**20)},
    "callback without chat_instance": {
        "callback_query": {"id": "c1", "from": {"id": USER, "is_bot": False, "first_name": "U"}}
    },
    "document without file_id": {"message": _message(text=None, document={"file_size": 5})},
    "photo sizes not a list": {"message": _message(text=None, photo={"file_id": "x"})},
}
# Items without a usable update_id cannot be confirmed: a broken server would send them again
# and again; the loop must not spin on them nor hold back the updates after them.
UNCONFIRMABLE: dict[str, Any] = {
    "a string": "garbage",
    "a number": 17,
    "null": None,
    "a list": [],
    "update_id as a string": {"update_id": "9", "message": _message()},
    "update_id beyond 52 bits": {"update_id": 2**60, "message": _message()},
    "update_id a float": {"update_id": 9.5, "message": _message()},
}


@pytest.fixture
def polling_bot(bot_env: BotEnv) -> Iterator[BotEnv]:
    # Short waits keep the tests quick; a hot loop would still poll hundreds of times a second.
    config = dataclasses.replace(
        bot_env.config("polling"), poll_retry_first=0.1, poll_retry_max=0.4
    )
    bot = PollingBot(config).start()
    try:
        yield bot_env
    finally:
        bot.stop()


def _polls_during(env: BotEnv, seconds: float) -> int:
    start = time.monotonic()
    time.sleep(seconds)
    return len([at for at, _ in env.fake.polls if at >= start])


def _refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "docbot_update_refused"
    ]


@pytest.mark.parametrize("poison", list(POISON))
def test_an_update_the_library_cannot_parse_is_skipped_and_the_next_is_answered(
    polling_bot: BotEnv, caplog: pytest.LogCaptureFixture, poison: str
) -> None:
    caplog.set_level(logging.INFO)
    fake = polling_bot.fake
    bad_id = fake.next_update_id()
    since = fake.mark()
    fake.push({"update_id": bad_id, **POISON[poison]})
    fake.push(fake.text_update(USER, "/help"))
    fake.wait_text(USER, "Add document: pick", since=since)

    assert [(c.method, c.text) for c in outgoing(fake, since)] == [("sendMessage", texts.HELP)]
    assert _polls_during(polling_bot, 1.0) <= 3  # idle long polls (1 s), not a hot loop
    assert max(offset for _, offset in fake.polls) > bad_id + 1
    (refusal,) = _refusals(caplog)
    assert refusal["update_id"] == bad_id
    assert refusal["request_id"] == f"tg-{bad_id}"
    assert refusal["field"]


@pytest.mark.parametrize("item", list(UNCONFIRMABLE))
def test_an_item_without_a_usable_update_id_neither_spins_the_loop_nor_blocks_others(
    polling_bot: BotEnv, item: str
) -> None:
    fake = polling_bot.fake
    since = fake.mark()
    fake.push(UNCONFIRMABLE[item])
    fake.push(fake.text_update(USER, "/help"))
    fake.wait_text(USER, "Add document: pick", since=since)
    # The broken item is served on every poll from now on: only the backoff paces the loop.
    assert _polls_during(polling_bot, 1.0) <= 8
    since = fake.mark()
    fake.push(fake.text_update(USER, "/cancel"))
    fake.wait_text(USER, texts.NOTHING_TO_CANCEL, timeout=10, since=since)


FAULTS = {
    "400 Bad Request": (400, b'{"ok": false, "error_code": 400, "description": "Bad Request"}'),
    "409 Conflict": (409, b'{"ok": false, "error_code": 409, "description": "Conflict"}'),
    "result not a list": (200, b'{"ok": true, "result": {"update_id": 1}}'),
    "result a string": (200, b'{"ok": true, "result": "updates"}'),
    "not JSON": (200, b"<html>gateway</html>"),
    "502 Bad Gateway": (502, b'{"ok": false, "error_code": 502, "description": "Bad Gateway"}'),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_repeated_failures_back_off_and_polling_recovers(polling_bot: BotEnv, fault: str) -> None:
    fake = polling_bot.fake
    fake.wait_for(lambda c: c.method == "deleteWebhook")
    fake.get_updates_fault = FAULTS[fault]
    assert _polls_during(polling_bot, 1.0) <= 8  # 0.1 s, 0.2 s, 0.4 s... apart, not 270/s
    fake.get_updates_fault = None
    dialog = Dialog(polling_bot, "polling", user_id=USER)
    dialog.say("/help", "Add document: pick")


def test_stop_ends_a_backoff_at_once(bot_env: BotEnv) -> None:
    bot = PollingBot(bot_env.config("polling")).start()  # retries wait up to 30 s
    bot_env.fake.get_updates_fault = FAULTS["result not a list"]
    time.sleep(2)
    started = time.monotonic()
    bot.stop()
    assert time.monotonic() - started < 3
