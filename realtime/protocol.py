"""Messenger wire format: field validation of client frames and the rate limiter. Pure code."""

import time
from typing import Any

from common.exceptions import ValidationFailed

Frame = dict[str, Any]

MAX_SLUG_LENGTH = 80
MAX_CLIENT_ID_LENGTH = 64


def room_field(frame: Frame, *, required: bool = True) -> str | None:
    room = frame.get("room")
    if room is None and not required:
        return None
    if not isinstance(room, str) or not room or len(room) > MAX_SLUG_LENGTH:
        raise ValidationFailed("room must be a room slug", code="bad_room")
    return room


def text_field(frame: Frame, *, max_chars: int) -> str:
    text = frame.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValidationFailed("text is required", code="text_required")
    if len(text) > max_chars:
        raise ValidationFailed(f"text is longer than {max_chars} characters", code="text_too_long")
    return text


def client_id_field(frame: Frame) -> str | None:
    client_id = frame.get("client_id")
    if client_id is None:
        return None
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID_LENGTH:
        raise ValidationFailed("client_id must be a short string", code="bad_client_id")
    return client_id


def seq_field(frame: Frame, name: str, *, required: bool) -> int | None:
    value = frame.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationFailed(f"{name} must be a non-negative integer", code="bad_seq")
    return value


def limit_field(frame: Frame, *, maximum: int) -> int:
    value = frame.get("limit", maximum)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationFailed("limit must be a positive integer", code="bad_limit")
    return min(value, maximum)


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` is False when empty."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
