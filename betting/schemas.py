"""Betting's values on the wire, judged the same way at REST and gRPC (pure, no Django imports).

Each function is a thin binding of one shared parser (`common.parsers`) to a betting field's
limits, so a value gets one judgement whichever door it came through.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from common import parsers

CENT = Decimal("0.01")
#: The largest value of the money and odds columns (`DecimalField(max_digits=12,
#: decimal_places=2)`).
MONEY_COLUMN_MAX = Decimal("9999999999.99")
EVENT_ID_MAX_LENGTH = 64
EVENT_NAME_MAX_LENGTH = 200
IDEMPOTENCY_KEY_MAX_LENGTH = 200


@dataclass(frozen=True)
class MoneyRange:
    """The accepted amounts of one money field (stake, coefficient), both ends included."""

    minimum: Decimal
    maximum: Decimal

    def parse(self, value: object, *, field: str) -> Decimal:
        """`parsers.money` within this range: an ASCII decimal string with at most 2 places."""
        return parsers.money(value, field=field, min_value=self.minimum, max_value=self.maximum)

    def check(self, value: Decimal | str, *, field: str) -> Decimal:
        """The same judgement for a value already typed by a caller inside the process (a
        `Decimal` is judged by its fixed-point text, so `Decimal("10.001")` is refused)."""
        raw = format(value, "f") if isinstance(value, Decimal) else value
        return self.parse(raw, field=field)


def money_range(minimum: str, maximum: str, *, name: str) -> MoneyRange:
    """A configured range (settings), parsed by the same rules as client input; raises
    `ValueError` naming `name` unless 0 < minimum <= maximum <= the column's maximum."""
    try:
        low = parsers.money(minimum, field=f"{name} minimum", min_value=CENT)
        high = parsers.money(maximum, field=f"{name} maximum", max_value=MONEY_COLUMN_MAX)
    except parsers.InvalidValue as error:
        raise ValueError(error.message) from None
    if low > high:
        raise ValueError(f"{name}: minimum {low} is above maximum {high}")
    return MoneyRange(minimum=low, maximum=high)


def event_id(value: object, *, field: str = "id") -> str:
    """An event id: `[A-Za-z0-9._:-]`, 1..64 characters."""
    return parsers.identifier(value, field=field, max_length=EVENT_ID_MAX_LENGTH)


def event_name(value: object, *, field: str = "name") -> str:
    """An event name: one line of clean text, trimmed, 1..200 characters."""
    return parsers.text(value, field=field, max_length=EVENT_NAME_MAX_LENGTH, strip=True)


def idempotency_key(value: object, *, field: str = "Idempotency-Key") -> str:
    """An `Idempotency-Key`: one line of clean text, 1..200 characters, taken as sent."""
    return parsers.text(value, field=field, max_length=IDEMPOTENCY_KEY_MAX_LENGTH)


def deadline_ahead(moment: datetime, *, now: datetime, field: str = "deadline") -> datetime:
    """A new event's deadline must be after `now` (the REST `TimestampField(future=True)` rule)."""
    if moment <= now:
        raise parsers.InvalidValue(field, "range", "must be in the future")
    return moment


def payout_of(amount: Decimal, coefficient: Decimal) -> Decimal:
    """amount * coefficient to the cent, half-up."""
    return (amount * coefficient).quantize(CENT, rounding=ROUND_HALF_UP)


def money_format(value: Decimal) -> str:
    return str(value.quantize(CENT))


def timestamp_format(moment: datetime) -> str:
    """An aware datetime as the REST door writes it (DRF's ISO 8601 in UTC, the settings' time
    zone): `2030-01-02T03:04:05.678901Z`, microseconds only when not zero."""
    text = moment.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def event_json(
    event_id: str,
    name: str,
    coefficient: Decimal,
    deadline: datetime,
    state: str,
    version: int,
    sequence: int,
) -> dict[str, object]:
    """An event on the REST wire (`EventOutputSerializer`'s shape, key order included), built
    from plain values so a long list costs no serializer per row."""
    return {
        "id": event_id,
        "name": name,
        "coefficient": money_format(coefficient),
        "deadline": timestamp_format(deadline),
        "state": state,
        "version": version,
        "sequence": sequence,
    }


def bet_json(
    *,
    bet_id: int,
    event_id: str,
    amount: Decimal,
    coefficient: Decimal,
    potential_payout: Decimal,
    status: str,
    payout: Decimal | None,
    created_at: datetime,
    settled_at: datetime | None,
) -> dict[str, object]:
    """A bet on the REST wire (`BetOutputSerializer`'s shape, key order included)."""
    return {
        "id": bet_id,
        "event_id": event_id,
        "amount": money_format(amount),
        "coefficient": money_format(coefficient),
        "potential_payout": money_format(potential_payout),
        "status": status,
        "payout": None if payout is None else money_format(payout),
        "created_at": timestamp_format(created_at),
        "settled_at": None if settled_at is None else timestamp_format(settled_at),
    }
