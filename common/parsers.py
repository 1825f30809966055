"""One parser per kind of value that comes from outside (`shared/specs/input-policy.md`).

Pure: no Django, no I/O. Every door (REST, WebSocket, VM TCP, gRPC, Telegram, the warehouse
queue, the admin) turns a raw value into a typed one here, so the same value is judged the same
way everywhere. Each parser takes the raw value and the field's name (a dotted path such as
`data.timestamp` for nested values) and either returns the typed value or raises
`InvalidValue`, a `ValidationFailed` whose `details` are `{field: [message]}` (the REST error
shape) and whose `reason` is a stable machine code:

| reason        | meaning                                                             |
|---------------|---------------------------------------------------------------------|
| `required`    | missing / null where a value is needed                              |
| `type`        | wrong JSON type (a number where a string is expected, a bool...)    |
| `encoding`    | not valid Unicode: lone UTF-16 surrogates, invalid UTF-8            |
| `control`     | NUL or another C0 control character the field does not allow        |
| `blank`       | empty (after stripping, where the field strips)                     |
| `too_long`    | over the field's length cap                                         |
| `format`      | does not match the field's syntax (digits, charset, RFC 3339...)    |
| `naive`       | a timestamp without a UTC offset where one is required              |
| `range`       | outside the field's minimum/maximum or the representable range      |
| `choice`      | not one of the listed values                                        |
| `too_deep`    | a JSON document nested deeper than allowed                          |
| `too_large`   | a body over its byte cap                                            |
"""

import json
import re
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any, Literal, TypeVar, overload

from common.exceptions import ValidationFailed

T = TypeVar("T")

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
#: The range of a protobuf `Timestamp` (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z),
#: from google/protobuf/timestamp.proto.
PROTO_TIMESTAMP_MIN_SECONDS = -62_135_596_800
PROTO_TIMESTAMP_MAX_SECONDS = 253_402_300_799
DEFAULT_MAX_DEPTH = 32
IDENTIFIER_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")
#: The canonical 8-4-4-4-12 form in ASCII hex (`uuid.UUID` alone also takes Arabic-Indic
#: digits, braces, a `urn:uuid:` prefix and surrounding whitespace).
UUID_PATTERN = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_SINGLE_LINE = re.compile(r"[\x00-\x1f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_LENIENT_DIGITS = re.compile(r"-?[0-9]+", re.ASCII)
# RFC 3339 section 5.6 `date-time`, with the offset optional so a naive value gets its own reason.
_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,9}))?(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?",
    re.ASCII,
)


class JsonNumber(Decimal):
    """A JSON fraction decoded exactly, keeping the literal it was written as (`1e1`, `10.000`),
    so `money` judges what the client sent rather than its numeric value."""

    literal: str

    def __new__(cls, literal: str) -> "JsonNumber":
        number = super().__new__(cls, literal)
        number.literal = literal
        return number


