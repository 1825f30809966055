"""Decimal parsing shared by REST and gRPC (pure, no sockets)."""

from decimal import Decimal

import pytest

from betting import schemas
from common.exceptions import ValidationFailed


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("1.234", "too_many_decimal_places"),
        ("1.230", "too_many_decimal_places"),
        ("0", "not_positive"),
        ("0.00", "not_positive"),
        ("-5", "not_positive"),
        ("NaN", "invalid_decimal"),
        ("sNaN", "invalid_decimal"),
        ("Infinity", "invalid_decimal"),
        ("-Infinity", "invalid_decimal"),
        ("abc", "invalid_decimal"),
        ("", "invalid_decimal"),
        (1.5, "invalid_decimal"),
        ("1e30", "too_large"),
    ],
)
def test_bad_money_is_rejected_with_a_clear_code(raw: object, code: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        schemas.money_parse(raw, field="amount")
    assert error.value.code == code
    assert error.value.details == {"field": "amount"}


@pytest.mark.parametrize(
    ("raw", "value"), [("10", "10.00"), ("1.5", "1.50"), ("0.01", "0.01"), (" 2.75 ", "2.75")]
)
def test_good_money_parses_exactly(raw: str, value: str) -> None:
    parsed = schemas.money_parse(raw, field="amount")
    assert parsed == Decimal(value)
    assert str(parsed) == value


@pytest.mark.parametrize(
    ("amount", "coefficient", "payout"),
    [
        ("10.00", "1.75", "17.50"),
        ("0.03", "1.50", "0.05"),
        ("33.33", "2.33", "77.66"),
        ("0.01", "1.01", "0.01"),
        ("9999.99", "99.99", "999899.00"),
    ],
)
def test_potential_payout_is_right_to_the_cent_half_up(
    amount: str, coefficient: str, payout: str
) -> None:
    assert schemas.payout_of(Decimal(amount), Decimal(coefficient)) == Decimal(payout)
