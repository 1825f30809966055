"""Buttons are client input (issue 10, item 9): `callback_data` parsed and range-checked, a
stale or forged press answered "no longer active", and every press answered exactly once, on
every path (success, refusal, backend 404, unexpected failure)."""

import logging
from collections import Counter
from typing import Any

import pytest

from docbot import texts
from docbot.bot.backend import Backend
from docbot.models import Document
from tests.docbot.conftest import BotEnv, Dialog, PollingBot, outgoing
from tests.docbot.factories import stored_document, telegram_user

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("eager_tasks")]

FORGED = [
    "bp:3:-2",
    "bp:3:0",
    "bp:3:10001",
    "bp:3:99999999999999999999",
    "bp:3",
    "bp:3:1:1",
    "bp:-3:1",
    "bt:0",
    "d:",
    "d:-1",
    "d:0",
    "d:1.5",
    "d:1e3",
    "d:+1",
    "d: 1",
    "d:1_0",
    "d:\u0661",  # Arabic-Indic one
    "d:\uff11",  # fullwidth one
    "d:\u00b9",  # superscript one
    "d:9223372036854775808",
    "d:99999999999999999999",
    "d:1:2",
    "x:abc",
    "mt:1",
    "an:1",
    "zz:1",
    "D:1",
    "",
    ":",
    "::::",
    "d:1\u202e",
    "d:" + "1" * 70,
    "\u00e9" * 40,  # 40 characters, 80 bytes
]


def _press(env: BotEnv, user_id: int, data: str, *, webhook: bool) -> dict[str, Any]:
    press = env.fake.callback_update(user_id, data)
    if webhook:
        assert env.fake.deliver(press).status_code == 200
    else:
        env.fake.push(press)
    return press


def _answered_once(env: BotEnv, press: dict[str, Any], text: str | None) -> None:
    press_id = press["callback_query"]["id"]
    env.fake.wait_for(
        lambda c: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == press_id
    )
    answers = env.fake.answers(press_id)
    assert [a.params.get("text") for a in answers] == [text]


@pytest.mark.parametrize("data", FORGED)
def test_a_forged_button_is_no_longer_active_and_answered_once(
    webhook_registered: BotEnv, data: str
) -> None:
    env = webhook_registered
    stored_document(telegram_user(5301))
    since = env.fake.mark()
    press = _press(env, 5301, data, webhook=True)
    _answered_once(env, press, texts.STALE_BUTTON)
    assert [c.method for c in outgoing(env.fake, since)] == ["answerCallbackQuery"]


def test_forged_buttons_reaching_the_polling_bot_are_answered_once_each(bot_env: BotEnv) -> None:
    stored_document(telegram_user(5302))
    bot = PollingBot(bot_env.config("polling")).start()
    try:
        since = bot_env.fake.mark()
        presses = [_press(bot_env, 5302, data, webhook=False) for data in FORGED]
        for press in presses:
            _answered_once(bot_env, press, texts.STALE_BUTTON)
        Dialog(bot_env, "polling", user_id=5302).barrier()
    finally:
        bot.stop()
    methods = [c.method for c in outgoing(bot_env.fake, since)]
    assert methods.count("answerCallbackQuery") == len(FORGED)
    assert methods.count("sendMessage") == 1  # the barrier's /help
    assert len(methods) == len(FORGED) + 1


def test_buttons_for_another_users_or_a_deleted_document_are_no_longer_active(
    webhook_registered: BotEnv,
) -> None:
    env = webhook_registered
    theirs = stored_document(telegram_user(5311), name="Theirs")
    mine = stored_document(telegram_user(5312), name="Mine")
    gone = mine.pk
    Document.objects.filter(pk=gone).delete()
    since = env.fake.mark()
    forged = [f"d:{theirs.pk}", f"s:{theirs.pk}", f"x:{theirs.pk}", f"xy:{theirs.pk}"]
    deleted = [f"d:{gone}", f"r:{gone}", f"m:{gone}", f"mt:{gone}:{theirs.type_id}", f"xy:{gone}"]
    for data in [*forged, *deleted]:
        press = _press(env, 5312, data, webhook=True)
        _answered_once(env, press, texts.STALE_BUTTON)
    assert {c.method for c in outgoing(env.fake, since)} == {"answerCallbackQuery"}
    assert Document.objects.filter(pk=theirs.pk).exists()


