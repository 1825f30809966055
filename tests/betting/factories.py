"""Betting test data, created through the services (so change log and audit stay consistent)."""

from datetime import timedelta
from decimal import Decimal
from itertools import count
from typing import Any

from django.utils import timezone

from betting import services
from betting.models import Event

_ids = count(1)


def event_create(
    *, coefficient: str = "1.75", deadline_in: timedelta = timedelta(hours=1), **kwargs: Any
) -> Event:
    number = next(_ids)
    return services.event_create(
        event_id=kwargs.pop("event_id", f"ev-{number}"),
        name=kwargs.pop("name", f"Match {number}"),
        coefficient=Decimal(coefficient),
        deadline=timezone.now() + deadline_in,
        actor_id=None,
        via="test",
    )


def bet_place(*, user: Any, event: Event, amount: str = "10.00") -> Any:
    return services.bet_place(user_id=user.pk, event_id=event.id, amount=Decimal(amount)).bet
