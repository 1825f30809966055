"""The movement envelope (CloudEvents 1.0 structured mode, JSON) and its validation.

Pure: no Django imports, no I/O. `envelope_parse` turns a raw body into an `Envelope` or raises
`EnvelopeInvalid` (reason `malformed`) naming the field and why, which the caller dead-letters.
Every value goes through the shared parsers (`common.parsers`, `input-policy.md`), so anything
that could never be stored (a timestamp that leaves the datetime range in UTC, a quantity beyond
its column, text with lone surrogates or NUL, a UUID written in non-ASCII digits...) is refused
here, never later by the database or the fingerprint.
"""

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common import parsers

SPEC_VERSION = "1.0"
EVENT_TYPE = "ru.retail.warehouses.movement"
DATA_SCHEMA = "ru.retail.warehouses.movement.v1.0"
DESTINATION = "ru.retail.warehouses"
CONTENT_TYPE = "application/json"
EVENTS = ("departure", "arrival")
MAX_BODY_BYTES = 64 * 1024
MAX_QUANTITY = parsers.INT32_MAX
MAX_SOURCE_LENGTH = 100
MAX_SUBJECT_LENGTH = 200


class EnvelopeInvalid(ValueError):
    """A message that can never be stored: `reason` is the dead-letter reason code, `field` the
    (dotted) field at fault, `code` the parser's reason (`required`, `type`, `range`... see
    `common.parsers`) and `detail` a human sentence starting with the field."""

    def __init__(
        self,
        detail: str,
        *,
        reason: str = "malformed",
        field: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field
        self.code = code

    @classmethod
    def of(cls, error: parsers.InvalidValue) -> "EnvelopeInvalid":
        return cls(error.message, field=error.field, code=error.reason)


@dataclass(frozen=True)
class Envelope:
    """One validated movement event. `(movement_id, event)` is its idempotency key.

    `fingerprint` is the hash of everything that defines the event's effect (movement, event,
    warehouse, product, quantity, timestamp in UTC, source); equal for true duplicates, so a
    redelivered copy is recognised and a different payload under the same key is not."""

    id: uuid.UUID
    source: str
    time: datetime
    subject: str
    movement_id: uuid.UUID
    warehouse_id: uuid.UUID
    timestamp: datetime
    event: str
    product_id: uuid.UUID
    quantity: int
    fingerprint: str

    @property
    def key(self) -> tuple[uuid.UUID, str]:
        return (self.movement_id, self.event)

    @property
    def delta(self) -> int:
        """Signed stock change at `warehouse_id`: departures take, arrivals give."""
        return -self.quantity if self.event == "departure" else self.quantity


def fingerprint_of(
    *,
    movement_id: str,
    event: str,
    warehouse_id: str,
    product_id: str,
    quantity: int,
    timestamp: str,
    source: str,
) -> str:
    """`Envelope.fingerprint` from the canonical texts: UUIDs as `str(UUID)` (lowercase
    8-4-4-4-12), the timestamp as `isoformat()` of the UTC datetime."""
    canonical = f"{movement_id}|{event}|{warehouse_id}|{product_id}|{quantity}|{timestamp}|{source}"
    return hashlib.sha256(canonical.encode()).hexdigest()


def message_key(body: bytes | str, message_id: object = None) -> str:
    """The identity of one queue message (64 hex characters), stable across redeliveries.

    The broker's `message_id` property (set by `envelopes_publish`; one per publish, so a
    re-published copy is a new message, a real duplicate) together with the body; without a
    `message_id`, the body alone, so byte-identical copies are then one message."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    digest = hashlib.sha256()
    if message_id is not None and message_id != "":
        name = str(message_id).encode("utf-8", "surrogatepass")
        digest.update(b"id:%d:" % len(name) + name)
    digest.update(b"body:" + raw)
    return digest.hexdigest()


def _member(mapping: dict[str, Any], name: str, path: str) -> Any:
    if name not in mapping or mapping[name] is None:
        raise parsers.InvalidValue(path, "required", "is required")
    return mapping[name]


def envelope_parse(body: bytes | str) -> Envelope:
    """Validate one raw message body; raise `EnvelopeInvalid` (reason `malformed`, naming the
    field) unless it is a spec-exact movement envelope.

    The body must be one JSON document of at most `MAX_BODY_BYTES`, valid UTF-8 without lone
    surrogates or NUL in any string, nested at most 32 deep (`parsers.json_document`)."""
    try:
        document = parsers.json_document(body, field="body", max_bytes=MAX_BODY_BYTES)
    except parsers.InvalidValue as exc:
        raise EnvelopeInvalid.of(exc) from None
    return envelope_validate(document)


def envelope_validate(document: Any) -> Envelope:
    """Validate an already-decoded envelope (the ingest endpoint receives decoded JSON).

    Required: `id`, `source` (text, 1..100), `specversion` "1.0", `type`, `time` (epoch
    milliseconds, or an RFC 3339 string as CloudEvents allows), `subject` (text, 1..200), and
    `data` with `movement_id`, `warehouse_id`, `product_id` (UUIDs), `timestamp` (RFC 3339 with
    an offset), `event` (`departure`/`arrival`) and `quantity` (a JSON integer 1..2^31-1).
    `datacontenttype` and `dataschema` are checked when present; other attributes are ignored."""
    try:
        return _envelope(document)
    except parsers.InvalidValue as exc:
        raise EnvelopeInvalid.of(exc) from None


def _literal(value: object, path: str, expected: str) -> None:
    """`value` must be the string `expected`: the exact match is checked here (most messages),
    anything else goes to `parsers.choice` for its refusal."""
    if value.__class__ is not str or value != expected:
        parsers.choice(value, field=path, choices=[expected])


# Values that repeat across messages (warehouse and product ids, event timestamps) are judged by
# their shared parser once per distinct string; the parser's result (which does not depend on
# the field's name) is reused for the same string. Refusals are never remembered.
_MEMO_MAX = 1 << 16
_uuid_memo: dict[str, tuple[uuid.UUID, str]] = {}
_moment_memo: dict[str, tuple[datetime, str]] = {}


def _uuid_repeated(value: object, path: str) -> tuple[uuid.UUID, str]:
    """`parsers.uuid_value` and its canonical text, remembered per distinct string."""
    if type(value) is not str:
        parsers.uuid_value(value, field=path)  # raises: not a string
    assert isinstance(value, str)
    known = _uuid_memo.get(value)
    if known is None:
        parsed = parsers.uuid_value(value, field=path)
        known = (parsed, str(parsed))
        if len(_uuid_memo) >= _MEMO_MAX:
            _uuid_memo.clear()
        _uuid_memo[value] = known
    return known


def _moment_repeated(value: object, path: str) -> tuple[datetime, str]:
    """`parsers.timestamp` (RFC 3339 with an offset) and its UTC `isoformat()`, remembered per
    distinct string."""
    if type(value) is not str:
        parsers.timestamp(value, field=path)  # raises: not a string
    assert isinstance(value, str)
    known = _moment_memo.get(value)
    if known is None:
        parsed = parsers.timestamp(value, field=path)
        known = (parsed, parsed.astimezone(UTC).isoformat())
        if len(_moment_memo) >= _MEMO_MAX:
            _moment_memo.clear()
        _moment_memo[value] = known
    return known


def _envelope(document: Any) -> Envelope:
    if not isinstance(document, dict):
        raise parsers.InvalidValue("envelope", "type", "must be a JSON object")
    _literal(_member(document, "specversion", "specversion"), "specversion", SPEC_VERSION)
    _literal(_member(document, "type", "type"), "type", EVENT_TYPE)
    for name, expected in (("datacontenttype", CONTENT_TYPE), ("dataschema", DATA_SCHEMA)):
        if name in document:
            _literal(document[name], name, expected)
    envelope_id = parsers.uuid_value(_member(document, "id", "id"), field="id")
    source = parsers.text(
        _member(document, "source", "source"), field="source", max_length=MAX_SOURCE_LENGTH
    )
    subject = parsers.text(
        _member(document, "subject", "subject"), field="subject", max_length=MAX_SUBJECT_LENGTH
    )
    sent = parsers.timestamp(_member(document, "time", "time"), field="time", epoch="ms")
    data = _member(document, "data", "data")
    if not isinstance(data, dict):
        raise parsers.InvalidValue("data", "type", "must be a JSON object")
    event = _member(data, "event", "data.event")
    if event.__class__ is not str or event not in EVENTS:
        event = parsers.choice(event, field="data.event", choices=EVENTS)
    quantity = parsers.integer(
        _member(data, "quantity", "data.quantity"),
        field="data.quantity",
        min_value=1,
        max_value=MAX_QUANTITY,
        strings=False,
    )
    movement_text = _member(data, "movement_id", "data.movement_id")
    movement_id = parsers.uuid_value(movement_text, field="data.movement_id")
    warehouse_id, warehouse_text = _uuid_repeated(
        _member(data, "warehouse_id", "data.warehouse_id"), "data.warehouse_id"
    )
    timestamp, timestamp_text = _moment_repeated(
        _member(data, "timestamp", "data.timestamp"), "data.timestamp"
    )
    product_id, product_text = _uuid_repeated(
        _member(data, "product_id", "data.product_id"), "data.product_id"
    )
    return Envelope(
        id=envelope_id,
        source=source,
        time=sent,
        subject=subject,
        movement_id=movement_id,
        warehouse_id=warehouse_id,
        timestamp=timestamp,
        event=event,
        product_id=product_id,
        quantity=quantity,
        # `uuid_value` accepted the canonical 8-4-4-4-12 hex form, whose lowercase is str(UUID).
        fingerprint=fingerprint_of(
            movement_id=movement_text.lower(),
            event=event,
            warehouse_id=warehouse_text,
            product_id=product_text,
            quantity=quantity,
            timestamp=timestamp_text,
            source=source,
        ),
    )


def envelope_build(
    *,
    envelope_id: uuid.UUID,
    source: str,
    event: str,
    movement_id: uuid.UUID,
    warehouse_id: uuid.UUID,
    product_id: uuid.UUID,
    quantity: int,
    timestamp: datetime,
    sent_millis: int,
) -> dict[str, Any]:
    """A spec-exact envelope as producers send it (used by the simulator and tests)."""
    return {
        "id": str(envelope_id),
        "source": source,
        "specversion": SPEC_VERSION,
        "type": EVENT_TYPE,
        "datacontenttype": CONTENT_TYPE,
        "dataschema": DATA_SCHEMA,
        "time": sent_millis,
        "subject": f"{source}:{event.upper()}",
        "destination": DESTINATION,
        "data": {
            "movement_id": str(movement_id),
            "warehouse_id": str(warehouse_id),
            "timestamp": timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "event": event,
            "product_id": str(product_id),
            "quantity": quantity,
        },
    }
