"""Messenger wire format: client frames decoded and every field parsed by the shared parsers
(`common.parsers`, `input-policy.md`), and the rate limiter. Pure code, no Django.

A refusal is an `InvalidValue` naming the field (`field`) and why (`reason`); its `code` is the
field's stable error code of the `/ws/` protocol (`bad_room`, `bad_seq`, ...), which the consumer
puts in the `error` frame next to `field` and `reason`.
"""

import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from common import parsers
from common.parsers import InvalidValue

Frame = dict[str, Any]

MAX_SLUG_LENGTH = 80
MAX_CLIENT_ID_LENGTH = 64
MAX_REF_LENGTH = 64
MAX_TOPIC_LENGTH = 90
#: Frames are flat objects; anything nested deeper than this is refused before it is decoded.
MAX_FRAME_DEPTH = 8
#: Room slugs: Django's slug charset (what `Room.slug` and the REST `<slug:>` path accept).
SLUG_PATTERN = re.compile(r"[-A-Za-z0-9_]+")
#: Hub topics: a lowercase app name and up to five dotted parts (`betting.bets.42`).
TOPIC_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[A-Za-z0-9_-]+){0,5}")

#: The error code of each frame field; a value refused anywhere in a frame (also by the document
#: scan, e.g. a lone surrogate in `text`) is reported with its field's code.
FIELD_CODES = {
    "type": "unknown_type",
    "ref": "bad_ref",
    "room": "bad_room",
    "text": "bad_text",
    "client_id": "bad_client_id",
    "seq": "bad_seq",
    "after_seq": "bad_seq",
    "before_seq": "bad_seq",
    "limit": "bad_limit",
    "topic": "bad_topic",
}
# Sparq-compatible codes for the common mistakes with `text`.
_TEXT_CODES = {
    "required": "text_required",
    "type": "text_required",
    "blank": "text_required",
    "too_long": "text_too_long",
}
_DOCUMENT_CODES = {"too_large": "frame_too_large", "format": "bad_json", "too_deep": "bad_json"}


def _coded(error: InvalidValue, code: str) -> InvalidValue:
    error.code = code
    return error


