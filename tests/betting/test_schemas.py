"""Betting's wire values (pure, no sockets): the shared parsers bound to betting's limits."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import settings

from betting import schemas, services
from common.parsers import InvalidValue

STAKE = schemas.MoneyRange(minimum=Decimal("1.00"), maximum=Decimal("10000.00"))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("1.234", "format"),
        ("10.000", "format"),
        ("\u0661\u0660", "format"),
        ("\uff11\uff10", "format"),
        ("1_0", "format"),
        ("1e1", "format"),
        ("+10", "format"),
        ("-5", "format"),
        (" 2.75 ", "format"),
        ("NaN", "format"),
        ("sNaN", "format"),
        ("Infinity", "format"),
        ("abc", "format"),
        ("", "format"),
        ("0", "range"),
        ("0.99", "range"),
        ("10000.01", "range"),
        ("1" * 41, "format"),
        (1.5, "type"),
        (10, "type"),
        (True, "type"),
        (None, "required"),
    ],
)
def test_stake_outside_the_money_grammar_or_range_is_refused_naming_the_field(
    raw: object, reason: str
) -> None:
    with pytest.raises(InvalidValue) as error:
        STAKE.parse(raw, field="amount")
    assert (error.value.field, error.value.reason) == ("amount", reason)
    assert error.value.details == {"amount": [error.value.message.removeprefix("amount: ")]}


@pytest.mark.parametrize(
    ("raw", "value"), [("10", "10.00"), ("1.5", "1.50"), ("1.00", "1.00"), ("0010.00", "10.00")]
)
def test_good_stake_parses_exactly(raw: str, value: str) -> None:
    parsed = STAKE.parse(raw, field="amount")
    assert parsed == Decimal(value)
    assert str(parsed) == value


@pytest.mark.parametrize(
    ("typed", "accepted"),
    [
        (Decimal("10"), True),
        (Decimal("1E+1"), True),
        (Decimal("10.50"), True),
        (Decimal("10.001"), False),
        (Decimal("-10"), False),
        (Decimal("NaN"), False),
        (Decimal("0.5"), False),
        ("10.00", True),
        ("\u0661\u0660", False),
    ],
)
def test_values_typed_inside_the_process_get_the_same_judgement(
    typed: Decimal | str, accepted: bool
) -> None:
    if accepted:
        assert STAKE.check(typed, field="amount") == Decimal(typed)
    else:
        with pytest.raises(InvalidValue):
            STAKE.check(typed, field="amount")


@pytest.mark.parametrize(
    ("minimum", "maximum"),
    [("0", "10"), ("abc", "10"), ("1", "x"), ("10", "1"), ("1", "99999999999"), ("1.001", "2")],
)
def test_a_malformed_configured_range_fails_loudly(minimum: str, maximum: str) -> None:
    with pytest.raises(ValueError, match="STAKE"):
        schemas.money_range(minimum, maximum, name="STAKE")


def test_configured_ranges_come_from_settings() -> None:
    stake, coefficient = services.STAKE, services.COEFFICIENT
    assert (stake.minimum, stake.maximum) == (
        Decimal(settings.BETTING_MIN_STAKE),
        Decimal(settings.BETTING_MAX_STAKE),
    )
    assert (coefficient.minimum, coefficient.maximum) == (
        Decimal(settings.BETTING_MIN_COEFFICIENT),
        Decimal(settings.BETTING_MAX_COEFFICIENT),
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("a b", "format"),
        ("a\x00b", "control"),
        ("a\ud800", "encoding"),
        ("\u00e9", "format"),
        ("x" * 65, "too_long"),
        ("", "blank"),
        (7, "type"),
    ],
)
def test_bad_event_ids_are_refused(raw: object, reason: str) -> None:
    with pytest.raises(InvalidValue) as error:
        schemas.event_id(raw)
    assert (error.value.field, error.value.reason) == ("id", reason)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [("", "blank"), ("   ", "blank"), ("a\nb", "control"), ("x" * 201, "too_long")],
)
def test_bad_event_names_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(InvalidValue) as error:
        schemas.event_name(raw)
    assert error.value.reason == reason


def test_a_deadline_must_be_after_now() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert schemas.deadline_ahead(now + timedelta(microseconds=1), now=now) > now
    for moment in (now, now - timedelta(days=1)):
        with pytest.raises(InvalidValue) as error:
            schemas.deadline_ahead(moment, now=now)
        assert (error.value.field, error.value.reason) == ("deadline", "range")


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
