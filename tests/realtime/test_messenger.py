"""The messenger over real sockets against the real ASGI server (uvicorn on 127.0.0.1:0)."""

import asyncio
import base64
import json
import os
import socket
import threading
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from realtime import fanout, selectors, services
from realtime.models import Message, Room
from tests.conftest import LiveServer
from tests.factories import UserFactory, auth_header
from tests.realtime.client import Client
from tests.realtime.factories import room_create

pytestmark = pytest.mark.timeout(90)


async def user(name: str) -> Any:
    return await sync_to_async(UserFactory.create)(username=name)


async def joined(server: LiveServer, who: Any, room: str) -> Client:
    client = await Client.open(server.ws_url, who)
    reply = await client.request({"type": "join", "room": room}, "joined")
    assert reply["type"] == "joined", reply
    return client


# --- Sparq compatibility, seq, ack, idempotency ---------------------------------------------


async def test_sparq_send_without_room_reaches_everyone_in_the_default_room(
    asgi_server: LiveServer,
) -> None:
    alice, bob = await user("alice"), await user("bob")
    a = await Client.open(asgi_server.ws_url, alice)
    b = await Client.open(asgi_server.ws_url, bob)
    await a.fence()
    await b.fence()
    await a.send({"type": "sendMessage", "text": "hi"})
    for client in (a, b):
        message = await client.expect("message")
        assert message["display"] == "alice: hi"
        assert message["room"] == "general"
        assert message["text"] == "hi"
        assert message["user"] == "alice"
        assert message["seq"] == 1
    await a.close()
    await b.close()


async def test_messages_get_gap_free_seqs_and_the_ack_follows_the_commit(
    asgi_server: LiveServer,
) -> None:
    alice = await user("alice")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    acks = []
    for n in range(5):
        ack = await a.request({"type": "sendMessage", "room": "lobby", "text": f"m{n}"}, "ack")
        assert ack["type"] == "ack"
        # Read on another database connection: the row is committed when the ack arrives.
        assert await sync_to_async(Message.objects.filter(pk=ack["id"]).exists)()
        acks.append(ack)
    assert [ack["seq"] for ack in acks] == [1, 2, 3, 4, 5]
    messages = [await a.expect("message") for _ in range(5)]
    assert [(m["seq"], m["text"]) for m in messages] == [(n + 1, f"m{n}") for n in range(5)]
    await a.close()


async def test_retry_with_the_same_client_id_is_not_duplicated(asgi_server: LiveServer) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    b = await joined(asgi_server, bob, "lobby")
    frame = {"type": "sendMessage", "room": "lobby", "text": "once", "client_id": "c-1"}
    first = await a.request(frame, "ack")
    again = await a.request(frame, "ack")
    assert (again["id"], again["seq"]) == (first["id"], first["seq"])
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    await b.expect("message", text="once")
    await a.request({"type": "sendMessage", "room": "lobby", "text": "next"}, "ack")
    await b.expect("message", text="next")
    assert [m["text"] for m in b.of("message")] == ["once", "next"]
    assert await sync_to_async(Message.objects.filter(client_id="c-1").count)() == 1
    await a.close()
    await b.close()


def _send_many(room: Room, sender: Any, count: int, errors: list[BaseException]) -> None:
    try:
        for n in range(count):
            services.message_send(user=sender, room=room, text=f"{sender.pk}-{n}")
    except BaseException as error:  # pragma: no cover - reported by the test
        errors.append(error)
    finally:
        connection.close()


def _send_then_roll_back(room: Room, sender: Any) -> None:
    try:
        with transaction.atomic():
            services.message_send(user=sender, room=room, text="rolled back")
            raise RuntimeError("abort")
    except RuntimeError:
        pass
    finally:
        connection.close()


@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_senders_get_consecutive_seqs_on_postgresql() -> None:
    room = room_create(slug="busy")
    senders = [UserFactory.create() for _ in range(6)]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_send_many, args=(room, s, 15, errors)) for s in senders]
    threads.append(threading.Thread(target=_send_then_roll_back, args=(room, senders[0])))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 91))
    room.refresh_from_db()
    assert room.last_seq == 90


