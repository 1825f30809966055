"""Room lookup by slug: reads are pure, the default room is created by the service that the
doors call (issue 12: a read never creates the default room)."""

import pytest
from django.conf import settings

from common.exceptions import NotFound
from realtime import selectors, services
from realtime.models import Room
from tests.factories import UserFactory
from tests.realtime.factories import room_create

pytestmark = pytest.mark.django_db


def test_looking_up_the_missing_default_room_is_a_pure_read() -> None:
    with pytest.raises(NotFound):
        selectors.room_get_visible(user=UserFactory.create(), slug=settings.REALTIME_DEFAULT_ROOM)
    assert not Room.objects.exists()


@pytest.mark.parametrize("slug", [None, settings.REALTIME_DEFAULT_ROOM])
def test_resolving_the_default_room_creates_it_once(slug: str | None) -> None:
    user = UserFactory.create()
    first = services.room_resolve(user=user, slug=slug)
    again = services.room_resolve(user=user, slug=slug)
    assert (first.pk, first.slug, first.kind) == (
        again.pk,
        settings.REALTIME_DEFAULT_ROOM,
        "public",
    )
    assert Room.objects.count() == 1


def test_resolving_a_hidden_or_missing_room_is_the_same_not_found() -> None:
    room_create(slug="secret", kind="private")
    stranger = UserFactory.create()
    for slug in ("secret", "nowhere"):
        with pytest.raises(NotFound) as refused:
            services.room_resolve(user=stranger, slug=slug)
        assert refused.value.code == "room_not_found"
    assert set(Room.objects.values_list("slug", flat=True)) == {"secret"}
