"""The agent wire protocol: pure encode, decode and validation (no Django, no sockets).

Line-delimited UTF-8 JSON, one object per line, at most `MAX_FRAME_BYTES` per frame including the
newline. Every frame has a `type`; requests may carry a client-chosen `id` that replies echo.
The full description lives in vmcontrol/PROTOCOL.md.

Every value an agent sends is judged by the shared parsers (`common.parsers`,
`input-policy.md`): the line by `json_document`, names and secrets by `text`, ids and tokens by
`identifier`, counts and sizes by `integer` within their column's range. A refused value becomes
a `ProtocolError` naming the field (`inventory.disks[0].name`) and the parser's reason, and
`decode_frame` returns a *normalised* frame holding every field of its type (absent optional
fields are None), so handlers never look up a key that may be missing.
"""

import json
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

from common import parsers
from common.parsers import InvalidValue

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_ID_LENGTH = 64
MAX_TYPE_LENGTH = 32
MAX_NAME_LENGTH = 64
MAX_SECRET_LENGTH = 256
MAX_TOKEN_LENGTH = 256
MAX_ERROR_MESSAGE_LENGTH = 1024
MAX_DISKS = 64
MAX_CPU_CORES = 1024
MAX_RAM_MB = 64 * 1024 * 1024
MAX_DISK_GB = 1024 * 1024

Frame = dict[str, Any]

# Error codes sent in `error` frames.
BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
FRAME_TOO_LARGE = "frame_too_large"
NOT_AUTHORIZED = "not_authorized"
AUTH_FAILED = "auth_failed"
UNSUPPORTED_VERSION = "unsupported_version"
ALREADY_AUTHORIZED = "already_authorized"
UNKNOWN_COMMAND = "unknown_command"
INTERNAL = "internal"
RATE_LIMITED = "rate_limited"
TOO_MANY_ATTEMPTS = "too_many_attempts"
TIMEOUT = "timeout"


