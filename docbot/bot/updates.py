"""Telegram updates as client input (input-policy.md, "Telegram update policy").

A webhook body, or one item of a `getUpdates` result, is parsed here once, before any handler
sees it. python-telegram-bot's `Update.de_json` trusts its input (an id sent as a string, a
text sent as a number or a message without a chat either crash it or crash a handler later),
so every field the bot reads is judged first by the shared parsers; then `de_json` builds the
object. Whatever is not an Update raises `InvalidValue` naming the field: the webhook answers
400, the poller logs and skips it.

`route` then says what the policy does with a parsed update: serve it (private chats only),
tell a group once to use a private chat, answer a button that is not ours to serve as stale,
or ignore it silently (channel posts, edits, other update kinds)."""

import enum
from typing import Any

from telegram import Bot, Update
from telegram.constants import ChatType

from common import parsers
from common.parsers import InvalidValue
from docbot import schemas

#: What the bot asks Telegram for (webhook registration and getUpdates); anything else that
#: still arrives is ignored by `route`.
ALLOWED_UPDATES = ("message", "callback_query")
#: A webhook body larger than this is not an update the bot serves.
MAX_UPDATE_BYTES = 1024 * 1024

_MESSAGE_KINDS = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_message",
    "edited_business_message",
)
_TEXT_MAX = 4096  # Bot API: message text, 1-4096 characters after entities parsing
_CAPTION_MAX = 1024
_LIST_MAX = 100
_EPOCH_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
_GROUP_CHATS = {ChatType.GROUP, ChatType.SUPERGROUP}


class Route(enum.Enum):
    SERVE = "serve"  # a private chat with its user: the dialog handles it
    GROUP = "group"  # a group or supergroup: one "use me in a private chat", nothing else
    STALE = "stale"  # a button the bot will not serve here: answered "no longer active"
    IGNORE = "ignore"  # channel posts and their edits, edited messages, other kinds: silence


def update_parse(data: object, bot: Bot) -> Update:
    """The `Update` in a decoded JSON document; `InvalidValue` when it is not one."""
    update = _object(data, "update")
    parsers.integer(
        update.get("update_id"),
        field="update_id",
        max_value=schemas.TELEGRAM_ID_MAX,
        strings=False,
    )
    for kind in _MESSAGE_KINDS:
        if kind in update:
            _message(update[kind], kind)
    if "callback_query" in update:
        _callback_query(update["callback_query"], "callback_query")
    try:
        parsed = Update.de_json(update, bot)
    except Exception:  # the library's own verdict on the rest of the structure
        raise InvalidValue("update", "format", "is not a Telegram Update") from None
    if parsed is None:
        raise InvalidValue("update", "type", "must be a JSON object")
    kind = next((key for key in update if key != "update_id"), "update")
    _effective_ids(parsed, kind)
    return parsed


def update_id_of(data: object) -> int | None:
    """The `update_id` of a raw update if it has a usable one (to confirm it even when the rest
    of the update is refused)."""
    if not isinstance(data, dict):
        return None
    try:
        return parsers.integer(
            data.get("update_id"),
            field="update_id",
            max_value=schemas.TELEGRAM_ID_MAX,
            strings=False,
        )
    except InvalidValue:
        return None


def route(update: Update) -> Route:
    """What the update policy does with `update` (see the module docstring)."""
    if update.message is not None:
        message = update.message
        chat, sender = message.chat, message.from_user
        if chat.type == ChatType.PRIVATE:
            served = sender is not None and not sender.is_bot and sender.id == chat.id
            return Route.SERVE if served else Route.IGNORE
        return Route.GROUP if chat.type in _GROUP_CHATS else Route.IGNORE
    query = update.callback_query
    if query is not None:
        origin = query.message
        if origin is None or origin.chat.type != ChatType.PRIVATE:
            return Route.STALE
        if query.from_user.is_bot or origin.chat.id != query.from_user.id:
            return Route.STALE
        return Route.SERVE
    return Route.IGNORE


# --- the fields the bot reads, judged by the shared parsers -------------------------------


def _effective_ids(update: Update, kind: str) -> None:
    """python-telegram-bot keys its per-chat and per-user data by the effective chat and user
    of every update kind (reactions, member changes, business messages...), so those ids are
    judged whatever the kind."""
    try:
        chat, user = update.effective_chat, update.effective_user
    except Exception:
        raise InvalidValue(kind, "format", "is not a Telegram Update") from None
    limit = schemas.TELEGRAM_ID_MAX
    if chat is not None:
        _int(chat.id, f"{kind}.chat.id", min_value=-limit, max_value=limit)
        parsers.identifier(chat.type, field=f"{kind}.chat.type", max_length=32)
    if user is not None:
        _int(user.id, f"{kind}.user.id", min_value=1)
        parsers.choice(user.is_bot, field=f"{kind}.user.is_bot", choices=(True, False))


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValue(field, "type", "must be a JSON object")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidValue(field, "type", "must be a JSON array")
    if len(value) > _LIST_MAX:
        raise InvalidValue(field, "too_long", f"has more than {_LIST_MAX} items")
    return value