class InvalidValue(ValidationFailed):
    """A value from outside that its parser refuses.

    `field` is the (dotted) field name, `reason` one of the codes in the module docstring,
    `message` a human sentence naming the field; `details` is `{field: [message]}`."""

    def __init__(self, field: str, reason: str, message: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {message}", details={field: [message]})


# --- text -----------------------------------------------------------------------------------


def text_problem(value: str, *, multiline: bool = False) -> tuple[str, str] | None:
    """The first reason `value` is not clean text, as `(reason, message)`, or None.

    Clean text is a sequence of Unicode scalar values (no lone surrogates) without NUL or other
    C0 controls; `multiline` allows tab, LF and CR."""
    if _SURROGATE.search(value):
        return "encoding", "contains a lone UTF-16 surrogate (not valid Unicode)"
    if (_CONTROL if multiline else _CONTROL_SINGLE_LINE).search(value):
        return "control", "contains NUL or another control character"
    return None


def text(
    value: object,
    *,
    field: str,
    max_length: int,
    min_length: int = 1,
    multiline: bool = False,
    strip: bool = False,
) -> str:
    """A string of Unicode scalar values, `min_length..max_length` code points long.

    Refuses non-strings (`type`), lone surrogates (`encoding`), NUL and C0 controls (`control`;
    `multiline` allows tab, LF and CR), empty (`blank`) and over-long (`too_long`) values.
    `strip` removes surrounding whitespace first."""
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if not isinstance(value, str):
        raise InvalidValue(field, "type", "must be a string")
    problem = text_problem(value, multiline=multiline)
    if problem is not None:
        raise InvalidValue(field, *problem)
    if strip:
        value = value.strip()
    if len(value) < min_length:
        raise InvalidValue(
            field,
            "blank",
            "must not be empty" if min_length == 1 else f"is shorter than {min_length}",
        )
    if len(value) > max_length:
        raise InvalidValue(field, "too_long", f"is longer than {max_length} characters")
    return value


def identifier(
    value: object,
    *,
    field: str,
    max_length: int = 64,
    pattern: re.Pattern[str] = IDENTIFIER_PATTERN,
) -> str:
    """An identifier in a path, header or frame: clean text fully matching `pattern` (ASCII
    `[A-Za-z0-9._:-]` unless the field documents another charset), 1..`max_length` long."""
    parsed = text(value, field=field, max_length=max_length)
    if not pattern.fullmatch(parsed):
        raise InvalidValue(field, "format", "contains characters outside its charset")
    return parsed


def uuid_value(value: object, *, field: str) -> uuid_module.UUID:
    """A UUID in its canonical ASCII form (`4705204f-498f-4f96-b4ba-df17fb56bf55`, any case);
    refuses other spellings with `format` and non-strings with `type`."""
    raw = text(value, field=field, max_length=36)
    if not UUID_PATTERN.fullmatch(raw):
        raise InvalidValue(field, "format", "must be a UUID such as 4705204f-498f-...")
    return uuid_module.UUID(raw)


# --- numbers --------------------------------------------------------------------------------


def integer(
    value: object,
    *,
    field: str,
    min_value: int = 0,
    max_value: int = INT64_MAX,
    strings: bool = True,
    numbers: bool = True,
) -> int:
    """An integer within `min_value..max_value` (defaults: 0..int64 max, a database id range).

    Accepts a JSON integer (`numbers`) or a string of ASCII digits (`strings`; a leading `-`
    only when `min_value` is negative). Refuses bools, floats (even `1.0`), signs `+`,
    whitespace, `_`, non-ASCII digits (Arabic-Indic, fullwidth, superscripts...) with
    `type`/`format`, and values out of range with `range`."""
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if isinstance(value, bool):
        raise InvalidValue(field, "type", "must be an integer")
    if isinstance(value, int):
        if not numbers:
            raise InvalidValue(field, "type", "must be a string of digits")
        number = value
    elif isinstance(value, str):
        if not strings:
            raise InvalidValue(field, "type", "must be an integer")
        if len(value) > 40 or not _LENIENT_DIGITS.fullmatch(value):
            raise InvalidValue(field, "format", "must be ASCII digits")
        if value.startswith("-") and min_value >= 0:
            raise InvalidValue(field, "range", "must not be negative")
        number = int(value)
    else:
        raise InvalidValue(field, "type", "must be an integer")
    if not min_value <= number <= max_value:
        raise InvalidValue(field, "range", f"must be between {min_value} and {max_value}")
    return number


def money(
    value: object,
    *,
    field: str,
    min_value: Decimal | None = None,
    max_value: Decimal | None = None,
    places: int = 2,
    numbers: bool = False,
) -> Decimal:
    """An exact non-negative decimal such as `"10"` or `"10.50"`: ASCII `[0-9]+(\\.[0-9]{1,n})?`
    with n = `places`, within `min_value..max_value`, returned quantized to `places`.

    A JSON number is accepted only when the field documents it (`numbers=True`) and only as an
    `int` or a `JsonNumber` that `json_document(exact=True)` produced (its literal text is
    judged, so `1e1` is still an exponent), never as a float. Refuses signs, exponents, `_`,
    spaces, non-ASCII digits, NaN/Infinity and more places (`format`), and values out of range
    (`range`)."""
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if isinstance(value, str):
        raw = value
    elif numbers and isinstance(value, int) and not isinstance(value, bool):
        raw = str(value)
    elif numbers and isinstance(value, JsonNumber):
        raw = value.literal
    elif isinstance(value, float | Decimal):
        raise InvalidValue(field, "type", 'must be an exact decimal string such as "10.50"')
    else:
        raise InvalidValue(field, "type", 'must be a decimal string such as "10.50"')
    pattern = rf"[0-9]+(\.[0-9]{{1,{places}}})?" if places else r"[0-9]+"
    if len(raw) > 40 or not re.fullmatch(pattern, raw, re.ASCII):
        raise InvalidValue(
            field, "format", f'must be digits with at most {places} decimal places, e.g. "10.50"'
        )
    # Exact at any length the pattern admits (the default 28-digit context would overflow).
    amount = Decimal(raw).quantize(
        Decimal(1).scaleb(-places), context=Context(prec=len(raw) + places + 1)
    )
    if min_value is not None and amount < min_value:
        raise InvalidValue(field, "range", f"must be at least {min_value}")
    if max_value is not None and amount > max_value:
        raise InvalidValue(field, "range", f"must be at most {max_value}")
    return amount


# --- enums ----------------------------------------------------------------------------------


@overload
def choice(value: object, *, field: str, choices: Mapping[Any, T]) -> T: ...
@overload
def choice(value: object, *, field: str, choices: Iterable[T]) -> T: ...
def choice(value: object, *, field: str, choices: Mapping[Any, T] | Iterable[T]) -> T:
    """One of the listed values, compared by type and value (`True` is not `1`, `"1"` is not
    `1`), so unknown proto3 enum numbers and near misses are refused with `choice`.

    `choices` is either an iterable of the accepted values or a mapping from accepted raw
    values to what they stand for (e.g. proto enum number → model state)."""
    mapping: Mapping[Any, Any] = (
        choices if isinstance(choices, Mapping) else {item: item for item in choices}
    )
    for candidate, result in mapping.items():
        if _same_kind(candidate, value) and candidate == value:
            return result
    listed = ", ".join(repr(item) for item in list(mapping)[:12])
    raise InvalidValue(field, "choice", f"must be one of {listed}")


def _kind(value: object) -> type:
    """The JSON kind of a value; str/int subclasses (Django choices, IntEnum) keep their base."""
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind
    return type(value)


def _same_kind(a: object, b: object) -> bool:
    return _kind(a) is _kind(b)


# --- time -----------------------------------------------------------------------------------


def timestamp(
    value: object,
    *,
    field: str,
    naive_is_utc: bool = False,
    epoch: Literal["s", "ms"] | None = None,
    min_value: datetime | None = None,
    max_value: datetime | None = None,
) -> datetime:
    """A moment in time, returned timezone-aware in UTC.

    Strings must be RFC 3339 `date-time` (`2026-01-31T12:00:00Z`, `...+03:00`, up to 9
    fraction digits, which are cut to microseconds). A string without an offset is refused
    (`naive`) unless the field documents UTC (`naive_is_utc`). `epoch` ("s" or "ms") also
    accepts a JSON integer of seconds/milliseconds since 1970. Values that leave the
    representable range when converted to UTC (year 1 with a positive offset, year 9999 with a
    negative one) and values outside `min_value..max_value` are refused with `range`."""
    if value is None:
        raise InvalidValue(field, "required", "is required")
    if isinstance(value, int) and not isinstance(value, bool) and epoch is not None:
        try:
            since = timedelta(milliseconds=value) if epoch == "ms" else timedelta(seconds=value)
            moment = datetime(1970, 1, 1, tzinfo=UTC) + since
        except OverflowError:
            raise InvalidValue(field, "range", "is outside the supported range") from None
        return _bounded(moment, field, min_value, max_value)
    if not isinstance(value, str):
        expected = f"an RFC 3339 string or epoch {'milli' if epoch == 'ms' else ''}seconds"
        raise InvalidValue(field, "type", f"must be {expected if epoch else 'an RFC 3339 string'}")
    match = _RFC3339.fullmatch(value) if len(value) <= 40 else None
    if match is None:
        raise InvalidValue(
            field, "format", "must be an RFC 3339 date-time such as 2026-01-31T12:00:00Z"
        )
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = match["offset"]
    if offset is None and not naive_is_utc:
        raise InvalidValue(field, "naive", "must carry a UTC offset (Z or +HH:MM)")
    offset = "+00:00" if offset in (None, "Z", "z") else offset
    try:
        parsed = datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction}{offset}")
    except ValueError:
        raise InvalidValue(field, "format", "is not a valid calendar date and time") from None
    try:
        moment = parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidValue(field, "range", "is outside the supported range in UTC") from None
    return _bounded(moment, field, min_value, max_value)


