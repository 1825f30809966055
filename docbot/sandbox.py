"""The built-in Bot API sandbox: an in-memory Telegram for one process, so the bot can be tried
without a TELEGRAM_BOT_TOKEN (`make run` serves it; `docbot/sandbox_views.py` is its HTTP face).

Two sides share one `Sandbox`. The bot side speaks the Bot API methods docbot uses (getMe,
getUpdates with long polling, sendMessage, editMessageText, editMessageReplyMarkup,
answerCallbackQuery, sendDocument, sendPhoto, deleteMessage, getFile and the file download,
deleteWebhook) with Telegram's answers and errors, so python-telegram-bot reaches it through
its real HTTP stack. The operator side is what a Telegram client does: say something, press an
inline button of a message the bot sent (only buttons that exist), send a file; and read the
chat back. Each operator is their own private chat.

Bounded: 1,000 pending updates, 200 messages per chat, files up to 32 MiB and 256 MiB in all
(the oldest files are forgotten first). Nothing survives a restart. Thread-safe: the web app
serves the operator from worker threads and the bot from the event loop."""

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from docbot import schemas, telegram

BOT_USER: dict[str, Any] = {
    "id": telegram.SANDBOX_BOT_ID,
    "is_bot": True,
    "first_name": "Docbot (sandbox)",
    "username": "docbot_sandbox_bot",
}
MAX_PENDING_UPDATES = 1000
MAX_MESSAGES_PER_CHAT = 200
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_STORED_BYTES = 256 * 1024 * 1024
#: getUpdates waits at most this long, whatever `timeout` asks: a poll held open by a stopped
#: bot then ends soon after.
LONG_POLL_MAX_SECONDS = 10.0
_NOTES_KEPT = 5
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_TEXT_MAX = 4096


class BotApiError(Exception):
    """A Bot API error answer: `{"ok": false, "error_code": code, "description": ...}`."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass(frozen=True)
class SandboxFile:
    file_id: str
    file_unique_id: str
    file_name: str
    mime_type: str
    content: bytes
    path: str  # getFile's `file_path`


@dataclass
class Chat:
    """One operator's private chat with the bot."""

    user: dict[str, Any]
    messages: "OrderedDict[int, dict[str, Any]]" = field(default_factory=OrderedDict)
    keyboard: list[list[str]] = field(default_factory=list)  # the reply keyboard shown
    notes: "deque[str]" = field(default_factory=lambda: deque(maxlen=_NOTES_KEPT))
    version: int = 0


@dataclass(frozen=True)
class Transcript:
    """A chat as the operator sees it: `messages` oldest first, each a Telegram `Message`
    dict with `outgoing` (true for the bot's); `notes` are the bot's latest button answers."""

    version: int
    messages: list[dict[str, Any]]
    keyboard: list[list[str]]
    notes: list[str]
    bot_polling: bool


def _markup(raw: object) -> dict[str, Any]:
    if raw in (None, ""):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise BotApiError(400, "Bad Request: can't parse reply keyboard markup JSON") from None
    if not isinstance(raw, dict):
        raise BotApiError(400, "Bad Request: reply markup must be an object")
    return raw


def _int(params: dict[str, Any], name: str) -> int:
    try:
        return int(params[name])
    except (KeyError, TypeError, ValueError):
        raise BotApiError(400, f"Bad Request: {name} is required and must be an integer") from None


def _text(params: dict[str, Any], name: str, *, required: bool) -> str:
    value = params.get(name)
    if value in (None, ""):
        if required:
            raise BotApiError(400, "Bad Request: message text is empty")
        return ""
    return str(value)[:_TEXT_MAX]


def operator_user(user_pk: int, name: str) -> dict[str, Any]:
    """The Telegram user an operator (a staff account) is in the sandbox: ids counted down
    from the top of Telegram's 52-bit range, far from the ids Telegram hands out."""
    return {
        "id": schemas.TELEGRAM_ID_MAX - user_pk,
        "is_bot": False,
        "first_name": (name or "Operator")[:64],
    }


class Sandbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._pending: list[dict[str, Any]] = []
        self._chats: dict[int, Chat] = {}
        self._files: OrderedDict[str, SandboxFile] = OrderedDict()
        self._callbacks: dict[str, int] = {}  # callback query id -> chat id
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._last_poll = 0.0

    # --- the operator's side (a Telegram client) ----------------------------------------

    def say(self, user: dict[str, Any], text: str) -> int:
        """The operator sends `text` (a command when it starts with `/`); returns the update
        id."""
        content: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            command = text.split()[0]
            content["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self._user_message(user, content)

    def send_file(
        self, user: dict[str, Any], *, file_name: str, mime_type: str, content: bytes, photo: bool
    ) -> int:
        """The operator sends a file, as a document or (`photo`) as a photo; returns the update
        id. Raises `BotApiError` (413) past MAX_FILE_BYTES."""
        stored = self._store(file_name=file_name, mime_type=mime_type, content=content)
        attachment: dict[str, Any]
        if photo:
            attachment = {"photo": [self._photo_size(stored)]}
        else:
            attachment = {"document": self._document(stored)}
        return self._user_message(user, attachment)

    def press(self, user: dict[str, Any], message_id: int, data: str) -> int:
        """The operator presses the inline button `data` of the bot's message `message_id` in
        their chat; returns the update id. Raises `BotApiError` (400) when that message has
        no such button (Telegram shows only the buttons it has)."""
        with self._lock:
            chat = self._chats.get(user["id"])
            message = chat.messages.get(message_id) if chat is not None else None
            buttons = (
                [
                    button.get("callback_data")
                    for row in message.get("reply_markup", {}).get("inline_keyboard", [])
                    for button in row
                ]
                if message is not None and message.get("outgoing")
                else []
            )
            if data not in buttons:
                raise BotApiError(400, "Bad Request: that message has no such button")
            query_id = secrets.token_hex(8)
            update_id = next(self._update_ids)
            self._callbacks[query_id] = user["id"]
            while len(self._callbacks) > MAX_PENDING_UPDATES:  # presses nobody answered
                del self._callbacks[next(iter(self._callbacks))]
            origin = {k: v for k, v in message.items() if k != "outgoing"} if message else {}
            update = {
                "update_id": update_id,
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "chat_instance": str(user["id"]),
                    "data": data,
                    "message": origin,
                },
            }
            self._queue(update)
        self._wake()
        return update_id

    def transcript(self, user: dict[str, Any]) -> Transcript:
        with self._lock:
            chat = self._chats.get(user["id"])
            polling = time.monotonic() - self._last_poll < LONG_POLL_MAX_SECONDS + 5
            if chat is None:
                return Transcript(0, [], [], [], polling)
            return Transcript(
                chat.version,
                [dict(message) for message in chat.messages.values()],
                [list(row) for row in chat.keyboard],
                list(chat.notes),
                polling,
            )

    def file(self, file_id: str) -> SandboxFile | None:
        with self._lock:
            return self._files.get(file_id)

    # --- the bot's side (the Bot API) ---------------------------------------------------

    async def get_updates(self, *, offset: int, wait: float, limit: int) -> list[Any]:
        """Pending updates from `offset` on (older ones are confirmed and forgotten), waiting
        up to `wait` seconds (getUpdates' `timeout`, at most LONG_POLL_MAX_SECONDS) for the
        first one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(wait, LONG_POLL_MAX_SECONDS))
        limit = max(1, min(limit or 100, 100))
        while True:
            event = asyncio.Event()
            with self._lock:
                self._last_poll = time.monotonic()
                if offset:
                    self._pending = [u for u in self._pending if u["update_id"] >= offset]
                ready = self._pending[:limit]
                remaining = deadline - loop.time()
                if ready or remaining <= 0:
                    return ready
                self._waiters.append((loop, event))
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    self._waiters.remove((loop, event))

    def call(
        self, method: str, params: dict[str, Any], uploads: dict[str, tuple[str, bytes]]
    ) -> Any:
        """Any other Bot API method; `uploads` are multipart files by field name (file name,
        content). Raises `BotApiError` as Telegram would answer."""
        methods: dict[str, Callable[[dict[str, Any], Any], Any]] = {
            "getMe": self._get_me,
            "deleteWebhook": self._delete_webhook,
            "setWebhook": self._set_webhook,
            "sendMessage": self._send_message,
            "sendDocument": self._send_document,
            "sendPhoto": self._send_photo,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "answerCallbackQuery": self._answer_callback_query,
            "getFile": self._get_file,
        }
        handler = methods.get(method)
        if handler is None:
            raise BotApiError(404, f"Not Found: method {method} is not in the sandbox")
        return handler(params, uploads)

    def file_by_path(self, path: str) -> SandboxFile | None:
        with self._lock:
            return next((f for f in self._files.values() if f.path == path), None)

    def _get_me(self, params: dict[str, Any], uploads: Any) -> dict[str, Any]:
        return BOT_USER

    def _delete_webhook(self, params: dict[str, Any], uploads: Any) -> bool:
        return True

    def _set_webhook(self, params: dict[str, Any], uploads: Any) -> bool:
        raise BotApiError(400, "Bad Request: the sandbox serves getUpdates only (polling)")

    def _send_message(self, params: dict[str, Any], uploads: Any) -> dict[str, Any]:
        text = _text(params, "text", required=True)
        return self._bot_message(params, {"text": text})

    def _send_document(
        self, params: dict[str, Any], uploads: dict[str, tuple[str, bytes]]
    ) -> dict[str, Any]:
        stored = self._file_param(params, uploads, "document")
        return self._bot_message(
            params, {"document": self._document(stored), **self._caption(params)}
        )

    def _send_photo(
        self, params: dict[str, Any], uploads: dict[str, tuple[str, bytes]]
    ) -> dict[str, Any]:
        stored = self._file_param(params, uploads, "photo")
        return self._bot_message(
            params, {"photo": [self._photo_size(stored)], **self._caption(params)}
        )

    def _edit_message_text(self, params: dict[str, Any], uploads: Any) -> dict[str, Any]:
        text = _text(params, "text", required=True)
        # Telegram: an edit without reply_markup removes the inline keyboard.
        return self._edit(params, {"text": text}, _markup(params.get("reply_markup")))

    def _edit_message_reply_markup(self, params: dict[str, Any], uploads: Any) -> dict[str, Any]:
        return self._edit(params, {}, _markup(params.get("reply_markup")))

    def _delete_message(self, params: dict[str, Any], uploads: Any) -> bool:
        chat_id, message_id = _int(params, "chat_id"), _int(params, "message_id")
        with self._lock:
            chat = self._chat(chat_id)
            if chat.messages.pop(message_id, None) is None:
                raise BotApiError(400, "Bad Request: message to delete not found")
            chat.version += 1
        return True

    def _answer_callback_query(self, params: dict[str, Any], uploads: Any) -> bool:
        query_id = str(params.get("callback_query_id", ""))
        with self._lock:
            chat_id = self._callbacks.pop(query_id, None)
            if chat_id is None:
                raise BotApiError(400, "Bad Request: query is too old or query ID is invalid")
            note = _text(params, "text", required=False)
            chat = self._chats.get(chat_id)
            if chat is not None and note:
                chat.notes.append(note)
                chat.version += 1
        return True

    def _get_file(self, params: dict[str, Any], uploads: Any) -> dict[str, Any]:
        stored = self.file(str(params.get("file_id", "")))
        if stored is None:
            raise BotApiError(400, "Bad Request: invalid file_id")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.content),
            "file_path": stored.path,
        }

    # --- inside -------------------------------------------------------------------------

    def _chat(self, chat_id: int) -> Chat:
        """The chat `chat_id` (lock held). Raises `BotApiError` like Telegram for a chat
        nobody opened."""
        chat = self._chats.get(chat_id)
        if chat is None:
            raise BotApiError(400, "Bad Request: chat not found")
        return chat

    def _queue(self, update: dict[str, Any]) -> None:
        """Lock held."""
        self._pending.append(update)
        del self._pending[:-MAX_PENDING_UPDATES]

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(event.set)

    def _remember(self, chat: Chat, message: dict[str, Any]) -> None:
        """Lock held."""
        chat.messages[message["message_id"]] = message
        while len(chat.messages) > MAX_MESSAGES_PER_CHAT:
            chat.messages.popitem(last=False)
        chat.version += 1

    def _user_message(self, user: dict[str, Any], content: dict[str, Any]) -> int:
        with self._lock:
            chat = self._chats.setdefault(user["id"], Chat(user=user))
            message = {
                "message_id": next(self._message_ids),
                "date": int(time.time()),
                "chat": {"id": user["id"], "type": "private", "first_name": user["first_name"]},
                "from": user,
                **content,
            }
            self._remember(chat, {**message, "outgoing": False})
            update_id = next(self._update_ids)
            self._queue({"update_id": update_id, "message": message})
        self._wake()
        return update_id

    def _bot_message(self, params: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
        chat_id = _int(params, "chat_id")
        markup = _markup(params.get("reply_markup"))
        with self._lock:
            chat = self._chat(chat_id)
            message: dict[str, Any] = {
                "message_id": next(self._message_ids),
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private", "first_name": chat.user["first_name"]},
                "from": BOT_USER,
                **content,
            }
            if "inline_keyboard" in markup:
                message["reply_markup"] = {"inline_keyboard": markup["inline_keyboard"]}
            elif "keyboard" in markup:
                chat.keyboard = [
                    [str(b["text"] if isinstance(b, dict) else b) for b in row]
                    for row in markup["keyboard"]
                ]
            elif markup.get("remove_keyboard"):
                chat.keyboard = []
            self._remember(chat, {**message, "outgoing": True})
        return message

    def _edit(
        self, params: dict[str, Any], content: dict[str, Any], markup: dict[str, Any]
    ) -> dict[str, Any]:
        if params.get("inline_message_id"):
            raise BotApiError(400, "Bad Request: the sandbox has no inline messages")
        chat_id, message_id = _int(params, "chat_id"), _int(params, "message_id")
        with self._lock:
            chat = self._chat(chat_id)
            stored = chat.messages.get(message_id)
            if stored is None or not stored.get("outgoing"):
                raise BotApiError(400, "Bad Request: message to edit not found")
            stored.update(content)
            stored["edit_date"] = int(time.time())
            stored.pop("reply_markup", None)
            if "inline_keyboard" in markup:
                stored["reply_markup"] = {"inline_keyboard": markup["inline_keyboard"]}
            chat.version += 1
            return {k: v for k, v in stored.items() if k != "outgoing"}

    @staticmethod
    def _caption(params: dict[str, Any]) -> dict[str, Any]:
        caption = _text(params, "caption", required=False)
        return {"caption": caption} if caption else {}

    def _file_param(
        self, params: dict[str, Any], uploads: dict[str, tuple[str, bytes]], name: str
    ) -> SandboxFile:
        """A file named by id, or uploaded (multipart, directly or as `attach://<field>`)."""
        value = str(params.get(name, ""))
        field_name = value.removeprefix("attach://") if value.startswith("attach://") else name
        if field_name in uploads:
            file_name, content = uploads[field_name]
            return self._store(
                file_name=file_name, mime_type="application/octet-stream", content=content
            )
        stored = self.file(value)
        if stored is None:
            raise BotApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        return stored

    def _store(self, *, file_name: str, mime_type: str, content: bytes) -> SandboxFile:
        if len(content) > MAX_FILE_BYTES:
            raise BotApiError(413, "Request Entity Too Large")
        digest = hashlib.sha256(content).hexdigest()
        name = schemas.file_name_clean(file_name) or "file"
        file_id = f"SBX{secrets.token_urlsafe(24)}"
        stored = SandboxFile(
            file_id=file_id,
            file_unique_id=f"SBU{digest[:24]}",
            file_name=name,
            mime_type=schemas.mime_type_or_default(mime_type),
            content=content,
            path=f"documents/{file_id}/{_URL_UNSAFE.sub('_', name)[:80]}",
        )
        with self._lock:
            self._files[file_id] = stored
            total = sum(len(f.content) for f in self._files.values())
            while total > MAX_STORED_BYTES and len(self._files) > 1:
                _, dropped = self._files.popitem(last=False)
                total -= len(dropped.content)
        return stored

    @staticmethod
    def _document(stored: SandboxFile) -> dict[str, Any]:
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": stored.file_name,
            "mime_type": stored.mime_type,
            "file_size": len(stored.content),
        }

    @staticmethod
    def _photo_size(stored: SandboxFile) -> dict[str, Any]:
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "width": 1280,
            "height": 960,
            "file_size": len(stored.content),
        }


#: This process's sandbox (served only by the process whose bot polls it: `runtime`).
SANDBOX = Sandbox()