def _top_field(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def frame_decode(raw: str | bytes, *, max_bytes: int) -> Frame:
    """One client frame: a JSON object of at most `max_bytes` UTF-8 bytes.

    Refuses oversized frames (`frame_too_large`), syntax errors and deep nesting (`bad_json`),
    invalid UTF-8 (`bad_frame`), lone surrogates or NUL in any string (the code of the field
    holding it, `bad_frame` for unknown keys) and anything but an object (`bad_frame`)."""
    # Surrogates cannot arrive in a WebSocket text frame, which the server decodes as UTF-8;
    # `surrogatepass` keeps this total, and the document parser refuses the bytes it produces.
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        document = parsers.json_document(
            data, field="frame", max_bytes=max_bytes, max_depth=MAX_FRAME_DEPTH
        )
    except InvalidValue as error:
        code = _DOCUMENT_CODES.get(error.reason)
        if code is None:
            code = FIELD_CODES.get(_top_field(error.field), "bad_frame")
        raise _coded(error, code) from None
    if not isinstance(document, dict):
        raise _coded(InvalidValue("frame", "type", "must be a JSON object"), "bad_frame")
    return document


def ref_salvage(raw: str | bytes) -> str | int | None:
    """The valid `ref` of a frame that `frame_decode` refused for a bad string in another
    field (reason `encoding` or `control`: the document itself is well-formed and shallow), so
    the error can still be correlated; None when there is none or it cannot be read."""
    try:
        document = json.loads(raw)
        return ref_field(document) if isinstance(document, dict) else None
    except (InvalidValue, ValueError, RecursionError):
        return None


def frame_type(frame: Frame, *, choices: Mapping[str, str]) -> str:
    """What `choices` maps the frame's `type` to; `bad_frame` when it is missing or not a
    string, `unknown_type` when it is not listed."""
    kind = frame.get("type")
    if not isinstance(kind, str):
        reason, message = ("required", "is required") if kind is None else ("type", "is not text")
        raise _coded(InvalidValue("type", reason, message), "bad_frame")
    try:
        return parsers.choice(kind, field="type", choices=choices)
    except InvalidValue as error:
        raise _coded(error, "unknown_type") from None


def ref_field(frame: Frame) -> str | int | None:
    """The client's `ref`, echoed in replies: absent/null, clean text of at most 64 characters,
    or an integer within int64 (`bad_ref` otherwise; the refusal itself echoes no ref)."""
    ref = frame.get("ref")
    try:
        if ref is None:
            return None
        if isinstance(ref, int) and not isinstance(ref, bool):
            return parsers.integer(
                ref, field="ref", min_value=parsers.INT64_MIN, max_value=parsers.INT64_MAX
            )
        if isinstance(ref, str):
            return parsers.text(ref, field="ref", max_length=MAX_REF_LENGTH)
        raise InvalidValue("ref", "type", "must be a string or an integer")
    except InvalidValue as error:
        raise _coded(error, "bad_ref") from None


def room_field(frame: Frame, *, required: bool = True) -> str | None:
    """A room slug (`[-A-Za-z0-9_]`, at most 80); None when absent and not `required`."""
    room = frame.get("room")
    if room is None and not required:
        return None
    try:
        return parsers.identifier(
            room, field="room", max_length=MAX_SLUG_LENGTH, pattern=SLUG_PATTERN
        )
    except InvalidValue as error:
        raise _coded(error, "bad_room") from None


def text_field(frame: Frame, *, max_chars: int) -> str:
    """Message text: clean multi-line Unicode (tab and newlines allowed, no other controls, no
    lone surrogates), not only whitespace, at most `max_chars` code points; kept as sent."""
    try:
        text = parsers.text(frame.get("text"), field="text", max_length=max_chars, multiline=True)
    except InvalidValue as error:
        raise _coded(error, _TEXT_CODES.get(error.reason, "bad_text")) from None
    if not text.strip():
        raise _coded(InvalidValue("text", "blank", "must not be blank"), "text_required")
    return text


def client_id_field(frame: Frame) -> str | None:
    """The sender's idempotency key: an identifier (`[A-Za-z0-9._:-]`, at most 64) or None."""
    client_id = frame.get("client_id")
    if client_id is None:
        return None
    try:
        return parsers.identifier(client_id, field="client_id", max_length=MAX_CLIENT_ID_LENGTH)
    except InvalidValue as error:
        raise _coded(error, "bad_client_id") from None


def seq_field(frame: Frame, name: str, *, required: bool) -> int | None:
    """A message sequence number: a non-negative integer within int64 (a JSON integer or ASCII
    digits); None when absent and not `required`."""
    value = frame.get(name)
    if value is None and not required:
        return None
    try:
        return parsers.integer(value, field=name)
    except InvalidValue as error:
        raise _coded(error, "bad_seq") from None


def limit_field(frame: Frame, *, maximum: int) -> int:
    """A page size: a positive integer within int64, capped at `maximum` (the default)."""
    value = frame.get("limit")
    if value is None:
        return maximum
    try:
        return min(parsers.integer(value, field="limit", min_value=1), maximum)
    except InvalidValue as error:
        raise _coded(error, "bad_limit") from None


def topic_parse(value: object, *, field: str = "topic") -> str:
    """A hub topic name (`TOPIC_PATTERN`, at most 90 characters); `bad_topic` otherwise."""
    try:
        return parsers.identifier(
            value, field=field, max_length=MAX_TOPIC_LENGTH, pattern=TOPIC_PATTERN
        )
    except InvalidValue as error:
        raise _coded(error, "bad_topic") from None


def topic_field(frame: Frame) -> str:
    return topic_parse(frame.get("topic"))


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


class Violation:
    """How long a connection has been over its rate limit: a violation starts with a refused
    frame and lasts while refused frames follow each other less than `GAP` seconds apart."""

    GAP = 1.0

    __slots__ = ("last", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.last = 0.0

    def refused(self, now: float | None = None) -> float:
        """Record a refused frame; returns the seconds the current violation has lasted."""
        now = time.monotonic() if now is None else now
        if self.since is None or now - self.last >= self.GAP:
            self.since = now
        self.last = now
        return now - self.since


#: A browser origin compared whole: scheme, host (lower case, IPv6 in brackets) and port.
Origin = tuple[str, str, int]
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_PATTERN = re.compile(r"[a-z0-9._-]+|\[[0-9a-f:.]+\]")


def origin_parse(value: str) -> Origin | None:
    """An `Origin` header (`scheme://host[:port]`, http or https) as (scheme, host, port), the
    scheme's default port filled in; None for anything else (`null`, paths, credentials, bad
    ports)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or parts.hostname is None:
        return None
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if not _HOST_PATTERN.fullmatch(host):
        return None
    return parts.scheme, host, port if port is not None else DEFAULT_PORTS[parts.scheme]


def host_origin(host_header: str, scheme: str) -> Origin | None:
    """The origin a page served by this request's `Host` (`host[:port]`) under `scheme` has;
    None for a malformed Host."""
    host, port = host_header.lower(), ""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        host, rest = host[: end + 1], host[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif ":" in host:
        host, port = host.rsplit(":", 1)
    if not _HOST_PATTERN.fullmatch(host) or (port and not (port.isascii() and port.isdigit())):
        return None
    number = int(port) if port else DEFAULT_PORTS[scheme]
    return (scheme, host, number) if 0 < number < 65536 else None
