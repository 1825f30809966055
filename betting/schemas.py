"""Pure wire-format validation shared by REST and gRPC (no Django imports)."""

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from common.exceptions import ValidationFailed

CENT = Decimal("0.01")
MAX_DIGITS = 12


def money_parse(raw: object, *, field: str) -> Decimal:
    """A positive finite Decimal with at most two places, from a string (or Decimal/int).
    Floats are refused: they cannot carry an exact amount."""
    if isinstance(raw, bool | float):
        raise ValidationFailed(
            f"{field} must be a decimal string", code="invalid_decimal", details={"field": field}
        )
    try:
        value = Decimal(str(raw).strip()) if not isinstance(raw, Decimal) else raw
    except (InvalidOperation, ValueError):
        raise ValidationFailed(
            f"{field} is not a decimal number", code="invalid_decimal", details={"field": field}
        ) from None
    if not value.is_finite():
        raise ValidationFailed(
            f"{field} must be finite", code="invalid_decimal", details={"field": field}
        )
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -2:
        raise ValidationFailed(
            f"{field} has more than 2 decimal places",
            code="too_many_decimal_places",
            details={"field": field},
        )
    if value <= 0:
        raise ValidationFailed(
            f"{field} must be greater than zero", code="not_positive", details={"field": field}
        )
    if value.adjusted() >= MAX_DIGITS - 2:
        raise ValidationFailed(f"{field} is too large", code="too_large", details={"field": field})
    return value.quantize(CENT)


def payout_of(amount: Decimal, coefficient: Decimal) -> Decimal:
    """amount * coefficient to the cent, half-up."""
    return (amount * coefficient).quantize(CENT, rounding=ROUND_HALF_UP)


def money_format(value: Decimal) -> str:
    return str(value.quantize(CENT))