def test_page_buttons_reach_only_pages_the_dialog_has_shown(webhook_registered: BotEnv) -> None:
    owner = telegram_user(5321)
    for index in range(9):
        stored_document(owner, name=f"Ticket {index}", type_name="Tickets", content=bytes([index]))
    type_id = Document.objects.filter(user=owner).first().type_id  # type: ignore[union-attr]
    dialog = Dialog(webhook_registered, "webhook", user_id=5321)
    env = webhook_registered

    page_one = dialog.tap(f"bt:{type_id}", "page 1", method="editMessageText")
    for data in (f"bp:{type_id}:3", f"bp:{type_id}:0", f"bp:{type_id}:-2"):
        press = _press(env, 5321, data, webhook=True)
        _answered_once(env, press, texts.STALE_BUTTON)
    dialog.tap(dialog.button(page_one, "Next"), "page 2", method="editMessageText")
    dialog.tap(f"bp:{type_id}:1", "page 1", method="editMessageText")
    dialog.say("/start", "I keep your documents")  # a new dialog forgets the pages
    press = _press(env, 5321, f"bp:{type_id}:2", webhook=True)
    _answered_once(env, press, texts.STALE_BUTTON)


def test_every_button_press_is_answered_exactly_once(dialog: Dialog) -> None:
    env, fake = dialog.env, dialog.env.fake
    document = stored_document(telegram_user(dialog.user_id), name="Lease", type_name="Home")
    stored_document(telegram_user(dialog.user_id), name="Car", type_name="Auto", content=b"car")
    since = fake.mark()
    dialog.tap(f"bt:{document.type_id}", "page 1", method="editMessageText")
    sent = dialog.tap(f"d:{document.pk}", "Lease", method="sendDocument")
    dialog.tap(dialog.button(sent, texts.BUTTON_SHARE), "valid until")
    dialog.tap(dialog.button(sent, texts.BUTTON_RENAME), "New name for")
    dialog.say("/cancel", "Cancelled")
    retype = dialog.tap(dialog.button(sent, texts.BUTTON_RETYPE), "to which type")
    dialog.tap(dialog.button(retype, "Auto"), "Moved \u201cLease\u201d to Auto")
    confirm = dialog.tap(dialog.button(sent, texts.BUTTON_DELETE), "for good?")
    dialog.tap(dialog.button(confirm, texts.BUTTON_NO), texts.DELETE_KEPT)
    dialog.tap(dialog.button(confirm, texts.BUTTON_YES), "Deleted")
    menu = dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    dialog.tap(dialog.button(menu, "Auto"), "Now name the document")
    dialog.barrier()
    answers = [c for c in outgoing(fake, since) if c.method == "answerCallbackQuery"]
    ids = [c.params["callback_query_id"] for c in answers]
    assert len(ids) == 10
    assert len(set(ids)) == len(ids)
    assert env.fake.sent("sendDocument", dialog.user_id)


@pytest.mark.parametrize("fails", ["document", "types"])
def test_a_button_whose_action_fails_is_answered_once_with_the_generic_reply(
    dialog: Dialog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fails: str
) -> None:
    caplog.set_level(logging.INFO)
    fake = dialog.env.fake
    document = stored_document(telegram_user(dialog.user_id))
    at_pick_type = fails == "types"
    if at_pick_type:
        dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("internal detail 7f3a")

    monkeypatch.setattr(Backend, fails, broken)
    since = fake.mark()
    data = f"at:{document.type_id}" if at_pick_type else f"d:{document.pk}"
    press = fake.callback_update(dialog.user_id, data)
    dialog.send(press)
    _answered_once(dialog.env, press, texts.FAILED)
    monkeypatch.undo()
    dialog.barrier()
    assert [c.method for c in outgoing(fake, since)] == ["answerCallbackQuery", "sendMessage"]
    assert "7f3a" not in " ".join(str(c.params) for c in fake.calls)
    failures = [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "docbot_handler_failed"
    ]
    assert len(failures) == 1
    assert failures[0]["request_id"] == f"tg-{press['update_id']}"
    assert failures[0].get("exc_info")


def test_presses_dropped_by_flood_control_are_still_answered_once(
    webhook_registered: BotEnv, settings: Any
) -> None:
    settings.DOCBOT_FLOOD_MAX_PER_SECOND = 2
    env = webhook_registered
    since = env.fake.mark()
    presses = [_press(env, 5331, "bp:1:0", webhook=True) for _ in range(8)]
    notes: Counter[str | None] = Counter()
    for press in presses:
        (answer,) = env.fake.answers(press["callback_query"]["id"])
        notes[answer.params.get("text")] += 1
    assert notes[texts.SLOW_DOWN] >= 4  # 2 a second pass; 8 presses span at most 2 seconds
    assert notes[texts.STALE_BUTTON] + notes[texts.SLOW_DOWN] == 8
    assert {c.method for c in outgoing(env.fake, since)} == {"answerCallbackQuery"}
