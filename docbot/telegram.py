"""Which Bot API this installation talks to (`bot_api`: Telegram's with TELEGRAM_BOT_TOKEN, or
the built-in sandbox), and the synchronous Bot API calls the backend and the workers make (the
bot process uses python-telegram-bot instead): getFile, the streamed file download,
sendMessage."""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, ParamSpec, TypeVar

import httpx
from django.conf import settings
from django.utils.crypto import salted_hmac

from common.exceptions import Unavailable
from common.metrics import INTEGRATION_CALL_SECONDS

P = ParamSpec("P")
R = TypeVar("R")

CHUNK_BYTES = 64 * 1024
_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class TelegramUnavailable(Unavailable):
    """A transport failure or a 5xx/429 from the Bot API: worth retrying."""

    code = "telegram_unavailable"


class TelegramRejected(Unavailable):
    """The Bot API refused the call (4xx): retrying will not help."""

    code = "telegram_rejected"


#: The sandbox's bot (`getMe`); its token starts with this id, as Telegram's do.
SANDBOX_BOT_ID = 7_000_000_001
#: Where the sandbox is served on the web app: the chat page, `bot<token>/<method>` and
#: `file/bot<token>/<path>` below it.
SANDBOX_PATH = "/docbot/sandbox/"


@dataclass(frozen=True)
class BotApi:
    """A Bot API to talk to: python-telegram-bot's `token`, `base_url` and `base_file_url`
    (method URLs are `<base_url><token>/<method>`, files `<base_file_url><token>/<path>`)."""

    token: str
    base_url: str
    base_file_url: str
    sandbox: bool = False


def sandbox_enabled() -> bool:
    """True when no TELEGRAM_BOT_TOKEN is set and DOCBOT_SANDBOX is on (by default when
    DJANGO_DEBUG is): the bot then talks to the built-in sandbox instead of Telegram."""
    return not settings.TELEGRAM_BOT_TOKEN and bool(settings.DOCBOT_SANDBOX)


def sandbox_token() -> str:
    """The sandbox bot's token: an HMAC of SECRET_KEY, so the web process serving the sandbox,
    the bot and the workers of one installation all compute the same one, and nobody without
    the key can read the operators' chats through the Bot API methods."""
    digest = salted_hmac("docbot.sandbox", "bot-token", algorithm="sha256").hexdigest()
    return f"{SANDBOX_BOT_ID}:{digest[:40]}"


def bot_api() -> BotApi | None:
    """Telegram (TELEGRAM_API_BASE_URL / TELEGRAM_FILE_BASE_URL with TELEGRAM_BOT_TOKEN) when a
    token is set; else the sandbox on the web app at DOCBOT_BACKEND_URL when it is enabled;
    else None (the bot is off)."""
    if settings.TELEGRAM_BOT_TOKEN:
        return BotApi(
            settings.TELEGRAM_BOT_TOKEN,
            settings.TELEGRAM_API_BASE_URL,
            settings.TELEGRAM_FILE_BASE_URL,
        )
    if not sandbox_enabled():
        return None
    base = settings.DOCBOT_BACKEND_URL.rstrip("/") + SANDBOX_PATH
    return BotApi(sandbox_token(), f"{base}bot", f"{base}file/bot", sandbox=True)


def _bot_api() -> BotApi:
    api = bot_api()
    if api is None:
        raise TelegramRejected("no Bot API: TELEGRAM_BOT_TOKEN is not set and the sandbox is off")
    return api


def _timed(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = func(*args, **kwargs)
                outcome = "ok"
                return result
            finally:
                INTEGRATION_CALL_SECONDS.labels("telegram", operation, outcome).observe(
                    time.perf_counter() - started
                )

        return wrapper

    return decorate


def _method_url(method: str) -> str:
    api = _bot_api()
    return f"{api.base_url}{api.token}/{method}"


def _call(method: str, payload: dict[str, Any]) -> Any:
    try:
        response = httpx.post(_method_url(method), json=payload, timeout=_TIMEOUT)
    except httpx.TransportError as exc:
        raise TelegramUnavailable(f"{method}: {exc!r}") from exc
    if response.status_code == 429 or response.status_code >= 500:
        raise TelegramUnavailable(f"{method}: HTTP {response.status_code}")
    body = response.json()
    if not body.get("ok"):
        raise TelegramRejected(f"{method}: {body.get('description', response.status_code)}")
    return body["result"]


@_timed("getFile")
def get_file_path(file_id: str) -> str:
    result = _call("getFile", {"file_id": file_id})
    return str(result["file_path"])


@_timed("downloadFile")
def download_into(file_path: str, sink: IO[bytes], *, max_bytes: int) -> None:
    """Stream the file into `sink` chunk by chunk (never whole in memory); refuse oversize."""
    api = _bot_api()
    url = f"{api.base_file_url}{api.token}/{file_path}"
    written = 0
    try:
        with httpx.stream("GET", url, timeout=_TIMEOUT) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise TelegramUnavailable(f"download: HTTP {response.status_code}")
            if response.status_code != 200:
                raise TelegramRejected(f"download: HTTP {response.status_code}")
            for chunk in response.iter_bytes(CHUNK_BYTES):
                written += len(chunk)
                if written > max_bytes:
                    raise TelegramRejected("download: file larger than the limit")
                sink.write(chunk)
    except httpx.TransportError as exc:
        raise TelegramUnavailable(f"download: {exc!r}") from exc


@_timed("sendMessage")
def send_message(chat_id: int, text: str) -> None:
    _call("sendMessage", {"chat_id": chat_id, "text": text})
