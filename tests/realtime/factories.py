from typing import Any

from realtime import services
from realtime.models import Room
from tests.factories import UserFactory


def room_create(*, owner: Any = None, slug: str = "lobby", kind: str = "public") -> Room:
    return services.room_create(user=owner or UserFactory.create(), slug=slug, kind=kind)