class ProtocolError(Exception):
    """A frame the server refuses; `close` says whether the connection must end after the
    error frame (framing is lost or the peer is hostile). `frame_id` is the request's id, set
    only once that id itself was validated; `field` and `reason` name the refused value."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        frame_id: Any = None,
        close: bool = False,
        field: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        self.close = close
        self.field = field
        self.reason = reason

    @classmethod
    def invalid(cls, error: InvalidValue, *, frame_id: Any = None) -> "ProtocolError":
        """The `bad_frame` refusal of a value a shared parser refused."""
        return cls(
            BAD_FRAME, error.message, frame_id=frame_id, field=error.field, reason=error.reason
        )


@dataclass(frozen=True)
class Disk:
    name: str
    size_gb: int


@dataclass(frozen=True)
class Inventory:
    cpu_cores: int
    ram_mb: int
    disks: tuple[Disk, ...]

    def as_dict(self) -> Frame:
        return {
            "cpu_cores": self.cpu_cores,
            "ram_mb": self.ram_mb,
            "disks": [{"name": d.name, "size_gb": d.size_gb} for d in self.disks],
        }


# --- values ---------------------------------------------------------------------------------


def _count(value: Any, field: str, *, low: int, high: int) -> int:
    """A JSON integer (never a string, float or bool) within `low..high`."""
    return parsers.integer(value, field=field, min_value=low, max_value=high, strings=False)


def _optional(value: Any, parse: Callable[..., Any], field: str, **options: Any) -> Any:
    return None if value is None else parse(value, field=field, **options)


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if not isinstance(value, dict):
        raise InvalidValue(field, "type", "must be an object")
    return value


def _boolean(value: Any, field: str) -> bool:
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if not isinstance(value, bool):
        raise InvalidValue(field, "type", "must be true or false")
    return value


def frame_id_parse(value: Any) -> str | int | None:
    """A request id: an identifier of at most `MAX_ID_LENGTH` characters or a non-negative
    int64. Checked before anything else, because every reply echoes it."""
    if value is None:
        return None
    if isinstance(value, str):
        return parsers.identifier(value, field="id", max_length=MAX_ID_LENGTH)
    if isinstance(value, int) and not isinstance(value, bool):
        return parsers.integer(value, field="id", strings=False)
    raise InvalidValue("id", "type", "must be a string or an integer")


def _inventory(value: Any, field: str) -> Inventory:
    raw = _object(value, field)
    cpu = _count(raw.get("cpu_cores"), f"{field}.cpu_cores", low=1, high=MAX_CPU_CORES)
    ram = _count(raw.get("ram_mb"), f"{field}.ram_mb", low=1, high=MAX_RAM_MB)
    raw_disks = raw.get("disks")
    if raw_disks is None:
        raw_disks = []
    if not isinstance(raw_disks, list):
        raise InvalidValue(f"{field}.disks", "type", "must be a list")
    if len(raw_disks) > MAX_DISKS:
        raise InvalidValue(f"{field}.disks", "too_long", f"holds more than {MAX_DISKS} disks")
    disks: list[Disk] = []
    for index, raw_disk in enumerate(raw_disks):
        path = f"{field}.disks[{index}]"
        disk = _object(raw_disk, path)
        disks.append(
            Disk(
                name=parsers.text(
                    disk.get("name"), field=f"{path}.name", max_length=MAX_NAME_LENGTH
                ),
                size_gb=_count(disk.get("size_gb"), f"{path}.size_gb", low=0, high=MAX_DISK_GB),
            )
        )
    if len({d.name for d in disks}) != len(disks):
        raise InvalidValue(f"{field}.disks", "format", "disk names must be unique")
    return Inventory(cpu_cores=cpu, ram_mb=ram, disks=tuple(disks))


def inventory_parse(value: Any, *, field: str = "inventory", frame_id: Any = None) -> Inventory:
    """Validate an inventory object (`field` names it in errors); disk names must be unique.
    Raises ProtocolError(`bad_frame`) naming the refused value."""
    try:
        return _inventory(value, field)
    except InvalidValue as error:
        raise ProtocolError.invalid(error, frame_id=frame_id) from None


# --- frames ---------------------------------------------------------------------------------


def _hello(raw: Frame) -> Frame:
    return {
        "protocol": _count(raw.get("protocol"), "protocol", low=0, high=parsers.INT32_MAX),
        "vm_id": _optional(raw.get("vm_id"), _count_id, "vm_id"),
        "inventory": _optional(raw.get("inventory"), _inventory_field, "inventory"),
    }


def _count_id(value: Any, *, field: str) -> int:
    return _count(value, field, low=1, high=parsers.INT64_MAX)


def _inventory_field(value: Any, *, field: str) -> Inventory:
    return _inventory(value, field)


def _enroll(raw: Frame) -> Frame:
    return {
        "secret": parsers.text(raw.get("secret"), field="secret", max_length=MAX_SECRET_LENGTH),
        "name": _optional(raw.get("name"), parsers.text, "name", max_length=MAX_NAME_LENGTH),
        "inventory": _inventory(raw.get("inventory"), "inventory"),
    }


def _auth(raw: Frame) -> Frame:
    return {
        "vm_id": _count_id(raw.get("vm_id"), field="vm_id"),
        "token": parsers.identifier(raw.get("token"), field="token", max_length=MAX_TOKEN_LENGTH),
        "inventory": _optional(raw.get("inventory"), _inventory_field, "inventory"),
    }


def _inventory_frame(raw: Frame) -> Frame:
    return {"inventory": _inventory(raw.get("inventory"), "inventory")}


def _result_error(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    raw = _object(value, "error")
    error: dict[str, str] = {}
    if raw.get("code") is not None:
        error["code"] = parsers.text(raw["code"], field="error.code", max_length=MAX_ID_LENGTH)
    if raw.get("message") is not None:
        error["message"] = parsers.text(
            raw["message"],
            field="error.message",
            max_length=MAX_ERROR_MESSAGE_LENGTH,
            min_length=0,
            multiline=True,
        )
    return error


def _result(raw: Frame) -> Frame:
    if raw.get("id") is None:
        raise InvalidValue("id", "required", "is required (the command's id)")
    data = raw.get("data")
    return {
        "ok": _boolean(raw.get("ok"), "ok"),
        "data": None if data is None else _object(data, "data"),
        "error": _result_error(raw.get("error")),
    }


def _nothing(raw: Frame) -> Frame:
    return {}


AGENT_FRAME_PARSERS: dict[str, Callable[[Frame], Frame]] = {
    "hello": _hello,
    "enroll": _enroll,
    "auth": _auth,
    "ping": _nothing,
    "inventory": _inventory_frame,
    "result": _result,
    "logout": _nothing,
    "bye": _nothing,
}
"""Frame types an agent may send, each with the parser of its fields."""

SERVER_FRAME_TYPES = frozenset(
    {"welcome", "enrolled", "auth_ok", "pong", "ack", "command", "logout", "error", "logged_out"}
)


def decode_frame(line: bytes, *, allowed: Container[str] | None = None) -> Frame:
    """Parse and validate one agent frame (the line without or with its trailing newline).

    Order: size, JSON document (`json_document`: UTF-8, no lone surrogates or NUL anywhere,
    no NaN, depth), object, `id`, `type`, then `allowed` (a container of types; a known type
    the connection may not send yet is refused with `not_authorized` before its fields are
    looked at), then the type's fields. Returns `{"type", "id", <every field of the type>}`
    with absent optional fields as None and inventories as `Inventory`. Raises ProtocolError
    for anything wrong, never another exception; its `frame_id` is set only once `id` is valid.
    """
    if len(line) > MAX_FRAME_BYTES:
        raise ProtocolError(FRAME_TOO_LARGE, "frame exceeds 64 KiB", close=True)
    try:
        raw = parsers.json_document(line, field="frame", max_depth=MAX_DEPTH)
    except InvalidValue as error:
        raise ProtocolError.invalid(error, frame_id=_id_beside(line, error)) from None
    try:
        if not isinstance(raw, dict):
            raise InvalidValue("frame", "type", "must be a JSON object")
        frame_id = frame_id_parse(raw.get("id"))
    except InvalidValue as error:
        raise ProtocolError.invalid(error) from None
    try:
        kind = parsers.identifier(raw.get("type"), field="type", max_length=MAX_TYPE_LENGTH)
    except InvalidValue as error:
        raise ProtocolError.invalid(error, frame_id=frame_id) from None
    parse = AGENT_FRAME_PARSERS.get(kind)
    if parse is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {kind!r}", frame_id=frame_id)
    if allowed is not None and kind not in allowed:
        raise ProtocolError(NOT_AUTHORIZED, "authorize first", frame_id=frame_id)
    try:
        fields = parse(raw)
    except InvalidValue as error:
        raise ProtocolError.invalid(error, frame_id=frame_id) from None
    return {"type": kind, "id": frame_id, **fields}


def _id_beside(line: bytes, error: InvalidValue) -> str | int | None:
    """The frame's own valid id when `json_document` refused one string value in it (a lone
    surrogate or NUL in a disk name): the document is well-formed JSON of bounded depth, so
    the agent can still be told which request failed. None for anything else."""
    if error.reason not in ("encoding", "control") or error.field in ("frame", "id"):
        return None
    try:
        document = json.loads(line.decode("utf-8"))
        return frame_id_parse(document.get("id")) if isinstance(document, dict) else None
    except (ValueError, InvalidValue):
        return None


def decode_server_frame(line: bytes) -> Frame:
    """Parse a frame the server sent (used by the agent); checks only JSON, object and type."""
    try:
        frame = parsers.json_document(line, field="frame", max_depth=MAX_DEPTH)
    except InvalidValue as error:
        raise ProtocolError.invalid(error) from None
    if not isinstance(frame, dict) or frame.get("type") not in SERVER_FRAME_TYPES:
        raise ProtocolError(BAD_FRAME, "not a server frame")
    return frame


def encode_frame(frame: Frame) -> bytes:
    """One compact JSON line. Raises ValueError if the result exceeds the frame limit."""
    data = json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError("frame exceeds 64 KiB")
    return data


def error_frame(
    code: str,
    message: str,
    frame_id: Any = None,
    *,
    field: str | None = None,
    reason: str | None = None,
    retry_after: int | None = None,
) -> Frame:
    """`error {code, message, id?, field?, reason?, retry_after?}`: `id` only when the request's
    id was valid, `field`/`reason` when a value was refused (the parser's reason code),
    `retry_after` (whole seconds) when the peer is locked out (`rate_limited`)."""
    frame: Frame = {"type": "error", "code": code, "message": message}
    if frame_id is not None:
        frame["id"] = frame_id
    if field is not None:
        frame["field"] = field
    if reason is not None:
        frame["reason"] = reason
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def protocol_error_frame(error: ProtocolError) -> Frame:
    return error_frame(
        error.code, error.message, error.frame_id, field=error.field, reason=error.reason
    )


class LineSplitter:
    """Incremental splitter of a byte stream into frames; refuses lines over the limit without
    buffering them whole."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete lines in `data` (without newlines); raise ProtocolError(close)
        when a line grows past the limit."""
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start + 1 > self.max_bytes:
                raise ProtocolError(FRAME_TOO_LARGE, "frame exceeds 64 KiB", close=True)
            line = bytes(self._buffer[start:end])
            if line.strip():
                lines.append(line)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_bytes:
            raise ProtocolError(FRAME_TOO_LARGE, "frame exceeds 64 KiB", close=True)
        return lines