def test_rolled_back_message_leaves_no_gap(db: None) -> None:
    room = room_create(slug="quiet")
    sender = UserFactory.create()
    with pytest.raises(RuntimeError), transaction.atomic():
        services.message_send(user=sender, room=room, text="gone")
        raise RuntimeError("abort")
    message, created = services.message_send(user=sender, room=room, text="kept")
    assert (message.seq, created) == (1, True)


# --- visibility -------------------------------------------------------------------------------


async def test_private_room_is_invisible_to_non_members_on_the_socket(
    asgi_server: LiveServer,
) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(owner=alice, slug="secret", kind="private")
    a = await joined(asgi_server, alice, "secret")
    b = await Client.open(asgi_server.ws_url, bob)
    for frame in (
        {"type": "join", "room": "secret"},
        {"type": "history", "room": "secret"},
        {"type": "sync", "room": "secret", "after_seq": 0},
        {"type": "sendMessage", "room": "secret", "text": "let me in"},
        {"type": "read", "room": "secret", "seq": 0},
    ):
        reply = await b.request(frame, "never")
        assert (reply["type"], reply["code"]) == ("error", "room_not_found")
    await a.request({"type": "sendMessage", "room": "secret", "text": "psst"}, "ack")
    await a.expect("message", text="psst")
    await b.fence()
    assert b.of("message") == []
    await a.close()
    await b.close()


async def test_private_room_is_invisible_to_non_members_over_rest(
    asgi_server: LiveServer,
) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(owner=alice, slug="secret", kind="private")
    bob_headers = await sync_to_async(auth_header)(bob)
    alice_headers = await sync_to_async(auth_header)(alice)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        listed = await http.get("/api/realtime/rooms", headers=bob_headers)
        assert "secret" not in [room["slug"] for room in listed.json()]
        for method, path in (
            ("GET", "/api/realtime/rooms/secret"),
            ("GET", "/api/realtime/rooms/secret/messages"),
            ("POST", "/api/realtime/rooms/secret/messages"),
            ("GET", "/api/realtime/rooms/secret/presence"),
        ):
            response = await http.request(method, path, headers=bob_headers, json={"text": "x"})
            assert response.status_code == 404, (method, path)
        listed = await http.get("/api/realtime/rooms", headers=alice_headers)
        assert "secret" in [room["slug"] for room in listed.json()]


async def test_direct_message_reaches_the_other_user_only(asgi_server: LiveServer) -> None:
    alice, bob, carol = await user("alice"), await user("bob"), await user("carol")
    await sync_to_async(room_create)(owner=bob, slug="lobby")  # alice can see bob there
    headers = await sync_to_async(auth_header)(alice)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        created = await http.post("/api/realtime/direct", headers=headers, json={"user_id": bob.pk})
        again = await http.post("/api/realtime/direct", headers=headers, json={"user_id": bob.pk})
    assert created.status_code == 200
    slug = created.json()["slug"]
    assert again.json()["slug"] == slug
    a = await Client.open(asgi_server.ws_url, alice)
    b = await Client.open(asgi_server.ws_url, bob)
    c = await Client.open(asgi_server.ws_url, carol)
    for client in (a, b, c):
        await client.fence()
    await a.request({"type": "sendMessage", "room": slug, "text": "just us"}, "ack")
    assert (await b.expect("message"))["display"] == "alice: just us"
    reply = await c.request({"type": "join", "room": slug}, "joined")
    assert reply["code"] == "room_not_found"
    await c.fence()
    assert c.of("message") == []
    for client in (a, b, c):
        await client.close()


