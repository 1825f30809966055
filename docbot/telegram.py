"""Synchronous Bot API calls the backend and the workers make (the bot process uses
python-telegram-bot instead): getFile, the streamed file download, sendMessage."""

import functools
import time
from collections.abc import Callable
from typing import IO, Any, ParamSpec, TypeVar

import httpx
from django.conf import settings

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
    return f"{settings.TELEGRAM_API_BASE_URL}{settings.TELEGRAM_BOT_TOKEN}/{method}"


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
    url = f"{settings.TELEGRAM_FILE_BASE_URL}{settings.TELEGRAM_BOT_TOKEN}/{file_path}"
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