def proto_timestamp(seconds: int, nanos: int, *, field: str) -> datetime:
    """A protobuf `google.protobuf.Timestamp` as an aware UTC datetime.

    Valid range and nanos per timestamp.proto: seconds in [0001-01-01, 9999-12-31T23:59:59],
    nanos in [0, 999 999 999]; anything else is refused with `range`."""
    if not PROTO_TIMESTAMP_MIN_SECONDS <= seconds <= PROTO_TIMESTAMP_MAX_SECONDS:
        raise InvalidValue(field, "range", "seconds are outside the Timestamp range")
    if not 0 <= nanos <= 999_999_999:
        raise InvalidValue(field, "range", "nanos must be within 0..999999999")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + timedelta(seconds=seconds, microseconds=nanos // 1000)


def _bounded(
    moment: datetime, field: str, min_value: datetime | None, max_value: datetime | None
) -> datetime:
    if min_value is not None and moment < min_value:
        raise InvalidValue(field, "range", f"must not be before {min_value.isoformat()}")
    if max_value is not None and moment > max_value:
        raise InvalidValue(field, "range", f"must not be after {max_value.isoformat()}")
    return moment


# --- documents ------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder per flavour: `json.loads` with hooks builds a new decoder (and scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_DECODER_EXACT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=JsonNumber)


def json_document(
    raw: bytes | bytearray | str,
    *,
    field: str = "body",
    max_bytes: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    exact: bool = False,
) -> Any:
    """Decode one JSON document from outside.

    Refuses bodies over `max_bytes` (`too_large`), invalid UTF-8 and lone surrogates in any
    string or key (`encoding`, naming the path), NUL in any string or key (`control`),
    `NaN`/`Infinity` and syntax errors (`format`), and nesting deeper than `max_depth`
    (`too_deep`, checked without recursion, so a hostile document cannot exhaust the stack).
    `exact` decodes fractional numbers as `JsonNumber` (an exact Decimal) instead of float."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidValue(field, "too_large", f"is larger than {max_bytes} bytes")
    from_bytes = isinstance(raw, bytes | bytearray)
    if isinstance(raw, bytes | bytearray):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValue(field, "encoding", "is not valid UTF-8") from None
    _check_depth(raw, field, max_depth)
    try:
        document = (_DECODER_EXACT if exact else _DECODER).decode(raw)
    except RecursionError:
        raise InvalidValue(field, "too_deep", f"is nested deeper than {max_depth}") from None
    except ValueError as exc:
        raise InvalidValue(field, "format", f"is not valid JSON ({_short(exc)})") from None
    # The strict decoder refuses raw control characters inside strings and strict UTF-8 cannot
    # carry a lone surrogate, so only a `\u` escape can smuggle either in: skip the walk
    # (about a third of the cost for a typical message) when there is none.
    if "\\u" in raw or (not from_bytes and _SURROGATE.search(raw)):
        _check_strings(document, field)
    return document


def _short(exc: ValueError) -> str:
    return str(exc).split(":")[0][:80]


def _check_depth(raw: str, field: str, max_depth: int) -> None:
    """Bracket depth outside strings, in one linear scan (before the recursive decoder runs)."""
    if raw.count("[") + raw.count("{") <= max_depth:
        return
    depth = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidValue(field, "too_deep", f"is nested deeper than {max_depth}")
        elif char in "]}":
            depth -= 1


def _check_strings(document: Any, field: str) -> None:
    stack: list[tuple[str, Any]] = [(field, document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            _check_string(node, path)
        elif isinstance(node, dict):
            for key, child in node.items():
                _check_string(key, path)
                stack.append((f"{path}.{key}" if path != field else key, child))
        elif isinstance(node, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(node))


def _check_string(value: str, path: str) -> None:
    if _SURROGATE.search(value):
        raise InvalidValue(path, "encoding", "contains a lone UTF-16 surrogate (not valid Unicode)")
    if "\x00" in value:
        raise InvalidValue(path, "control", "contains NUL")


def field_of(details: Any) -> str | None:
    """The first field name of an `InvalidValue`/DRF-style `{field: [...]}` details mapping."""
    if isinstance(details, Mapping) and details:
        return str(next(iter(details)))
    return None


__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "INT64_MIN",
    "InvalidValue",
    "JsonNumber",
    "choice",
    "field_of",
    "identifier",
    "integer",
    "json_document",
    "money",
    "proto_timestamp",
    "text",
    "text_problem",
    "timestamp",
    "uuid_value",
]
