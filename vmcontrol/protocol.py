"""The agent wire protocol: pure encode, decode and validation (no Django, no sockets).

Line-delimited UTF-8 JSON, one object per line, at most `MAX_FRAME_BYTES` per frame including the
newline. Every frame has a `type`; requests may carry a client-chosen `id` that replies echo.
The full description lives in vmcontrol/PROTOCOL.md.
"""

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAX_ID_LENGTH = 64
MAX_NAME_LENGTH = 64
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


class ProtocolError(Exception):
    """A frame the server refuses; `close` says whether the connection must end after the
    error frame (framing is lost or the peer is hostile)."""

    def __init__(self, code: str, message: str, *, frame_id: Any = None, close: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        self.close = close


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(frame: Frame, key: str, *, low: int, high: int, required: bool = True) -> Any:
    value: Any = frame.get(key)
    if value is None and not required:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise ProtocolError(
            BAD_FRAME, f"`{key}` must be an integer in [{low}, {high}]", frame_id=frame.get("id")
        )
    return value


def _str_field(frame: Frame, key: str, *, max_length: int, required: bool = True) -> Any:
    value = frame.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise ProtocolError(
            BAD_FRAME,
            f"`{key}` must be a non-empty string of at most {max_length} characters",
            frame_id=frame.get("id"),
        )
    return value


def inventory_parse(value: Any, *, frame_id: Any = None) -> Inventory:
    """Validate an `inventory` object; disk names must be unique."""
    if not isinstance(value, dict):
        raise ProtocolError(BAD_FRAME, "`inventory` must be an object", frame_id=frame_id)
    value = {**value, "id": frame_id}
    cpu = _int_field(value, "cpu_cores", low=1, high=MAX_CPU_CORES)
    ram = _int_field(value, "ram_mb", low=1, high=MAX_RAM_MB)
    raw_disks = value.get("disks", [])
    if not isinstance(raw_disks, list) or len(raw_disks) > MAX_DISKS:
        raise ProtocolError(
            BAD_FRAME, f"`disks` must be a list of at most {MAX_DISKS}", frame_id=frame_id
        )
    disks: list[Disk] = []
    for raw in raw_disks:
        if not isinstance(raw, dict):
            raise ProtocolError(BAD_FRAME, "each disk must be an object", frame_id=frame_id)
        raw = {**raw, "id": frame_id}
        disks.append(
            Disk(
                name=_str_field(raw, "name", max_length=MAX_NAME_LENGTH),
                size_gb=_int_field(raw, "size_gb", low=0, high=MAX_DISK_GB),
            )
        )
    if len({d.name for d in disks}) != len(disks):
        raise ProtocolError(BAD_FRAME, "disk names must be unique", frame_id=frame_id)
    return Inventory(cpu_cores=cpu, ram_mb=ram, disks=tuple(disks))


def _check_hello(frame: Frame) -> None:
    _int_field(frame, "protocol", low=0, high=2**31)
    _int_field(frame, "vm_id", low=1, high=2**62, required=False)
    if frame.get("inventory") is not None:
        frame["inventory"] = inventory_parse(frame["inventory"], frame_id=frame.get("id"))


def _check_enroll(frame: Frame) -> None:
    _str_field(frame, "secret", max_length=256)
    frame["inventory"] = inventory_parse(frame.get("inventory"), frame_id=frame.get("id"))
    _str_field(frame, "name", max_length=MAX_NAME_LENGTH, required=False)


def _check_auth(frame: Frame) -> None:
    _int_field(frame, "vm_id", low=1, high=2**62)
    _str_field(frame, "token", max_length=256)
    if frame.get("inventory") is not None:
        frame["inventory"] = inventory_parse(frame["inventory"], frame_id=frame.get("id"))


def _check_inventory(frame: Frame) -> None:
    frame["inventory"] = inventory_parse(frame.get("inventory"), frame_id=frame.get("id"))


def _check_result(frame: Frame) -> None:
    _str_field(frame, "id", max_length=MAX_ID_LENGTH)
    if not isinstance(frame.get("ok"), bool):
        raise ProtocolError(BAD_FRAME, "`ok` must be a boolean", frame_id=frame.get("id"))
    for key in ("data", "error"):
        if frame.get(key) is not None and not isinstance(frame[key], dict):
            raise ProtocolError(BAD_FRAME, f"`{key}` must be an object", frame_id=frame.get("id"))


def _check_nothing(frame: Frame) -> None:
    return None


AGENT_FRAME_CHECKS = {
    "hello": _check_hello,
    "enroll": _check_enroll,
    "auth": _check_auth,
    "ping": _check_nothing,
    "inventory": _check_inventory,
    "result": _check_result,
    "logout": _check_nothing,
    "bye": _check_nothing,
}
"""Frame types an agent may send, each with its validator (which may normalise fields)."""

SERVER_FRAME_TYPES = frozenset(
    {"welcome", "enrolled", "auth_ok", "pong", "ack", "command", "logout", "error", "logged_out"}
)


def decode_frame(line: bytes, *, allowed: Any = None) -> Frame:
    """Parse and validate one agent frame (the line without or with its trailing newline).

    `allowed` (a container of types) refuses known types the connection may not send yet with
    `not_authorized`, before their fields are looked at. Raises ProtocolError for anything
    wrong; never another exception.
    """
    if len(line) > MAX_FRAME_BYTES:
        raise ProtocolError(FRAME_TOO_LARGE, "frame exceeds 64 KiB", close=True)
    try:
        frame = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(BAD_FRAME, "frame is not UTF-8 JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_FRAME, "frame must be a JSON object")
    frame_id = frame.get("id")
    if frame_id is not None and not (
        (isinstance(frame_id, str) and len(frame_id) <= MAX_ID_LENGTH) or _is_int(frame_id)
    ):
        raise ProtocolError(BAD_FRAME, "`id` must be a short string or an integer")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_FRAME, "`type` must be a string", frame_id=frame_id)
    check = AGENT_FRAME_CHECKS.get(kind)
    if check is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}", frame_id=frame_id)
    if allowed is not None and kind not in allowed:
        raise ProtocolError(NOT_AUTHORIZED, "authorize first", frame_id=frame_id)
    check(frame)
    return frame


def decode_server_frame(line: bytes) -> Frame:
    """Parse a frame the server sent (used by the agent); checks only JSON, object and type."""
    try:
        frame = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(BAD_FRAME, "frame is not UTF-8 JSON") from None
    if not isinstance(frame, dict) or frame.get("type") not in SERVER_FRAME_TYPES:
        raise ProtocolError(BAD_FRAME, "not a server frame")
    return frame


def encode_frame(frame: Frame) -> bytes:
    """One compact JSON line. Raises ValueError if the result exceeds the frame limit."""
    data = json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError("frame exceeds 64 KiB")
    return data


def error_frame(code: str, message: str, frame_id: Any = None) -> Frame:
    frame: Frame = {"type": "error", "code": code, "message": message}
    if frame_id is not None:
        frame["id"] = frame_id
    return frame


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
