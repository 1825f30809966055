"""DRF serializer fields for REST input, each a thin adapter over one shared parser
(`common.parsers`), so REST judges a value exactly as the other doors do.

Input serializers use these instead of DRF's own `CharField`, `IntegerField`, `DateTimeField`
and `DecimalField`, which accept what `input-policy.md` refuses (Arabic-Indic digits through
`int()`, `Decimal("1_0")`, naive datetimes read as UTC, controls in text, ids beyond int64);
`tests/test_architecture.py` checks that no input serializer falls back to them.
"""

import datetime
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers

from common import parsers

T = TypeVar("T")


def _parsed(field: serializers.Field, parse: Callable[..., T], data: Any, **options: Any) -> T:
    try:
        return parse(data, field=field.field_name or "value", **options)
    except parsers.InvalidValue as exc:
        raise serializers.ValidationError(exc.details[exc.field][0], code=exc.reason) from None


class TextField(serializers.CharField):
    """Clean Unicode text (`parsers.text`): no lone surrogates, no NUL/C0 controls (tab and
    newlines only with `multiline=True`), `max_length` code points; surrounding whitespace is
    trimmed unless `trim_whitespace=False`."""

    def __init__(self, *, multiline: bool = False, **kwargs: Any) -> None:
        self.multiline = multiline
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = _parsed(
            self,
            parsers.text,
            data,
            max_length=self.max_length or 10_000,
            min_length=0,
            multiline=self.multiline,
            strip=self.trim_whitespace,
        )
        if value == "" and not self.allow_blank:
            self.fail("blank")
        if self.min_length is not None and len(value) < self.min_length:
            self.fail("min_length", min_length=self.min_length)
        return value


class IdentifierField(serializers.CharField):
    """An identifier (`parsers.identifier`): ASCII `[A-Za-z0-9._:-]` unless `pattern` names the
    field's documented charset, 1..`max_length` long."""

    def __init__(
        self, *, pattern: re.Pattern[str] = parsers.IDENTIFIER_PATTERN, **kwargs: Any
    ) -> None:
        self.pattern = pattern
        kwargs.setdefault("max_length", 64)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        return _parsed(
            self, parsers.identifier, data, max_length=self.max_length, pattern=self.pattern
        )


class UUIDField(serializers.UUIDField):
    """A UUID in its canonical ASCII form (`parsers.uuid_value`); DRF's own field parses with
    `uuid.UUID`, which also takes Arabic-Indic digits, braces and surrounding spaces."""

    def to_internal_value(self, data: Any) -> Any:
        return _parsed(self, parsers.uuid_value, data)


class IntegerField(serializers.IntegerField):
    """An integer from a JSON number or ASCII digits (`parsers.integer`), within
    `min_value..max_value` (default 0..int64 max, a database id's range)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", parsers.INT64_MAX)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        return _parsed(
            self, parsers.integer, data, min_value=self.min_value, max_value=self.max_value
        )


class MoneyField(serializers.CharField):
    """An exact decimal carried as a string such as `"10.50"` (`parsers.money`): ASCII digits,
    at most `places` decimals, within `min_value..max_value`; JSON numbers only when
    `numbers=True`. Represented as a string with exactly `places` decimals."""

    def __init__(
        self,
        *,
        min_value: Decimal | None = None,
        max_value: Decimal | None = None,
        places: int = 2,
        numbers: bool = False,
        **kwargs: Any,
    ) -> None:
        self.min_money = min_value
        self.max_money = max_value
        self.places = places
        self.numbers = numbers
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Decimal:  # type: ignore[override]
        return _parsed(
            self,
            parsers.money,
            data,
            min_value=self.min_money,
            max_value=self.max_money,
            places=self.places,
            numbers=self.numbers,
        )

    def to_representation(self, value: Any) -> str:
        return str(Decimal(value).quantize(Decimal(1).scaleb(-self.places)))


class MoneyFieldSchema(OpenApiSerializerFieldExtension):
    """OpenAPI for MoneyField: a decimal string with its decimal places. Where JSON numbers are
    accepted too, the description says so; the schema keeps the string form, the one a
    generated client can always send exactly."""

    target_class = "common.fields.MoneyField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        field: MoneyField = self.target
        places = field.places
        schema: dict[str, Any] = {
            "type": "string",
            "pattern": rf"^[0-9]+(\.[0-9]{{1,{places}}})?$" if places else r"^[0-9]+$",
            "example": "10.50" if places else "10",
        }
        if direction == "request" and field.numbers:
            schema["description"] = (
                "A decimal string, or a JSON number read exactly (never through a float) by "
                f"the same rules: ASCII digits, at most {places} decimal places, no exponent."
            )
        return schema


class TimestampField(serializers.DateTimeField):
    """An RFC 3339 timestamp with a UTC offset (`parsers.timestamp`), stored and returned in
    UTC. `naive_is_utc=True` only where the field documents that naive values mean UTC;
    `future=True` refuses moments that are not after now."""

    def __init__(self, *, naive_is_utc: bool = False, future: bool = False, **kwargs: Any) -> None:
        self.naive_is_utc = naive_is_utc
        self.future = future
        super().__init__(**kwargs)

    def to_internal_value(self, value: Any) -> datetime.datetime:
        moment = _parsed(self, parsers.timestamp, value, naive_is_utc=self.naive_is_utc)
        if self.future and moment <= datetime.datetime.now(datetime.UTC):
            raise serializers.ValidationError("must be in the future", code="range")
        return moment


#: DRF's own input fields that accept what the input policy refuses; input serializers use the
#: fields above instead (checked by tests/test_architecture.py).
LENIENT_DRF_FIELDS: tuple[type[serializers.Field], ...] = (
    serializers.CharField,
    serializers.IntegerField,
    serializers.FloatField,
    serializers.DecimalField,
    serializers.DateTimeField,
    serializers.DateField,
    serializers.TimeField,
    serializers.DurationField,
    serializers.UUIDField,
)
