"""The movement envelope (CloudEvents 1.0 structured mode, JSON) and its validation.

Pure: no Django imports, no I/O. `envelope_parse` turns a raw body into an `Envelope` or raises
`EnvelopeInvalid` with a short reason code and a human detail, which the caller dead-letters.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SPEC_VERSION = "1.0"
EVENT_TYPE = "ru.retail.warehouses.movement"
DATA_SCHEMA = "ru.retail.warehouses.movement.v1.0"
DESTINATION = "ru.retail.warehouses"
CONTENT_TYPE = "application/json"
EVENTS = ("departure", "arrival")
MAX_BODY_BYTES = 64 * 1024
MAX_QUANTITY = 2**31 - 1


class EnvelopeInvalid(ValueError):
    """A message that can never be stored; `reason` is the dead-letter reason code."""

    def __init__(self, detail: str, *, reason: str = "malformed") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    """One validated movement event. `(movement_id, event)` is its idempotency key."""

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

    @property
    def key(self) -> tuple[uuid.UUID, str]:
        return (self.movement_id, self.event)

    @property
    def delta(self) -> int:
        """Signed stock change at `warehouse_id`: departures take, arrivals give."""
        return -self.quantity if self.event == "departure" else self.quantity

    @property
    def fingerprint(self) -> str:
        """Hash of everything that defines the event's effect; equal for true duplicates, so a
        redelivered copy is recognised and a different payload under the same key is not."""
        canonical = "|".join(
            [
                str(self.movement_id),
                self.event,
                str(self.warehouse_id),
                str(self.product_id),
                str(self.quantity),
                self.timestamp.astimezone(UTC).isoformat(),
                self.source,
            ]
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _require(mapping: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in mapping:
        raise EnvelopeInvalid(f"missing field {name!r}")
    value = mapping[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EnvelopeInvalid(f"field {name!r} has the wrong type")
    return value


def _uuid(mapping: dict[str, Any], name: str) -> uuid.UUID:
    raw = _require(mapping, name, str)
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise EnvelopeInvalid(f"field {name!r} is not a UUID") from None


def _aware_datetime(raw: str, name: str) -> datetime:
    text = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise EnvelopeInvalid(f"field {name!r} is not an ISO 8601 datetime") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise EnvelopeInvalid(f"field {name!r} has no time zone")
    return value


def _short_text(mapping: dict[str, Any], name: str, limit: int = 200) -> str:
    value = _require(mapping, name, str)
    if not value or len(value) > limit:
        raise EnvelopeInvalid(f"field {name!r} is empty or too long")
    return str(value)


def envelope_parse(body: bytes | str) -> Envelope:
    """Validate one raw message body; raise `EnvelopeInvalid` (reason `malformed`) if it is not
    a spec-exact movement envelope."""
    if len(body) > MAX_BODY_BYTES:
        raise EnvelopeInvalid("body too large")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeInvalid("body is not JSON") from None
    return envelope_validate(document)


def envelope_validate(document: Any) -> Envelope:
    """Validate an already-decoded envelope (the ingest endpoint receives decoded JSON)."""
    if not isinstance(document, dict):
        raise EnvelopeInvalid("envelope is not a JSON object")
    if _require(document, "specversion", str) != SPEC_VERSION:
        raise EnvelopeInvalid("unsupported specversion")
    if _require(document, "type", str) != EVENT_TYPE:
        raise EnvelopeInvalid("unexpected type")
    if "datacontenttype" in document and document["datacontenttype"] != CONTENT_TYPE:
        raise EnvelopeInvalid("unexpected datacontenttype")
    if "dataschema" in document and document["dataschema"] != DATA_SCHEMA:
        raise EnvelopeInvalid("unexpected dataschema")
    envelope_id = _uuid(document, "id")
    source = _short_text(document, "source", 100)
    subject = _short_text(document, "subject")
    millis = _require(document, "time", int)
    try:
        sent = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise EnvelopeInvalid("field 'time' is out of range") from None
    data = _require(document, "data", dict)
    event = _require(data, "event", str)
    if event not in EVENTS:
        raise EnvelopeInvalid(f"unknown event {event[:40]!r}")
    quantity = _require(data, "quantity", int)
    if not 0 < quantity <= MAX_QUANTITY:
        raise EnvelopeInvalid("quantity must be a positive integer")
    return Envelope(
        id=envelope_id,
        source=source,
        time=sent,
        subject=subject,
        movement_id=_uuid(data, "movement_id"),
        warehouse_id=_uuid(data, "warehouse_id"),
        timestamp=_aware_datetime(_require(data, "timestamp", str), "timestamp"),
        event=event,
        product_id=_uuid(data, "product_id"),
        quantity=quantity,
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
