"""Wire formats of docbot shared by the bot and the backend API: Telegram's value ranges and
charsets, and the grammar of the bot's own button `callback_data` (input-policy.md).

Pure: no Django, no python-telegram-bot. Values from outside are judged by the shared parsers
(`common.parsers`), so a refusal is an `InvalidValue` naming the field and the reason."""

import mimetypes
import re
from dataclasses import dataclass

from common import parsers

#: Telegram user and chat ids "have at most 52 significant bits" (Bot API, `User.id`,
#: `Chat.id`); group and channel chats are negative, users positive.
TELEGRAM_ID_MAX = 2**52 - 1
#: Telegram file ids are opaque but URL-safe base64 in practice; a generous bound keeps a header
#: or a database column from receiving anything else.
FILE_ID_PATTERN = re.compile(r"[A-Za-z0-9_=-]+")
FILE_ID_MAX = 256
FILE_UNIQUE_ID_MAX = 128
FILE_NAME_MAX = 255
#: `type/subtype` (RFC 6838 restricted names), without parameters.
MIME_TYPE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
MIME_TYPE_MAX = 128
#: `callback_data` is 1-64 bytes (Bot API, `InlineKeyboardButton`).
CALLBACK_DATA_MAX_BYTES = 64
#: Page numbers of the browse list; far beyond any real vault, small enough for one button.
PAGE_MAX = 10_000

#: Button kinds and how many integer fields follow the kind (`kind:field:field`).
CALLBACK_FIELDS: dict[str, int] = {
    "an": 0,  # add: new type
    "at": 1,  # add: pick type <type id>
    "bt": 1,  # browse: type <type id>
    "bp": 2,  # browse: page <type id> <page number>
    "d": 1,  # document <id>: send it back
    "r": 1,  # rename <document id>
    "m": 1,  # change type of <document id>
    "mt": 2,  # move <document id> to <type id>
    "x": 1,  # delete <document id> (asks)
    "xy": 1,  # delete <document id>: confirmed
    "xn": 1,  # delete <document id>: kept
    "s": 1,  # share link of <document id>
}


@dataclass(frozen=True)
class Callback:
    """A parsed button: its kind and its integer fields (ids >= 1, page numbers 1..PAGE_MAX)."""

    kind: str
    args: tuple[int, ...]


def callback_data(kind: str, *args: int) -> str:
    """The `callback_data` of a button; `callback_parse` reads it back."""
    if CALLBACK_FIELDS.get(kind) != len(args):
        raise ValueError(f"button {kind!r} takes {CALLBACK_FIELDS.get(kind)} fields")
    data = ":".join([kind, *(str(arg) for arg in args)])
    if len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
        raise ValueError("callback_data longer than 64 bytes")
    return data


def callback_parse(raw: object) -> Callback:
    """Parse a button's `callback_data`, client input like any other: clean text of at most 64
    bytes, a known kind, exactly its number of fields, each field ASCII digits in range.

    Raises `InvalidValue` (field `callback_data`, or `callback_data.<n>` for the n-th field)."""
    data = parsers.text(raw, field="callback_data", max_length=CALLBACK_DATA_MAX_BYTES)
    if len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
        raise parsers.InvalidValue("callback_data", "too_long", "is longer than 64 bytes")
    kind, *fields = data.split(":")
    parsers.choice(kind, field="callback_data.kind", choices=tuple(CALLBACK_FIELDS))
    if len(fields) != CALLBACK_FIELDS[kind]:
        raise parsers.InvalidValue(
            "callback_data", "format", f"{kind} takes {CALLBACK_FIELDS[kind]} fields"
        )
    args = tuple(
        parsers.integer(
            value,
            field=f"callback_data.{index}",
            min_value=1,
            max_value=PAGE_MAX if (kind, index) == ("bp", 2) else parsers.INT64_MAX,
            numbers=False,
        )
        for index, value in enumerate(fields, start=1)
    )
    return Callback(kind, args)


def telegram_user_id(raw: object, *, field: str) -> int:
    """A Telegram user id: ASCII digits (or a JSON integer) within 1..TELEGRAM_ID_MAX."""
    return parsers.integer(raw, field=field, min_value=1, max_value=TELEGRAM_ID_MAX)


def file_name_clean(raw: str) -> str:
    """A file name safe to echo in a `Content-Disposition` header: controls, lone surrogates and
    path separators become `_` (names stored before input was checked may hold them)."""
    cleaned = "".join(
        "_" if (ord(char) < 32 or ord(char) == 127 or 0xD800 <= ord(char) <= 0xDFFF) else char
        for char in raw
    )
    return cleaned.replace("/", "_").replace("\\", "_").strip(" .")[:FILE_NAME_MAX]


def download_name(file_name: str, name: str, mime_type: str) -> str:
    """The name a shared document downloads as: its original file name, cleaned
    (`file_name_clean`); a file sent without one (a photo) gets the document's name plus the
    extension of its MIME type (`Passport.jpg`)."""
    original = file_name_clean(file_name)
    if original:
        return original
    base = file_name_clean(name) or "document"
    extension = mimetypes.guess_extension(mime_type_or_default(mime_type, "")) or ""
    if extension and not base.lower().endswith(extension):
        base = base[: FILE_NAME_MAX - len(extension)] + extension
    return base


def mime_type_or_default(raw: str, default: str = "application/octet-stream") -> str:
    """`raw` when it is a plain `type/subtype`, otherwise `default` (never a header injection)."""
    if len(raw) <= MIME_TYPE_MAX and MIME_TYPE_PATTERN.fullmatch(raw):
        return raw
    return default