# --- history and sync ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["warm", "cold"])
async def test_sync_after_a_disconnect_replays_every_missed_message_in_order(
    asgi_server: LiveServer, cache: str
) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    b = await joined(asgi_server, bob, "lobby")
    await b.request({"type": "sendMessage", "room": "lobby", "text": "before"}, "ack")
    last_seen = (await a.expect("message", text="before"))["seq"]
    await a.close()
    for n in range(7):
        await b.request({"type": "sendMessage", "room": "lobby", "text": f"missed {n}"}, "ack")
    a = await joined(asgi_server, alice, "lobby")
    if cache == "cold":  # e.g. a process that missed them: served from the database
        fanout.hub().recent.clear()
    batch = await a.request({"type": "sync", "room": "lobby", "after_seq": last_seen}, "sync")
    assert batch["reset_required"] is False
    assert [m["seq"] for m in batch["messages"]] == list(range(last_seen + 1, last_seen + 8))
    assert [m["text"] for m in batch["messages"]] == [f"missed {n}" for n in range(7)]
    assert batch["last_seq"] == last_seen + 7
    await a.close()
    await b.close()


async def test_sync_beyond_the_bound_asks_for_a_reset(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_SYNC_LIMIT = 3
    alice = await user("alice")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    for n in range(5):
        await a.request({"type": "sendMessage", "room": "lobby", "text": f"m{n}"}, "ack")
    batch = await a.request({"type": "sync", "room": "lobby", "after_seq": 0}, "sync")
    assert (batch["reset_required"], batch["messages"], batch["last_seq"]) == (True, [], 5)
    within = await a.request({"type": "sync", "room": "lobby", "after_seq": 2}, "sync")
    assert [m["seq"] for m in within["messages"]] == [3, 4, 5]
    await a.close()


async def test_history_pages_backwards_in_seq_order(asgi_server: LiveServer) -> None:
    alice = await user("alice")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    for n in range(6):
        await a.request({"type": "sendMessage", "room": "lobby", "text": f"m{n}"}, "ack")
    newest = await a.request({"type": "history", "room": "lobby", "limit": 4}, "history")
    assert [m["seq"] for m in newest["messages"]] == [3, 4, 5, 6]
    older = await a.request(
        {"type": "history", "room": "lobby", "before_seq": 3, "limit": 4}, "history"
    )
    assert [m["seq"] for m in older["messages"]] == [1, 2]
    await a.close()


# --- presence, typing, read ---------------------------------------------------------------------


async def test_presence_counts_a_user_with_two_tabs_once_and_reports_joins_and_leaves(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_PRESENCE_FLUSH_MS = 20
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(slug="lobby")
    b = await joined(asgi_server, bob, "lobby")
    snapshot = await b.expect("presence")
    assert snapshot["snapshot"] is True
    assert [u["username"] for u in snapshot["online"]] == ["bob"]
    tab1 = await joined(asgi_server, alice, "lobby")
    await _presence_where(b, alice.pk, "joined")
    tab2 = await joined(asgi_server, alice, "lobby")
    online_now = (await tab2.expect("presence"))["online"]
    assert sorted(u["username"] for u in online_now) == ["alice", "bob"]
    headers = await sync_to_async(auth_header)(bob)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        online = (await http.get("/api/realtime/rooms/lobby/presence", headers=headers)).json()
    assert sorted(u["username"] for u in online["online"]) == ["alice", "bob"]
    await tab2.close()
    await asyncio.sleep(0.2)
    await b.fence()
    assert _presence_mentions(b, alice.pk, "joined") == 1
    assert _presence_mentions(b, alice.pk, "left") == 0
    await tab1.close()
    await _presence_where(b, alice.pk, "left")
    await b.close()


def _presence_mentions(client: Client, user_id: int, key: str) -> int:
    frames = [f for f in client.of("presence") if not f.get("snapshot")]
    return sum(1 for f in frames for u in f[key] if u["id"] == user_id)


async def _presence_where(client: Client, user_id: int, key: str) -> None:
    for _ in range(50):
        if _presence_mentions(client, user_id, key):
            return
        await client.fence()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no presence {key} for {user_id}: {client.of('presence')}")


async def test_a_user_who_leaves_within_one_presence_window_is_reported_left(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_PRESENCE_FLUSH_MS = 300
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    b = await joined(asgi_server, bob, "lobby")
    snapshot = await b.expect("presence")
    assert sorted(u["username"] for u in snapshot["online"]) == ["alice", "bob"]
    # Alice's join is not flushed yet; her leave must not cancel it out for bob, who saw her.
    await a.close()
    await _presence_where(b, alice.pk, "left")
    await b.close()


async def test_typing_reaches_the_others_in_the_room(asgi_server: LiveServer) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    b = await joined(asgi_server, bob, "lobby")
    await a.send({"type": "typing", "room": "lobby"})
    assert (await b.expect("typing"))["user"] == "alice"
    await a.fence()
    assert a.of("typing") == []
    await a.close()
    await b.close()


async def test_read_marker_only_moves_forward(asgi_server: LiveServer) -> None:
    alice = await user("alice")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    for n in range(3):
        await a.request({"type": "sendMessage", "room": "lobby", "text": f"m{n}"}, "ack")
    assert (await a.request({"type": "read", "room": "lobby", "seq": 2}, "read"))["seq"] == 2
    assert (await a.request({"type": "read", "room": "lobby", "seq": 1}, "read"))["seq"] == 2
    beyond = await a.request({"type": "read", "room": "lobby", "seq": 9}, "read")
    assert beyond["code"] == "bad_seq"
    await a.close()


# --- bad input, limits, slow clients --------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "sendMessage"}, "text_required"),
        ({"type": "sendMessage", "text": "   "}, "text_required"),
        ({"type": "sendMessage", "text": 5}, "text_required"),
        ({"type": "sendMessage", "text": "x" * 101}, "text_too_long"),
        ({"type": "sendMessage", "text": "hi", "room": 7}, "bad_room"),
        ({"type": "sendMessage", "text": "hi", "room": "nowhere"}, "room_not_found"),
        ({"type": "sendMessage", "text": "hi", "client_id": "c" * 65}, "bad_client_id"),
        ({"type": "join"}, "bad_room"),
        ({"type": "join", "room": "nowhere"}, "room_not_found"),
        ({"type": "leave", "room": "lobby"}, "not_joined"),
        ({"type": "typing", "room": "lobby"}, "not_joined"),
        ({"type": "history", "room": "lobby", "limit": 0}, "bad_limit"),
        ({"type": "history", "room": "lobby", "before_seq": "x"}, "bad_seq"),
        ({"type": "sync", "room": "lobby"}, "bad_seq"),
        ({"type": "sync", "room": "lobby", "after_seq": -1}, "bad_seq"),
        ({"type": "read", "room": "lobby", "seq": True}, "bad_seq"),
    ],
)
async def test_bad_messenger_input_gets_an_error_and_the_connection_survives(
    asgi_server: LiveServer, settings: SettingsWrapper, frame: dict[str, Any], code: str
) -> None:
    settings.REALTIME_MAX_MESSAGE_CHARS = 100
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    error = await a.request(frame, "never")
    assert (error["type"], error["code"]) == ("error", code)
    assert error["detail"]
    reply = await a.request({"type": "sendMessage", "room": "lobby", "text": "still here"}, "ack")
    assert reply["type"] == "ack"
    await a.close()


async def test_message_size_limit_applies_over_rest_too(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_MAX_MESSAGE_CHARS = 100
    await sync_to_async(room_create)(slug="lobby")
    headers = await sync_to_async(auth_header)(await user("alice"))
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        too_long = await http.post(
            "/api/realtime/rooms/lobby/messages", headers=headers, json={"text": "x" * 101}
        )
        fits = await http.post(
            "/api/realtime/rooms/lobby/messages", headers=headers, json={"text": "x" * 100}
        )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "text_too_long"
    assert fits.status_code == 201


async def test_per_user_rate_limit_spans_the_users_connections(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_USER_RATE_PER_SECOND = 0.1
    settings.REALTIME_USER_RATE_BURST = 4
    alice = await user("alice")
    tab1 = await Client.open(asgi_server.ws_url, alice)
    tab2 = await Client.open(asgi_server.ws_url, alice)
    replies = [await tab1.request({"type": "ping"}, "pong") for _ in range(3)]
    replies += [await tab2.request({"type": "ping"}, "pong") for _ in range(3)]
    assert [r["type"] for r in replies] == ["pong"] * 4 + ["error"] * 2
    assert replies[-1]["code"] == "rate_limited"
    await tab1.close()
    await tab2.close()


def _raw_socket_that_never_reads(server: LiveServer, ticket: str, room: str) -> socket.socket:
    """A WebSocket handshake and one `join` frame by hand, then the socket is never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/?ticket={ticket} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    payload = json.dumps({"type": "join", "room": room}).encode()
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


def _post_big_messages(room: Room, sender: Any, count: int, size: int) -> None:
    try:
        for n in range(count):
            services.message_send(user=sender, room=room, text=f"{n:05d}" + "x" * size)
    finally:
        connection.close()


async def test_a_client_that_stops_reading_is_dropped_without_delaying_others(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_MAX_MESSAGE_CHARS = 20000
    settings.REALTIME_SEND_BUFFER_FRAMES = 32
    room = await sync_to_async(room_create)(slug="lobby")
    slow_user, fast_user, sender = await user("slow"), await user("fast"), await user("sender")
    ticket, _ = await sync_to_async(services.ticket_issue)(user=slow_user)
    slow = await asyncio.to_thread(_raw_socket_that_never_reads, asgi_server, ticket, "lobby")
    fast = await joined(asgi_server, fast_user, "lobby")
    hub = fanout.hub()
    for _ in range(100):
        if len(hub.by_room.get(room.pk, ())) == 2:
            break
        await asyncio.sleep(0.05)
    dropped_before = fanout.SLOW_CLIENTS._value.get()
    count = 600
    # ~9 MB: more than the kernel buffers (4 MB max here) plus the outbox hold for one client.
    sending = asyncio.create_task(asyncio.to_thread(_post_big_messages, room, sender, count, 15000))
    received: list[int] = []
    while len(received) < count:
        frame = await fast.recv(wait=20)
        if frame["type"] == "message":
            received.append(int(frame["text"][:5]))
    await sending
    assert received == list(range(count))
    assert fanout.SLOW_CLIENTS._value.get() == dropped_before + 1
    assert slow_user.pk not in hub.by_user
    assert {c.user_id for c in hub.by_room.get(room.pk, ())} == {fast_user.pk}
    slow.close()
    await fast.close()


# --- REST ---------------------------------------------------------------------------------------


async def test_rest_rooms_members_and_messages(asgi_server: LiveServer) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(owner=bob, slug="lobby")  # alice can see bob there
    alice_h = await sync_to_async(auth_header)(alice)
    bob_h = await sync_to_async(auth_header)(bob)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        made = await http.post(
            "/api/realtime/rooms", headers=alice_h, json={"slug": "team", "kind": "private"}
        )
        assert made.status_code == 201
        assert made.json()["kind"] == "private"
        taken = await http.post("/api/realtime/rooms", headers=bob_h, json={"slug": "team"})
        assert taken.status_code == 409
        forbidden = await http.post(
            "/api/realtime/rooms/team/members", headers=bob_h, json={"user_id": bob.pk}
        )
        assert forbidden.status_code == 404
        added = await http.post(
            "/api/realtime/rooms/team/members", headers=alice_h, json={"user_id": bob.pk}
        )
        assert added.status_code == 201
        detail = (await http.get("/api/realtime/rooms/team", headers=bob_h)).json()
        assert sorted(m["username"] for m in detail["members"]) == ["alice", "bob"]
        for n in range(5):
            posted = await http.post(
                "/api/realtime/rooms/team/messages", headers=bob_h, json={"text": f"m{n}"}
            )
            assert posted.status_code == 201
            assert posted.json()["seq"] == n + 1
        retry = {"text": "again", "client_id": "k1"}
        first = await http.post("/api/realtime/rooms/team/messages", headers=bob_h, json=retry)
        second = await http.post("/api/realtime/rooms/team/messages", headers=bob_h, json=retry)
        assert (first.status_code, second.status_code) == (201, 200)
        assert first.json()["id"] == second.json()["id"]
        page = await http.get(
            "/api/realtime/rooms/team/messages",
            headers=alice_h,
            params={"after_seq": 1, "limit": 2},
        )
        assert [m["seq"] for m in page.json()] == [2, 3]
        page = await http.get(
            "/api/realtime/rooms/team/messages", headers=alice_h, params={"before_seq": 3}
        )
        assert [m["display"] for m in page.json()] == ["bob: m0", "bob: m1"]
        removed = await http.delete(f"/api/realtime/rooms/team/members/{bob.pk}", headers=alice_h)
        assert removed.status_code == 204
        gone = await http.get("/api/realtime/rooms/team/messages", headers=bob_h)
        assert gone.status_code == 404


async def test_removed_member_stops_receiving_the_private_room(asgi_server: LiveServer) -> None:
    alice, bob = await user("alice"), await user("bob")
    await sync_to_async(room_create)(owner=bob, slug="lobby")  # alice can see bob there
    room = await sync_to_async(room_create)(owner=alice, slug="team", kind="private")
    await sync_to_async(services.membership_add)(actor=alice, room=room, user_id=bob.pk)
    a = await joined(asgi_server, alice, "team")
    b = await joined(asgi_server, bob, "team")
    await sync_to_async(services.membership_remove)(actor=alice, room=room, user_id=bob.pk)
    assert (await b.expect("left"))["reason"] == "removed"
    await a.request({"type": "sendMessage", "room": "team", "text": "after"}, "ack")
    await a.expect("message", text="after")
    await b.fence()
    assert b.of("message") == []
    await a.close()
    await b.close()


async def test_moderation_blanks_the_message_and_keeps_its_seq(asgi_server: LiveServer) -> None:
    alice = await user("alice")
    await sync_to_async(room_create)(slug="lobby")
    a = await joined(asgi_server, alice, "lobby")
    ack = await a.request({"type": "sendMessage", "room": "lobby", "text": "rude"}, "ack")
    await sync_to_async(services.message_moderate_delete)(message_id=ack["id"])
    deleted = await a.expect("message_deleted")
    assert (deleted["id"], deleted["seq"]) == (ack["id"], 1)
    history = await a.request({"type": "history", "room": "lobby"}, "history")
    assert [(m["seq"], m["text"], m["deleted"]) for m in history["messages"]] == [(1, "", True)]
    synced = await a.request({"type": "sync", "room": "lobby", "after_seq": 0}, "sync")
    assert [(m["seq"], m["text"], m["deleted"]) for m in synced["messages"]] == [(1, "", True)]
    await a.close()


def test_rooms_visible_to_lists_public_and_own_private_rooms(db: None) -> None:
    alice, bob = UserFactory.create(), UserFactory.create()
    room_create(owner=alice, slug="open")
    room_create(owner=alice, slug="closed", kind="private")
    assert [r.slug for r in selectors.rooms_visible_to(bob)] == ["open"]
    assert [r.slug for r in selectors.rooms_visible_to(alice)] == ["closed", "open"]


async def test_a_user_auto_joined_to_the_default_room_is_online_there_for_everyone(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    """Issue 13: the silent join of the default room on connect counts the user present (REST
    presence, other members' diffs) without sending that socket frames it did not ask for."""
    settings.REALTIME_PRESENCE_FLUSH_MS = 20
    default = settings.REALTIME_DEFAULT_ROOM
    alice, bob = await user("alice"), await user("bob")
    watcher = await joined(asgi_server, bob, default)
    await watcher.expect("presence")  # the snapshot
    silent = await Client.open(asgi_server.ws_url, alice)  # never sends `join`
    await _presence_where(watcher, alice.pk, "joined")
    headers = await sync_to_async(auth_header)(bob)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        online = (await http.get(f"/api/realtime/rooms/{default}/presence", headers=headers)).json()
    assert sorted(u["username"] for u in online["online"]) == ["alice", "bob"]
    await silent.fence()
    assert silent.of("presence") == [] and silent.of("joined") == []
    await silent.close()
    await _presence_where(watcher, alice.pk, "left")
    await watcher.close()
