"""The messenger admin over a real socket: rooms, memberships, messages and tickets cannot be
written from the admin (a hard delete would break a room's gap-free seq; membership changes and
messages go through the services and their doors); moderation blanks through the service."""

import pytest

from realtime import services
from realtime.models import Message, Room
from tests.admin_http import AdminSession
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory
from tests.realtime.factories import room_create

pytestmark = pytest.mark.timeout(60)


def test_no_realtime_table_is_written_from_the_admin(asgi_server: LiveServer) -> None:
    operator = AdminSession(asgi_server.http_url, StaffFactory.create(is_superuser=True).username)
    owner = UserFactory.create()
    room = room_create(owner=owner, slug="lobby")
    message, _ = services.message_send(user=owner, room=room, text="hello", client_id="c1")
    attempts: dict[str, dict[str, object]] = {
        "/admin/realtime/room/add/": {"slug": "forged", "title": "x", "kind": "public"},
        f"/admin/realtime/room/{room.pk}/change/": {"slug": "renamed", "title": "x"},
        f"/admin/realtime/room/{room.pk}/delete/": {"post": "yes"},
        "/admin/realtime/membership/add/": {"room": room.pk, "user": owner.pk},
        f"/admin/realtime/message/{message.pk}/change/": {"text": "edited"},
        f"/admin/realtime/message/{message.pk}/delete/": {"post": "yes"},
        "/admin/realtime/connectionticket/add/": {},
    }
    for path, data in attempts.items():
        assert operator.post_form(path, data, page="/admin/realtime/").status_code == 403, path
    assert Room.objects.filter(pk=room.pk, slug="lobby").exists()
    response = operator.post_form(
        "/admin/realtime/message/",
        {"action": "moderate_delete", "_selected_action": [message.pk]},
    )
    assert response.status_code == 302
    message.refresh_from_db()
    assert message.deleted_at is not None and message.text == ""
    assert Message.objects.filter(room=room).count() == 1
