"""Accepted stakes and coefficients, read once from settings (a malformed value stops the
process at start). The doors parse client values with these ranges; the services re-check
values handed in by other callers with the same parser, so both give one judgement."""

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from betting import schemas


def _configured_range(minimum: str, maximum: str, *, name: str) -> schemas.MoneyRange:
    try:
        return schemas.money_range(minimum, maximum, name=name)
    except ValueError as error:
        raise ImproperlyConfigured(str(error)) from None


#: Stake of one bet, in the currency's units with 2 decimal places (BETTING_MIN/MAX_STAKE).
STAKE = _configured_range(
    settings.BETTING_MIN_STAKE, settings.BETTING_MAX_STAKE, name="BETTING_MIN/MAX_STAKE"
)
#: Decimal odds of an event, 2 decimal places (BETTING_MIN/MAX_COEFFICIENT).
COEFFICIENT = _configured_range(
    settings.BETTING_MIN_COEFFICIENT,
    settings.BETTING_MAX_COEFFICIENT,
    name="BETTING_MIN/MAX_COEFFICIENT",
)