def _int(
    value: object, field: str, *, min_value: int = 0, max_value: int = schemas.TELEGRAM_ID_MAX
) -> int:
    return parsers.integer(
        value, field=field, min_value=min_value, max_value=max_value, strings=False
    )


def _text(value: object, field: str, max_length: int) -> str:
    """A string the bot may read or echo: its content (controls in a typed name...) is judged
    later by the dialog step that reads it, which answers in words."""
    if not isinstance(value, str):
        raise InvalidValue(field, "type", "must be a string")
    if len(value) > max_length:
        raise InvalidValue(field, "too_long", f"is longer than {max_length} characters")
    problem = parsers.text_problem(value, multiline=True)
    if problem is not None and (problem[0] == "encoding" or "\x00" in value):
        raise InvalidValue(field, *problem)
    return value


def _file_id(value: object, field: str, max_length: int) -> None:
    parsers.identifier(value, field=field, max_length=max_length, pattern=schemas.FILE_ID_PATTERN)


def _user(value: object, field: str) -> None:
    user = _object(value, field)
    _int(user.get("id"), f"{field}.id", min_value=1)
    parsers.choice(user.get("is_bot"), field=f"{field}.is_bot", choices=(True, False))


def _chat(value: object, field: str) -> None:
    chat = _object(value, field)
    limit = schemas.TELEGRAM_ID_MAX
    _int(chat.get("id"), f"{field}.id", min_value=-limit, max_value=limit)
    parsers.identifier(chat.get("type"), field=f"{field}.type", max_length=32)


def _message(value: object, field: str) -> None:
    message = _object(value, field)
    _int(message.get("message_id"), f"{field}.message_id", max_value=parsers.INT64_MAX)
    _int(message.get("date"), f"{field}.date", max_value=_EPOCH_MAX)
    _chat(message.get("chat"), f"{field}.chat")
    if "from" in message:
        _user(message["from"], f"{field}.from")
    if "text" in message:
        _text(message["text"], f"{field}.text", _TEXT_MAX)
    if "caption" in message:
        _text(message["caption"], f"{field}.caption", _CAPTION_MAX)
    if "entities" in message:
        for index, item in enumerate(_list(message["entities"], f"{field}.entities")):
            path = f"{field}.entities[{index}]"
            entity = _object(item, path)
            parsers.identifier(entity.get("type"), field=f"{path}.type", max_length=64)
            _int(entity.get("offset"), f"{path}.offset", max_value=2 * _TEXT_MAX)
            _int(entity.get("length"), f"{path}.length", max_value=2 * _TEXT_MAX)
    if "document" in message:
        _file(message["document"], f"{field}.document")
    if "photo" in message:
        for index, item in enumerate(_list(message["photo"], f"{field}.photo")):
            _file(item, f"{field}.photo[{index}]")


def _file(value: object, field: str) -> None:
    attachment = _object(value, field)
    _file_id(attachment.get("file_id"), f"{field}.file_id", schemas.FILE_ID_MAX)
    _file_id(
        attachment.get("file_unique_id"), f"{field}.file_unique_id", schemas.FILE_UNIQUE_ID_MAX
    )
    if attachment.get("file_size") is not None:
        _int(attachment["file_size"], f"{field}.file_size", max_value=parsers.INT64_MAX)
    for name in ("file_name", "mime_type"):
        if attachment.get(name) is not None:
            _text(attachment[name], f"{field}.{name}", 1024)


def _callback_query(value: object, field: str) -> None:
    query = _object(value, field)
    parsers.text(query.get("id"), field=f"{field}.id", max_length=128)
    _user(query.get("from"), f"{field}.from")
    parsers.text(query.get("chat_instance"), field=f"{field}.chat_instance", max_length=128)
    if query.get("data") is not None:
        # Read as plain text here; its grammar is the button's business (stale, not invalid).
        _text(query["data"], f"{field}.data", 1024)
    if query.get("message") is not None:
        _message(query["message"], f"{field}.message")
    if query.get("inline_message_id") is not None:
        parsers.text(query["inline_message_id"], field=f"{field}.inline_message_id", max_length=256)
