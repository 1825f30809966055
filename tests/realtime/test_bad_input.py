"""Bad input at the realtime doors (issue 10, item 1, and `input-policy.md`), over real sockets.

Every frame is parsed by the shared parsers: a refusal is an `error` frame naming the field and
the reason, and the socket keeps working. An unexpected exception is answered `internal`; any
end of a connection (crash in connect, receive or disconnect, a refused write, an abrupt drop)
leaves no presence, no hub registration and the `realtime_ws_connections` gauge at its baseline.
"""

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from websockets.exceptions import ConnectionClosed

from common import parsers
from realtime import consumers, fanout, selectors, services
from realtime.models import Message, Room
from realtime.services import TopicAccess, messages
from tests.conftest import LiveServer
from tests.factories import UserFactory, auth_header
from tests.realtime.client import Client
from tests.realtime.factories import room_create

pytestmark = pytest.mark.timeout(90)

services.topic_register("test.public", access=TopicAccess.AUTHENTICATED)

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]


async def user(name: str) -> Any:
    return await sync_to_async(UserFactory.create)(username=name)


def gauge() -> float:
    return float(consumers.CONNECTIONS._value.get())


async def eventually(check: Callable[[], bool], what: str, wait: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + wait
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.02)


def message_texts() -> list[str]:
    return list(Message.objects.order_by("pk").values_list("text", flat=True))


def online_ids(room: Room) -> set[int]:
    return {member["id"] for member in fanout.hub().presence_online(room.pk)}


async def assert_released(room: Room, who: Any, baseline: float) -> None:
    """Presence, the hub's indexes and the gauge are as if `who` had never connected."""
    hub = fanout.hub()
    await eventually(lambda: gauge() == baseline, f"gauge back to {baseline} (is {gauge()})")
    await eventually(lambda: who.pk not in hub.by_user, "user detached from the hub")
    await eventually(
        lambda: all(c.user_id != who.pk for c in hub.by_room.get(room.pk, ())), "room released"
    )
    await eventually(
        lambda: all(c.user_id != who.pk for cs in hub.by_topic.values() for c in cs),
        "topics released",
    )
    # Presence is left after the local indexes, one room after another (the default room the
    # socket joined on connect included), each a Redis call: wait for it, do not sample it.
    deadline = asyncio.get_running_loop().time() + 5
    while who.pk in await sync_to_async(online_ids)(room):
        assert asyncio.get_running_loop().time() < deadline, f"{who} still online in {room}"
        await asyncio.sleep(0.02)


async def still_works(client: Client, room: str = "lobby") -> None:
    assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
    ack = await client.request({"type": "sendMessage", "room": room, "text": "still here"}, "ack")
    assert ack["type"] == "ack", ack


# --- item 1: lone surrogates, NUL and controls in any field, in any frame ----------------------


def _poisoned(frame: dict[str, Any], bad: str) -> dict[str, Any]:
    """`frame` with `{s}` replaced by `bad` in every string, keys included."""
    return json.loads(json.dumps(frame).replace("{s}", json.dumps(bad)[1:-1]))


