"""A fake Telegram Bot API server on loopback (aiohttp in its own thread and event loop).

It speaks the Bot API methods docbot uses (getMe, getUpdates with long polling, sendMessage,
sendDocument, sendPhoto, editMessageText, answerCallbackQuery, getFile, file download,
setWebhook, deleteWebhook), records every call the bot made, and builds updates for tests:
queued for getUpdates (polling) or POSTed to the registered webhook (with its secret).

`hold_replies` keeps the bot's sendMessage calls to some chats in flight (recorded as sent, the
answer not given) until `release_replies`: the bot is then dying mid-reply whenever the test
kills it. The held answer trickles JSON whitespace, so the client's read timeout never ends the
call on its own."""

import asyncio
import contextlib
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from aiohttp import web

BOT_USER = {"id": 700000001, "is_bot": True, "first_name": "Docbot", "username": "docbot_test_bot"}


def _chat_of(params: dict[str, Any]) -> int | None:
    try:
        return int(params["chat_id"])
    except (KeyError, TypeError, ValueError):
        return None


def _update_id(update: Any, default: int) -> int:
    value = update.get("update_id") if isinstance(update, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    upload: bytes | None = None
    #: the label of the base URL the caller used (`base_url_for`), "" for `base_url`
    caller: str = ""

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None

    @property
    def text(self) -> str:
        return str(self.params.get("text") or self.params.get("caption") or "")

    @property
    def markup(self) -> dict[str, Any]:
        raw = self.params.get("reply_markup")
        if isinstance(raw, str):
            return dict(json.loads(raw))
        return dict(raw or {})

    def buttons(self) -> list[tuple[str, str]]:
        """(text, callback_data) of every inline button."""
        return [
            (button["text"], button.get("callback_data", ""))
            for row in self.markup.get("inline_keyboard", [])
            for button in row
        ]


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    content: bytes
    path: str


@dataclass
class FakeTelegram:
    token: str = "123456:TEST-token"
    calls: list[Call] = field(default_factory=list)
    files: dict[str, StoredFile] = field(default_factory=dict)
    webhook_url: str = ""
    webhook_secret: str = ""
    fail_methods: dict[str, int] = field(default_factory=dict)
    port: int = 0
    #: every getUpdates call as (monotonic time, offset asked for)
    polls: list[tuple[float, int]] = field(default_factory=list)
    #: the caller of every getUpdates: the label of the base URL it used (`base_url_for`)
    pollers: list[str] = field(default_factory=list)
    #: getUpdates calls being answered now, by caller label
    polls_in_flight: dict[str, int] = field(default_factory=dict)
    #: every getUpdates answered: (caller label, monotonic start, monotonic end)
    poll_spans: list[tuple[str, float, float]] = field(default_factory=list)
    #: (new, other): a getUpdates that arrived while another caller's was being answered
    #: (Telegram serves one getUpdates loop per bot)
    overlaps: list[tuple[str, str]] = field(default_factory=list)
    #: while set, getUpdates answers this (HTTP status, raw body) instead of updates
    get_updates_fault: tuple[int, bytes] | None = None
    #: sendMessage calls to these chats (from `_held_caller`'s label, or anyone's when None) are
    #: recorded and then kept in flight until `release_replies`
    _held_chats: set[int] = field(default_factory=set)
    #: the chats of held sendMessage calls whose caller hung up before the answer (it died, or
    #: its handler was cancelled)
    hung_up: list[int] = field(default_factory=list)
    _held_caller: str | None = None
    _release: asyncio.Event | None = None
    _pending: list[Any] = field(default_factory=list)
    _update_ids: Any = field(default_factory=lambda: itertools.count(1000))
    _message_ids: Any = field(default_factory=lambda: itertools.count(1))
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _closing: bool = False
    _loop: asyncio.AbstractEventLoop | None = None
    _new_update: asyncio.Event | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "FakeTelegram":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._new_update = asyncio.Event()
            self._release = asyncio.Event()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/bot{token}/{method}", self._method)
            app.router.add_route("*", "/{label}/bot{token}/{method}", self._method)
            app.router.add_get("/file/bot{token}/{path:.+}", self._download)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.SockSite(self._runner, sock)
            loop.run_until_complete(site.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-telegram", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            # Pending long polls return at once, so the server's cleanup need not wait for them.
            self._loop.call_soon_threadsafe(self._release_polls)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _release_polls(self) -> None:
        self._closing = True
        if self._new_update is not None:
            self._new_update.set()
        if self._release is not None:
            self._release.set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def base_url_for(self, label: str) -> str:
        """`base_url` under which the calls are recorded as `label`'s (one per bot process)."""
        return f"http://127.0.0.1:{self.port}/{label}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- what tests feed in ---------------------------------------------------------------

    def add_file(self, content: bytes, *, name: str = "file.pdf") -> StoredFile:
        digest = hashlib.sha1(content).hexdigest()[:12]
        index = len(self.files) + 1
        stored = StoredFile(
            file_id=f"FILE{index}-{digest}",
            file_unique_id=f"U{digest}{index}",
            content=content,
            path=f"documents/file_{index}_{name}",
        )
        self.files[stored.file_id] = stored
        return stored

    def _user(self, user_id: int) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": f"U{user_id}"}

    def _message(
        self, user_id: int, *, chat: dict[str, Any] | None = None, **content: Any
    ) -> dict[str, Any]:
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat or {"id": user_id, "type": "private"},
            "from": self._user(user_id),
            **content,
        }

    def next_update_id(self) -> int:
        return int(next(self._update_ids))

    def text_update(
        self,
        user_id: int,
        text: str,
        *,
        chat: dict[str, Any] | None = None,
        kind: str = "message",
    ) -> dict[str, Any]:
        """A text message from `user_id`; `chat` (default: the user's private chat) and `kind`
        (`edited_message`, `channel_post`...) build the other shapes Telegram sends."""
        content: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            command = text.split()[0]
            content["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        message = self._message(user_id, chat=chat, **content)
        if kind in {"channel_post", "edited_channel_post"}:
            message.pop("from")
            message["sender_chat"] = message["chat"]
        if kind.startswith("edited_"):
            message["edit_date"] = message["date"]
        return {"update_id": next(self._update_ids), kind: message}

    def message_update(self, user_id: int, **content: Any) -> dict[str, Any]:
        """A private message with arbitrary content (`voice=...`, `sticker=...`)."""
        return {"update_id": next(self._update_ids), "message": self._message(user_id, **content)}

    def document_update(
        self, user_id: int, stored: StoredFile, *, mime_type: str = "application/pdf"
    ) -> dict[str, Any]:
        document = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.content),
            "file_name": stored.path.rsplit("/", 1)[-1],
            "mime_type": mime_type,
        }
        return {
            "update_id": next(self._update_ids),
            "message": self._message(user_id, document=document),
        }

    def photo_update(self, user_id: int, stored: StoredFile) -> dict[str, Any]:
        sizes = [
            {
                "file_id": f"{stored.file_id}-thumb",
                "file_unique_id": "thumb",
                "width": 90,
                "height": 90,
                "file_size": 100,
            },
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "width": 1280,
                "height": 960,
                "file_size": len(stored.content),
            },
        ]
        return {"update_id": next(self._update_ids), "message": self._message(user_id, photo=sizes)}

    def callback_update(
        self,
        user_id: int,
        data: str,
        message_id: int = 1,
        *,
        chat: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "update_id": next(self._update_ids),
            "callback_query": {
                "id": f"cb{next(self._message_ids)}",
                "from": self._user(user_id),
                "chat_instance": str(user_id),
                "data": data,
                "message": {
                    "message_id": message_id,
                    "date": int(time.time()),
                    "chat": chat or {"id": user_id, "type": "private"},
                    "from": BOT_USER,
                    "text": "menu",
                },
            },
        }

    def answers(self, callback_query_id: str) -> list[Call]:
        """The answerCallbackQuery calls for one button press."""
        return [
            c
            for c in self.sent("answerCallbackQuery")
            if c.params["callback_query_id"] == callback_query_id
        ]

    def push(self, update: Any) -> Any:
        """Queue an update for getUpdates (polling mode); any JSON value, even a broken one."""
        assert self._loop is not None and self._new_update is not None
        with self._changed:
            self._pending.append(update)
        self._loop.call_soon_threadsafe(self._new_update.set)
        return update

    def hold_replies(self, chat_ids: set[int], *, caller: str | None = None) -> None:
        """From now on, sendMessage calls to `chat_ids` (made through `base_url_for(caller)`,
        or by anyone when `caller` is None) are recorded and then left unanswered, the
        connection kept busy, until `release_replies`."""
        assert self._loop is not None and self._release is not None
        with self._changed:
            self._held_chats = set(chat_ids)
            self._held_caller = caller
        self._loop.call_soon_threadsafe(self._release.clear)

    def release_replies(self) -> None:
        """Answer the held calls (those whose caller is still there) and hold no more."""
        assert self._loop is not None and self._release is not None
        with self._changed:
            self._held_chats = set()
        self._loop.call_soon_threadsafe(self._release.set)

    def deliver(self, update: dict[str, Any], *, secret: str | None = None) -> httpx.Response:
        """POST an update to the registered webhook like Telegram does (webhook mode)."""
        assert self.webhook_url, "no webhook registered"
        headers = {
            "X-Telegram-Bot-Api-Secret-Token": self.webhook_secret if secret is None else secret
        }
        return httpx.post(self.webhook_url, json=update, headers=headers, timeout=30)

    # --- what tests read back -------------------------------------------------------------

    def sent(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        with self._changed:
            return [
                c
                for c in self.calls
                if (method is None or c.method == method)
                and (chat_id is None or c.chat_id == chat_id)
            ]

    def mark(self) -> int:
        with self._changed:
            return len(self.calls)

    def wait_for(
        self, predicate: Callable[[Call], bool], *, timeout: float = 30, since: int = 0
    ) -> Call:
        """The first recorded call (from index `since`) matching `predicate`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for call in self.calls[since:]:
                    if predicate(call):
                        return call
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(c.method, c.text[:60]) for c in self.calls[-10:]]
                    raise AssertionError(f"no matching Bot API call; last calls: {seen}")
                self._changed.wait(remaining)

    def wait_text(
        self, chat_id: int, fragment: str, *, timeout: float = 30, since: int = 0
    ) -> Call:
        return self.wait_for(
            lambda c: c.chat_id == chat_id and fragment in c.text, timeout=timeout, since=since
        )

    def clear(self) -> None:
        with self._changed:
            self.calls.clear()

    # --- the server -----------------------------------------------------------------------

    def _record(self, call: Call) -> None:
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    async def _params(self, request: web.Request) -> tuple[dict[str, Any], bytes | None]:
        upload: bytes | None = None
        if request.content_type == "application/json":
            return dict(await request.json()), None
        if request.content_type.startswith("multipart/"):
            params: dict[str, Any] = {}
            reader = await request.multipart()
            async for part in reader:
                if part.filename:  # type: ignore[union-attr]
                    upload = bytes(await part.read())  # type: ignore[union-attr]
                    params[part.name or "file"] = f"attach://{part.filename}"  # type: ignore[union-attr]
                else:
                    params[part.name or ""] = await part.text()  # type: ignore[union-attr]
            return params, upload
        form = await request.post()
        return {key: value for key, value in form.items()}, None

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(code: int, description: str) -> web.Response:
        return web.json_response(
            {"ok": False, "error_code": code, "description": description}, status=code
        )

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        label = request.match_info.get("label", "")
        params, upload = await self._params(request)
        if method != "getUpdates":
            self._record(Call(method, params, time.monotonic(), upload, caller=label))
        if self.fail_methods.get(method, 0) > 0:
            self.fail_methods[method] -= 1
            return self._error(502, "Bad Gateway")
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, f"Not Found: method {method}")
        if method != "getUpdates":
            response: web.Response = await handler(params, upload)
            if method == "sendMessage" and self._holds(params, label):
                # aiohttp serves any StreamResponse; `_method` keeps its narrower type for the
                # subclasses that wrap it (bench/scaleout.py).
                return cast(web.Response, await self._held(request, response, _chat_of(params)))
            return response
        started = time.monotonic()
        with self._changed:
            self.pollers.append(label)
            self.overlaps += [
                (label, o) for o, n in self.polls_in_flight.items() if n and o != label
            ]
            self.polls_in_flight[label] = self.polls_in_flight.get(label, 0) + 1
        try:
            response = await handler(params, upload)
        finally:
            with self._changed:
                self.polls_in_flight[label] -= 1
                self.poll_spans.append((label, started, time.monotonic()))
        return response

    def _holds(self, params: dict[str, Any], label: str) -> bool:
        with self._changed:
            if self._held_caller is not None and label != self._held_caller:
                return False
            return _chat_of(params) in self._held_chats

    async def _held(
        self, request: web.Request, answer: web.Response, chat_id: int | None
    ) -> web.StreamResponse:
        """`answer`, once `release_replies` is called; meanwhile a space every 0.2 s (JSON
        allows leading whitespace) keeps the client's read timeout from ending the call, and
        shows when the caller hangs up (`hung_up`)."""
        assert self._release is not None
        held = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await held.prepare(request)
            while not self._release.is_set():
                await held.write(b" ")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), 0.2)
            assert isinstance(answer.body, bytes)
            await held.write(answer.body)
            await held.write_eof()
        except (ConnectionError, RuntimeError):  # the caller is gone
            with self._changed:
                self.hung_up.append(chat_id if chat_id is not None else 0)
                self._changed.notify_all()
        return held

    def wait_hung_up(self, chat_id: int, *, timeout: float = 30) -> None:
        """Until the caller of a held reply to `chat_id` has hung up."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while chat_id not in self.hung_up:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the held reply to {chat_id} is still awaited")
                self._changed.wait(remaining)

    async def _m_getMe(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        return self._ok(BOT_USER)

    async def _m_getUpdates(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        assert self._new_update is not None
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        with self._changed:
            self.polls.append((time.monotonic(), offset))
        if self.get_updates_fault is not None:
            status, body = self.get_updates_fault
            return web.Response(status=status, body=body, content_type="application/json")
        while True:
            with self._changed:
                # Like Telegram, an offset confirms every update below it; an item without a
                # usable id (only a broken fake would send one) is never confirmed.
                self._pending = [u for u in self._pending if _update_id(u, offset) >= offset]
                ready = list(self._pending)
            if ready or time.monotonic() >= deadline or self._closing:
                return self._ok(ready)
            self._new_update.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_update.wait(), deadline - time.monotonic())

    def _sent_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": BOT_USER,
            **content,
        }

    async def _m_sendMessage(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        return self._ok(self._sent_message(params, text=params.get("text", "")))

    def _file_for(self, value: str, upload: bytes | None) -> StoredFile | None:
        if upload is not None:
            return self.add_file(upload, name="upload.bin")
        return self.files.get(value)

    async def _m_sendDocument(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        stored = self._file_for(str(params.get("document", "")), upload)
        if stored is None:
            return self._error(400, "Bad Request: wrong file identifier/HTTP URL specified")
        document = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id}
        return self._ok(self._sent_message(params, document=document))

    async def _m_sendPhoto(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        stored = self._file_for(str(params.get("photo", "")), upload)
        if stored is None:
            return self._error(400, "Bad Request: wrong file identifier/HTTP URL specified")
        photo = [
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "width": 1280,
                "height": 960,
            }
        ]
        return self._ok(self._sent_message(params, photo=photo))

    async def _m_editMessageText(
        self, params: dict[str, Any], upload: bytes | None
    ) -> web.Response:
        message = self._sent_message(params, text=params.get("text", ""))
        message["message_id"] = int(params.get("message_id") or message["message_id"])
        return self._ok(message)

    async def _m_answerCallbackQuery(
        self, params: dict[str, Any], upload: bytes | None
    ) -> web.Response:
        return self._ok(True)

    async def _m_getFile(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        stored = self.files.get(str(params.get("file_id", "")))
        if stored is None:
            return self._error(400, "Bad Request: invalid file_id")
        return self._ok(
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "file_size": len(stored.content),
                "file_path": stored.path,
            }
        )

    async def _m_setWebhook(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        self.webhook_url = str(params.get("url", ""))
        self.webhook_secret = str(params.get("secret_token", ""))
        return self._ok(True)

    async def _m_deleteWebhook(self, params: dict[str, Any], upload: bytes | None) -> web.Response:
        self.webhook_url = ""
        return self._ok(True)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        path = request.match_info["path"]
        self._record(Call("downloadFile", {"file_path": path}, time.monotonic()))
        stored = next((f for f in self.files.values() if f.path == path), None)
        if stored is None:
            return self._error(404, "Not Found")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(stored.content)
        await response.prepare(request)
        view = memoryview(stored.content)
        for start in range(0, len(view), 256 * 1024):
            await response.write(view[start : start + 256 * 1024])
        await response.write_eof()
        return response
