"""The live-event hub over a real socket against the real ASGI server (uvicorn)."""

import asyncio
import json
from importlib import import_module
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.db import transaction
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from realtime import services
from realtime.services import TopicAccess
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.timeout(60)

services.topic_register("test.public", access=TopicAccess.AUTHENTICATED)
services.topic_register("test.ops", access=TopicAccess.STAFF)
services.topic_register("test.mine", access=TopicAccess.OWNER)


async def ticket_for(server: LiveServer, user: Any) -> str:
    headers = await sync_to_async(auth_header)(user)
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        response = await client.post("/api/realtime/ticket", headers=headers)
    assert response.status_code == 201
    return response.json()["ticket"]


async def open_socket(server: LiveServer, user: Any) -> ClientConnection:
    ticket = await ticket_for(server, user)
    return await connect(f"{server.ws_url}/ws/?ticket={ticket}", open_timeout=5)


async def next_frame(ws: ClientConnection, wait: float = 3) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), wait))


async def request(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    return await next_frame(ws)


async def closed_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 3)
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_unauthenticated_socket_is_closed_with_4401(asgi_server: LiveServer) -> None:
    async with connect(f"{asgi_server.ws_url}/ws/") as ws:
        assert await closed_code(ws) == 4401


async def test_ticket_is_single_use(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    ticket = await ticket_for(asgi_server, user)
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        assert await request(ws, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        assert await closed_code(ws) == 4401


async def test_forged_ticket_is_refused(asgi_server: LiveServer) -> None:
    async with connect(f"{asgi_server.ws_url}/ws/?ticket=forged") as ws:
        assert await closed_code(ws) == 4401


def _session_of(user: Any) -> str:
    """A logged-in session as `django.contrib.auth.login` stores it, written directly: the
    password door (its failed-login limits and login signals) is not under test here."""
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)


async def test_session_cookie_authenticates(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    session = await sync_to_async(_session_of)(user)
    async with connect(
        f"{asgi_server.ws_url}/ws/",
        additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"},
    ) as ws:
        assert (await request(ws, {"type": "ping"}))["type"] == "pong"


async def test_a_bad_ticket_is_refused_even_with_a_valid_session(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    session = await sync_to_async(_session_of)(user)
    async with connect(
        f"{asgi_server.ws_url}/ws/?ticket=forged",
        additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"},
    ) as ws:
        assert await closed_code(ws) == 4401


async def test_a_session_of_a_changed_password_is_refused(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    session = await sync_to_async(_session_of)(user)
    user.set_password("another one entirely")
    await sync_to_async(user.save)()
    async with connect(
        f"{asgi_server.ws_url}/ws/",
        additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"},
    ) as ws:
        assert await closed_code(ws) == 4401


async def test_a_websocket_on_another_path_is_refused_at_the_handshake(
    asgi_server: LiveServer,
) -> None:
    user = await sync_to_async(UserFactory.create)()
    ticket = await ticket_for(asgi_server, user)
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{asgi_server.ws_url}/elsewhere/?ticket={ticket}", open_timeout=5)
    assert refused.value.response.status_code == 403


async def _server_tasks(server: LiveServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(count(), server.loop))


async def test_an_idle_socket_costs_the_server_one_task(asgi_server: LiveServer) -> None:
    """Idle memory: the consumer waits on the server's receive in the server's own task (no
    dispatch task per socket, no timer per socket); the hub has one listener per process."""
    users = [await sync_to_async(UserFactory.create)() for _ in range(10)]
    warm = await open_socket(asgi_server, users[0])
    assert await request(warm, {"type": "ping", "ref": 0}) == {"type": "pong", "ref": 0}
    before = await _server_tasks(asgi_server)
    sockets = [await open_socket(asgi_server, user) for user in users[1:]]
    for ws in sockets:  # every one accepted and served
        assert await request(ws, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    # Writer tasks end once their frame is out: wait for that, not for a fixed time.
    deadline = asyncio.get_running_loop().time() + 5
    while (extra := await _server_tasks(asgi_server) - before) > len(sockets):
        assert asyncio.get_running_loop().time() < deadline, f"{extra} tasks for {len(sockets)}"
        await asyncio.sleep(0.05)
    for ws in [warm, *sockets]:
        await ws.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"no_type": 1}', "bad_frame"),
        ('{"type": "launch"}', "unknown_type"),
        ('{"type": "subscribe", "topic": 5}', "bad_topic"),
        ('{"type": "subscribe", "topic": "Bad Topic!"}', "bad_topic"),
        ('{"type": "subscribe", "topic": "nobody.knows"}', "unknown_topic"),
        ('{"type": "unsubscribe", "topic": "test.public"}', "not_subscribed"),
        ('{"type": "ping", "pad": "' + "x" * 20000 + '"}', "frame_too_large"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_survives(
    asgi_server: LiveServer, raw: str, code: str
) -> None:
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        await ws.send(raw)
        error = await next_frame(ws)
        assert error["type"] == "error"
        assert error["code"] == code
        assert error["detail"]
        assert (await request(ws, {"type": "ping", "ref": "after"}))["ref"] == "after"


async def test_a_frame_beyond_the_server_bound_is_closed_with_1009(
    asgi_server: LiveServer,
) -> None:
    """Up to the server's bound (`--ws-max-size`, 1 MiB: 64 x REALTIME_MAX_FRAME_BYTES) an
    oversized frame gets `frame_too_large` and the socket stays open (above); beyond it the
    server refuses to buffer it and closes with 1009 (message too big)."""
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        await ws.send('{"type": "ping", "pad": "' + "x" * (1 << 20) + '"}')
        assert await closed_code(ws) == 1009


async def test_error_frame_echoes_the_ref(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        error = await request(ws, {"type": "nope", "ref": "r-7"})
        assert error["ref"] == "r-7"


async def test_subscriber_receives_published_events_in_order(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        subscribed = await request(ws, {"type": "subscribe", "topic": "test.public"})
        assert subscribed == {"type": "subscribed", "topic": "test.public", "ref": None}
        for n in range(5):
            await sync_to_async(services.publish)("test.public", {"n": n})
        frames = [await next_frame(ws) for _ in range(5)]
        assert frames == [
            {"type": "event", "topic": "test.public", "payload": {"n": n}} for n in range(5)
        ]


async def test_unsubscribed_socket_gets_nothing(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        await request(ws, {"type": "subscribe", "topic": "test.public"})
        assert (await request(ws, {"type": "unsubscribe", "topic": "test.public"}))[
            "type"
        ] == "unsubscribed"
        await sync_to_async(services.publish)("test.public", {"late": True})
        assert (await request(ws, {"type": "ping", "ref": "p"}))["type"] == "pong"
        with pytest.raises(TimeoutError):
            await next_frame(ws, wait=0.3)


def _publish_then_rollback() -> None:
    try:
        with transaction.atomic():
            services.publish("test.public", {"rolled": "back"})
            raise RuntimeError("abort")
    except RuntimeError:
        pass


def _publish_in_committed_transaction() -> None:
    with transaction.atomic():
        services.publish("test.public", {"committed": True})


async def test_publish_waits_for_commit_and_drops_on_rollback(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        await request(ws, {"type": "subscribe", "topic": "test.public"})
        await sync_to_async(_publish_then_rollback)()
        await sync_to_async(_publish_in_committed_transaction)()
        assert (await next_frame(ws))["payload"] == {"committed": True}


async def test_staff_topic_refuses_non_staff(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    staff = await sync_to_async(StaffFactory.create)()
    async with await open_socket(asgi_server, user) as ws:
        assert (await request(ws, {"type": "subscribe", "topic": "test.ops"}))[
            "code"
        ] == "forbidden"
    async with await open_socket(asgi_server, staff) as ws:
        assert (await request(ws, {"type": "subscribe", "topic": "test.ops"}))[
            "type"
        ] == "subscribed"


async def test_per_user_topic_is_only_for_its_owner(asgi_server: LiveServer) -> None:
    alice = await sync_to_async(UserFactory.create)()
    bob = await sync_to_async(UserFactory.create)()
    async with await open_socket(asgi_server, alice) as ws:
        own = await request(ws, {"type": "subscribe", "topic": f"test.mine.{alice.pk}"})
        assert own["type"] == "subscribed"
        other = await request(ws, {"type": "subscribe", "topic": f"test.mine.{bob.pk}"})
        assert other["code"] == "forbidden"
        await sync_to_async(services.publish)(f"test.mine.{bob.pk}", {"for": "bob"})
        await sync_to_async(services.publish)(f"test.mine.{alice.pk}", {"for": "alice"})
        assert (await next_frame(ws))["payload"] == {"for": "alice"}


async def test_ticket_endpoint_requires_authentication(asgi_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as client:
        response = await client.post("/api/realtime/ticket")
    assert response.status_code == 401


@pytest.mark.django_db
def test_expired_tickets_are_purged_by_the_periodic_task() -> None:
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from realtime.models import ConnectionTicket
    from realtime.tasks import tickets_purge

    user = UserFactory.create()
    services.ticket_issue(user=user)
    services.ticket_issue(user=user)
    ConnectionTicket.objects.filter(pk=ConnectionTicket.objects.first().pk).update(  # type: ignore[union-attr]
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert tickets_purge.apply().get() == 1
    assert ConnectionTicket.objects.count() == 1
    assert "realtime-tickets-purge" in settings.CELERY_BEAT_SCHEDULE