async def refusals(client: Client, frames: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(code, field, reason) of the error each frame gets, one after the other on one socket."""
    got = []
    for frame in frames:
        error = await client.request(frame, "never")
        got.append((error["type"], error.get("code"), error.get("field"), error.get("reason")))
    return got


@pytest.mark.parametrize(
    ("frame", "field", "code"),
    [
        ({"type": "sendMessage", "text": "x{s}"}, "text", "bad_text"),
        ({"type": "sendMessage", "text": "hi", "room": "lobby{s}"}, "room", "bad_room"),
        ({"type": "sendMessage", "text": "hi", "client_id": "c{s}"}, "client_id", "bad_client_id"),
        ({"type": "join", "room": "{s}"}, "room", "bad_room"),
        ({"type": "leave", "room": "lobby{s}"}, "room", "bad_room"),
        ({"type": "typing", "room": "lobby{s}"}, "room", "bad_room"),
        ({"type": "history", "room": "lobby", "before_seq": "1{s}"}, "before_seq", "bad_seq"),
        ({"type": "sync", "room": "lobby", "after_seq": "{s}"}, "after_seq", "bad_seq"),
        ({"type": "read", "room": "lobby{s}", "seq": 1}, "room", "bad_room"),
        ({"type": "subscribe", "topic": "test.public{s}"}, "topic", "bad_topic"),
        ({"type": "unsubscribe", "topic": "{s}"}, "topic", "bad_topic"),
        ({"type": "ping", "pad": {"deep": ["{s}"]}}, "pad.deep[0]", "bad_frame"),
        ({"type": "ping{s}"}, "type", "unknown_type"),
    ],
)
async def test_a_lone_surrogate_in_any_field_gets_an_error_frame_and_the_socket_stays_open(
    asgi_server: LiveServer, frame: dict[str, Any], field: str, code: str
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    got = await refusals(a, [_poisoned(frame, surrogate) for surrogate in SURROGATES])
    assert got == [("error", code, field, "encoding")] * len(SURROGATES)
    await still_works(a)
    await a.close()
    assert await sync_to_async(message_texts)() == ["still here"]


async def test_the_issue_frame_sent_as_raw_text_is_refused_and_leaves_nothing_behind(
    asgi_server: LiveServer,
) -> None:
    room = await sync_to_async(room_create)(slug="lobby")
    baseline = gauge()
    alice = await user("alice")
    a = await Client.open(asgi_server.ws_url, alice)
    await a.request({"type": "join", "room": "lobby"}, "joined")
    await a.ws.send('{"type":"sendMessage","text":"x\\ud800"}')
    error = await a.expect("error")
    assert (error["code"], error["field"], error["reason"]) == ("bad_text", "text", "encoding")
    await still_works(a)
    await a.close()
    await assert_released(room, alice, baseline)


@pytest.mark.parametrize(
    ("template", "code", "cases"),
    [
        (
            {"type": "join", "room": "{v}"},
            "bad_room",
            [
                ("lob\x00by", "control"),
                ("lobby\n", "control"),
                ("\tlobby", "control"),
                ("lob by", "format"),
                ("lobbÿ", "format"),
                ("lob/by", "format"),
                ("r" * 81, "too_long"),
                ("", "blank"),
                (["lobby"], "type"),
                (7, "type"),
            ],
        ),
        (
            {"type": "sendMessage", "text": "{v}"},
            "bad_text",
            [("a\x00b", "control"), ("bell\x07", "control"), ("esc\x1b[2J", "control")],
        ),
        (
            {"type": "sendMessage", "text": "hi", "client_id": "{v}"},
            "bad_client_id",
            [
                ("c\x00", "control"),
                ("c\r", "control"),
                ("a b", "format"),
                ("ключ", "format"),
                ("c" * 65, "too_long"),
                ("", "blank"),
                (7, "type"),
            ],
        ),
        (
            {"type": "subscribe", "topic": "{v}"},
            "bad_topic",
            [
                ("test.public\n", "control"),
                ("test.public\x00", "control"),
                ("Test.public", "format"),
                ("t" * 91, "too_long"),
                (None, "required"),
            ],
        ),
    ],
)
async def test_nul_controls_and_bad_charsets_are_refused_with_their_field(
    asgi_server: LiveServer, template: dict[str, Any], code: str, cases: list[tuple[Any, str]]
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    field = next(key for key, value in template.items() if value == "{v}")
    frames = [{**template, field: value} for value, _ in cases]
    got = await refusals(a, frames)
    assert got == [("error", code, field, reason) for _, reason in cases]
    await still_works(a)
    await a.close()


async def test_frame_level_refusals_name_the_offending_key_or_the_type(
    asgi_server: LiveServer,
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    got = await refusals(
        a,
        [
            {"type": "ping", "pad": "\x00"},
            {"type": "ping", "\x00": 1},
            {"type": "ping", "k\ud800": 1},
            {"type": None},
            {"type": 5},
            {"type": "launch"},
            {"type": "ping\x00"},
        ],
    )
    assert got == [
        ("error", "bad_frame", "pad", "control"),
        ("error", "bad_frame", "frame", "control"),
        ("error", "bad_frame", "frame", "encoding"),
        ("error", "bad_frame", "type", "required"),
        ("error", "bad_frame", "type", "type"),
        ("error", "unknown_type", "type", "choice"),
        ("error", "unknown_type", "type", "control"),
    ]
    await still_works(a)
    await a.close()


async def test_multiline_text_with_tabs_and_newlines_is_accepted_as_sent(
    asgi_server: LiveServer,
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.request({"type": "join", "room": "lobby"}, "joined")
    text = "  line one\n\tline two\r\n😀 "
    await a.request({"type": "sendMessage", "room": "lobby", "text": text}, "ack")
    assert (await a.expect("message"))["text"] == text
    await a.close()


async def test_malformed_documents_and_deep_nesting_are_refused_without_recursion(
    asgi_server: LiveServer,
) -> None:
    cases: list[tuple[str | bytes, str, str]] = [
        ('{"type":"ping","x":' + "[" * 5000 + "]" * 5000 + "}", "bad_json", "too_deep"),
        ("[" * 8000 + "]" * 8000, "bad_json", "too_deep"),
        (
            '{"type":"ping","x":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}}',
            "bad_json",
            "too_deep",
        ),
        ('{"type":"sync","room":"lobby","after_seq":1e400}', "bad_seq", "type"),
        ('{"type":"sync","room":"lobby","after_seq":1E2}', "bad_seq", "type"),
        ('{"type":"sync","room":"lobby","after_seq":10.0}', "bad_seq", "type"),
        ('{"type":"ping","x":NaN}', "bad_json", "format"),
        ('{"type":"ping","x":-Infinity}', "bad_json", "format"),
        ('{"type":"ping"', "bad_json", "format"),
        ('{"type":"ping"}{}', "bad_json", "format"),
        ("", "bad_json", "format"),
        ('"ping"', "bad_frame", "type"),
        ("null", "bad_frame", "type"),
        ("[]", "bad_frame", "type"),
        (b"\xff\xfe{}", "bad_frame", "encoding"),
        (b'{"type":"ping","x":"\xed\xa0\x80"}', "bad_frame", "encoding"),
        ('{"type":"ping","pad":"' + "x" * 20000 + '"}', "frame_too_large", "too_large"),
    ]
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.fence()
    got = []
    for raw, _, _ in cases:
        await a.ws.send(raw)
        reply = await a.recv()
        got.append((reply["type"], reply.get("code"), reply.get("reason")))
    assert got == [("error", code, reason) for _, code, reason in cases]
    await a.ws.send(b'{"type":"ping"}')
    assert await a.recv() == {"type": "pong", "ref": None}
    await still_works(a)
    await a.close()


# --- numbers: ASCII digits within int64, no floats, signs, exponents or foreign digits ----------

BAD_NUMBERS = [
    (2**63, "range"),
    (2**64 + 1, "range"),
    (-1, "range"),
    ("-1", "range"),
    ("9" * 30, "range"),
    (1.0, "type"),
    (True, "type"),
    ([1], "type"),
    ({"n": 1}, "type"),
    ("\u0661\u0660", "format"),
    ("\uff11\uff12", "format"),
    ("²", "format"),
    ("1_0", "format"),
    ("+1", "format"),
    ("1e3", "format"),
    (" 1", "format"),
    ("", "format"),
    ("0x10", "format"),
]


@pytest.mark.parametrize(
    ("template", "field", "code", "extra"),
    [
        ({"type": "sync", "room": "lobby"}, "after_seq", "bad_seq", [(None, "required")]),
        ({"type": "history", "room": "lobby"}, "before_seq", "bad_seq", []),
        ({"type": "history", "room": "lobby"}, "limit", "bad_limit", [(0, "range")]),
        ({"type": "read", "room": "lobby"}, "seq", "bad_seq", [(-(2**63) - 1, "range")]),
    ],
)
async def test_numbers_outside_int64_or_not_ascii_digits_are_refused(
    asgi_server: LiveServer,
    template: dict[str, Any],
    field: str,
    code: str,
    extra: list[tuple[Any, str]],
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    cases = BAD_NUMBERS + extra
    got = await refusals(a, [{**template, field: value} for value, _ in cases])
    assert got == [("error", code, field, reason) for _, reason in cases]
    await still_works(a)
    await a.close()


async def test_int64_edges_and_digit_strings_are_served(asgi_server: LiveServer) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.request({"type": "join", "room": "lobby"}, "joined")
    await a.request({"type": "sendMessage", "room": "lobby", "text": "one"}, "ack")
    top = parsers.INT64_MAX
    synced = await a.request({"type": "sync", "room": "lobby", "after_seq": top}, "sync")
    assert (synced["messages"], synced["reset_required"]) == ([], False)
    page = await a.request(
        {"type": "history", "room": "lobby", "before_seq": top, "limit": top}, "history"
    )
    assert [m["text"] for m in page["messages"]] == ["one"]
    page = await a.request({"type": "history", "room": "lobby", "before_seq": "2"}, "history")
    assert [m["seq"] for m in page["messages"]] == [1]
    beyond = await a.request({"type": "read", "room": "lobby", "seq": top}, "read")
    assert beyond["code"] == "bad_seq"
    assert (await a.request({"type": "read", "room": "lobby", "seq": "1"}, "read"))["seq"] == 1
    await a.close()


# --- echoed values are validated before they are echoed ---------------------------------------


async def test_a_bad_ref_is_refused_and_never_echoed(asgi_server: LiveServer) -> None:
    cases: list[tuple[Any, str]] = [
        ("r" * 65, "too_long"),
        ("r\x00", "control"),
        ("r\n", "control"),
        ("r\ud800", "encoding"),
        ("", "blank"),
        (1.5, "type"),
        ([1], "type"),
        ({"a": 1}, "type"),
        (True, "type"),
        (2**63, "range"),
        (-(2**63) - 1, "range"),
    ]
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.fence()
    got = []
    for ref, _ in cases:
        await a.send({"type": "ping", "ref": ref})
        error = await a.recv()
        got.append((error["type"], error["code"], error["field"], error["reason"], error["ref"]))
    assert got == [("error", "bad_ref", "ref", reason, None) for _, reason in cases]
    await a.fence()
    await a.close()


async def test_a_valid_ref_is_echoed_also_when_another_field_is_poisoned(
    asgi_server: LiveServer,
) -> None:
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.fence()
    for ref in ["r-7", "résumé ok", -5, 0, 2**63 - 1, -(2**63)]:
        await a.send({"type": "ping", "ref": ref})
        assert await a.recv() == {"type": "pong", "ref": ref}
        await a.send({"type": "sendMessage", "text": "x\ud800", "ref": ref})
        error = await a.recv()
        assert (error["code"], error["ref"]) == ("bad_text", ref)
    await a.close()


async def test_echoed_room_client_id_and_topic_are_the_validated_values(
    asgi_server: LiveServer,
) -> None:
    await sync_to_async(room_create)(slug="lobby")
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.request({"type": "join", "room": "lobby"}, "joined")
    frame = {"type": "sendMessage", "room": "lobby", "text": "hi", "client_id": "k.1:a-B_2"}
    ack = await a.request(frame, "ack")
    assert (ack["room"], ack["duplicate"]) == ("lobby", False)
    assert (await a.expect("message"))["client_id"] == "k.1:a-B_2"
    assert (await a.request({"type": "read", "room": "lobby", "seq": 1}, "read"))["room"] == "lobby"
    subscribed = await a.request({"type": "subscribe", "topic": "test.public"}, "subscribed")
    assert subscribed["topic"] == "test.public"
    await a.close()


# --- one catch-all per frame and per connection; cleanup on every exit path ----------------------


async def test_a_frame_that_crashes_is_answered_internal_logged_once_and_the_socket_survives(
    asgi_server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    room = await sync_to_async(room_create)(slug="lobby")
    baseline = gauge()
    alice = await user("alice")
    a = await Client.open(asgi_server.ws_url, alice)
    await a.request({"type": "join", "room": "lobby"}, "joined")
    await a.request({"type": "subscribe", "topic": "test.public"}, "subscribed")

    def explode(**kwargs: Any) -> Any:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(messages, "message_send", explode)
    caplog.set_level(logging.ERROR, logger="realtime.consumers")
    error = await a.request({"type": "sendMessage", "room": "lobby", "text": "boom"}, "ack")
    assert (error["type"], error["code"]) == ("error", "internal")
    assert error["detail"] == "internal error"
    assert "hunter2" not in json.dumps(error)
    request_id = error["request_id"]
    logged = [r for r in caplog.records if "realtime_ws_frame_failed" in str(r.msg)]
    assert len(logged) == 1
    assert isinstance(logged[0].msg, dict) and logged[0].msg["request_id"] == request_id
    assert logged[0].msg["ws_connection"] in request_id
    monkeypatch.undo()
    await still_works(a)
    await a.close()
    await assert_released(room, alice, baseline)


async def test_a_consumer_that_crashes_in_connect_is_closed_with_1011_and_leaves_nothing(
    asgi_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = await sync_to_async(room_create)(slug="general")
    baseline = gauge()
    alice = await user("alice")

    def explode(**kwargs: Any) -> Any:
        raise RuntimeError("connect crashed")

    monkeypatch.setattr(selectors, "room_get_visible", explode)  # the default room's autojoin
    a = await Client.open(asgi_server.ws_url, alice)
    with pytest.raises(ConnectionClosed) as closed:
        await a.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await assert_released(room, alice, baseline)
    monkeypatch.undo()
    again = await Client.open(asgi_server.ws_url, alice)
    await still_works(again, room="general")
    await again.close()
    await assert_released(room, alice, baseline)


async def test_a_consumer_that_crashes_in_disconnect_still_leaves_presence_and_the_gauge(
    asgi_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = await sync_to_async(room_create)(slug="lobby")
    baseline = gauge()
    alice, bob = await user("alice"), await user("bob")
    b = await Client.open(asgi_server.ws_url, bob)
    await b.request({"type": "join", "room": "lobby"}, "joined")
    a = await Client.open(asgi_server.ws_url, alice)
    await a.request({"type": "join", "room": "lobby"}, "joined")
    await a.request({"type": "subscribe", "topic": "test.public"}, "subscribed")
    await presence_seen(b, alice.pk, "joined")

    async def explode(self: Any, code: int) -> None:
        raise RuntimeError("disconnect crashed")

    monkeypatch.setattr(consumers.HubConsumer, "disconnect", explode)
    await a.close()
    await assert_released(room, alice, baseline + 1)
    monkeypatch.undo()
    await presence_seen(b, alice.pk, "left")
    await b.close()
    await assert_released(room, bob, baseline)


async def presence_seen(client: Client, user_id: int, key: str) -> None:
    for _ in range(100):
        if any(u["id"] == user_id for f in client.of("presence") for u in f.get(key, [])):
            return
        await client.fence()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no presence {key} for {user_id}: {client.of('presence')}")


def _raw_join(server: LiveServer, ticket: str, room: str) -> socket.socket:
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(
        (
            f"GET /ws/?ticket={ticket} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    payload = json.dumps({"type": "join", "room": room, "ref": "j"}).encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    received = b""
    while b'"joined"' not in received:
        received += sock.recv(4096)
    return sock


async def test_an_abrupt_client_drop_releases_presence_and_the_gauge(
    asgi_server: LiveServer,
) -> None:
    room = await sync_to_async(room_create)(slug="lobby")
    baseline = gauge()
    alice = await user("alice")
    ticket, _ = await sync_to_async(services.ticket_issue)(user=alice)
    sock = await asyncio.to_thread(_raw_join, asgi_server, ticket, "lobby")
    await eventually(lambda: gauge() == baseline + 1, "connected")
    assert alice.pk in await sync_to_async(online_ids)(room)
    # RST instead of a close frame: the client vanished mid-conversation.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await assert_released(room, alice, baseline)


async def test_a_frame_the_transport_refuses_closes_the_socket_with_1011_and_only_that_one(
    asgi_server: LiveServer,
) -> None:
    services.topic_register("test.other", access=TopicAccess.AUTHENTICATED)
    room = await sync_to_async(room_create)(slug="lobby")
    baseline = gauge()
    alice, bob = await user("alice"), await user("bob")
    a = await Client.open(asgi_server.ws_url, alice)
    await a.request({"type": "join", "room": "lobby"}, "joined")
    await a.request({"type": "subscribe", "topic": "test.public"}, "subscribed")
    b = await Client.open(asgi_server.ws_url, bob)
    await b.request({"type": "subscribe", "topic": "test.other"}, "subscribed")
    # An encoded frame no UTF-8 transport can write (publish refuses these; see below).
    fanout.hub().publish_threadsafe({"topic": "test.public", "frame": '{"x":"\ud800"}'})
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await a.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await assert_released(room, alice, baseline + 1)
    await b.request({"type": "ping"}, "pong")
    again = await Client.open(asgi_server.ws_url, alice)
    await still_works(again)
    await again.close()
    await b.close()
    await assert_released(room, alice, baseline)


async def test_a_poison_event_payload_is_dropped_at_publish_and_subscribers_keep_receiving(
    asgi_server: LiveServer,
) -> None:
    a = await Client.open(asgi_server.ws_url, await user("alice"))
    await a.request({"type": "subscribe", "topic": "test.public"}, "subscribed")
    await sync_to_async(services.publish)("test.public", {"name": "doc\ud800.pdf"})
    await sync_to_async(services.publish)("test.public", {"name": "fine.pdf"})
    event = await a.expect("event")
    assert event["payload"] == {"name": "fine.pdf"}
    await a.fence()
    assert len(a.of("event")) == 1
    await a.close()


# --- realtime REST input: NUL, surrogates and out-of-range numbers are 400, never 500 ----------

_NUL = "\\u0000"
_SURROGATE = "\\ud800"


_NUL = "\\u0000"
_SURROGATE = "\\ud800"


@pytest.mark.parametrize(
    ("method", "path", "bodies"),
    [
        (
            "POST",
            "/api/realtime/rooms/lobby/messages",
            [
                f'{{"text": "a{_NUL}b"}}',
                f'{{"text": "x{_SURROGATE}"}}',
                '{"text": "bell\\u0007"}',
                '{"text": 5}',
                '{"text": null}',
                '{"text": "' + "x" * 10_001 + '"}',
                f'{{"text": "ok", "client_id": "c{_NUL}"}}',
                f'{{"text": "ok", "client_id": "{_SURROGATE}"}}',
                '{"text": "ok", "client_id": "a b"}',
                '{"text": "ok", "client_id": "' + "c" * 65 + '"}',
                "[]",
                "null",
            ],
        ),
        (
            "POST",
            "/api/realtime/rooms",
            [
                f'{{"slug": "a{_NUL}b"}}',
                f'{{"slug": "a{_SURROGATE}"}}',
                '{"slug": "a.b"}',
                '{"slug": "' + "s" * 81 + '"}',
                f'{{"slug": "ok", "title": "t{_NUL}"}}',
                f'{{"slug": "ok", "title": "t{_SURROGATE}"}}',
                '{"slug": "ok", "title": "t\\n"}',
                '{"slug": "ok", "kind": "direct"}',
            ],
        ),
        (
            "POST",
            "/api/realtime/direct",
            [
                '{"user_id": 9223372036854775808}',
                '{"user_id": "²"}',
                '{"user_id": "\\u0661\\u0660"}',
                '{"user_id": "1e3"}',
                '{"user_id": "1_0"}',
                '{"user_id": 1.5}',
                '{"user_id": -1}',
                '{"user_id": 0}',
                '{"user_id": true}',
                f'{{"user_id": "1{_NUL}"}}',
                '{"user_id": "12345678901234567890"}',
            ],
        ),
        (
            "POST",
            "/api/realtime/rooms/lobby/members",
            ['{"user_id": 18446744073709551616}', '{"user_id": "12345678901234567890"}'],
        ),
        (
            "GET",
            "/api/realtime/rooms/lobby/messages",
            [
                "after_seq=%00",
                "after_seq=%ED%A0%80",
                "after_seq=9223372036854775808",
                "after_seq=99999999999999999999999",
                "before_seq=-1",
                "before_seq=%D9%A1",
                "before_seq=%C2%B2",
                "limit=0",
                "limit=1.5",
                "limit=1_0",
                "limit=+5",
            ],
        ),
    ],
)
async def test_rest_input_with_nul_surrogates_or_bad_numbers_is_a_400(
    asgi_server: LiveServer, method: str, path: str, bodies: list[str]
) -> None:
    alice = await user("alice")
    await sync_to_async(room_create)(owner=alice, slug="lobby")
    headers = {**(await sync_to_async(auth_header)(alice)), "Content-Type": "application/json"}
    got = []
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=10) as http:
        for body in bodies:
            if method == "GET":
                response = await http.get(f"{path}?{body}", headers=headers)
            else:
                response = await http.request(method, path, headers=headers, content=body)
            got.append((body[:60], response.status_code, bool(response.json()["error"]["code"])))
        fine = await http.post(
            "/api/realtime/rooms/lobby/messages", headers=headers, json={"text": "fine"}
        )
        assert fine.status_code == 201
    assert got == [(body[:60], 400, True) for body in bodies]
    assert await sync_to_async(Message.objects.count)() == 1


@pytest.mark.parametrize("ticket", ["%00", "a%00b", "%ED%A0%80", "x" * 300, "a b"])
async def test_a_malformed_ticket_is_closed_with_4401(asgi_server: LiveServer, ticket: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket.replace(' ', '%20')}") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
