"""Bounded fuzz of the `/ws/` door over real WebSockets (issue 10, `input-policy.md`).

Deterministic (`random.Random(10)`): valid frames of every type, from three users on three
sockets, are mutated (fields deleted or given hostile values, lone surrogates, NUL and controls
spliced into strings and keys, huge, negative and float integers, non-ASCII digits, deep nesting,
unknown types, extra keys, duplicate keys, truncated text, NaN/1e400 literals, oversize frames,
random bytes as binary frames); now and then a socket is dropped without a close frame and
reopened. After each input a sentinel `ping` must be answered on the same socket.

Fails on any `error {code: "internal"}`, on any socket closed by the server (no input may cost
the connection: rate limits are lifted for the run), on a server that stops serving, and on
anything leaked: the `realtime_ws_connections` gauge, the hub's user/room/topic indexes,
presence, and database rows (every stored message was acknowledged and holds clean text).
`FIGURES` holds the last run's counts, also written to `var/fuzz/websocket.json`.
"""

import asyncio
import collections
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from pytest_django.fixtures import Settings as SettingsWrapper
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from common import parsers
from realtime import consumers, fanout, protocol, services
from realtime.models import Message, Room
from realtime.services import TopicAccess
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.timeout(120)

SEED = 10
INPUTS = 1000
DROP_EVERY = 100
REPORT = Path(__file__).resolve().parents[2] / "var" / "fuzz" / "websocket.json"
FIGURES = {"tried": 0, "refused": 0, "accepted": 0, "crashing": 0, "dropped_by_client": 0}
CODES: collections.Counter[str] = collections.Counter()

services.topic_register("fuzz.public", access=TopicAccess.AUTHENTICATED)
services.topic_register("fuzz.ops", access=TopicAccess.STAFF)
services.topic_register("fuzz.mine", access=TopicAccess.OWNER)

SPICE = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x9f"]
EXOTIC = ["é", "😀", "\u202e", "\ufeff", "\u200b", "\u0301", "ß", "\uffff", "\U0010ffff"]
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    1e308,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    "",
    " ",
    "x" * 5000,
    [],
    {},
    [1, [2, [3]]],
    {"a": {"b": 1}},
    "\u0661\u0662",
    "\uff11\uff12",
    "²",
    "1_0",
    "+1",
    "-1",
    "1e3",
    "0x1f",
    "NaN",
    "null",
    "lobby",
    "general",
    "secret",
    "fuzz.public",
    "dm-1-2",
]
LITERALS = ["1e400", "-1e400", "NaN", "Infinity", "-0", "1E2", "10.0", "1.0e1", "[" * 9 + "]" * 9]
KEYS = [
    "type",
    "ref",
    "room",
    "text",
    "client_id",
    "seq",
    "after_seq",
    "before_seq",
    "limit",
    "topic",
]


class Context:
    """What the generator may name: users, rooms, topics."""

    def __init__(self, users: list[Any], rooms: list[str]) -> None:
        self.users = users
        self.rooms = rooms

    def topics(self, user: Any) -> list[str]:
        return ["fuzz.public", "fuzz.ops", f"fuzz.mine.{user.pk}", f"fuzz.mine.{user.pk + 1}"]


def valid_frame(rng: random.Random, ctx: Context, user: Any) -> dict[str, Any]:
    room = rng.choice(ctx.rooms)
    kind = rng.choice(
        ["sendMessage"] * 4
        + ["join", "leave", "history", "sync", "typing", "read", "subscribe", "unsubscribe"]
        + ["ping"]
    )
    frame: dict[str, Any] = {"type": kind}
    if rng.random() < 0.5:
        frame["ref"] = rng.choice([f"r{rng.randrange(10**6)}", rng.randrange(10**9)])
    if kind == "sendMessage":
        frame["text"] = rng.choice(["hi", "hello there", " multi\nline\ttext ", "".join(EXOTIC)])
        if rng.random() < 0.7:
            frame["room"] = room
        if rng.random() < 0.4:
            frame["client_id"] = f"c-{rng.randrange(50)}"
    elif kind in ("join", "leave", "typing"):
        frame["room"] = room
    elif kind == "history":
        frame["room"] = room
        if rng.random() < 0.5:
            frame["before_seq"] = rng.randrange(0, 50)
        if rng.random() < 0.5:
            frame["limit"] = rng.randrange(1, 200)
    elif kind == "sync":
        frame |= {"room": room, "after_seq": rng.randrange(0, 50)}
    elif kind == "read":
        frame |= {"room": room, "seq": rng.randrange(0, 20)}
    elif kind in ("subscribe", "unsubscribe"):
        frame["topic"] = rng.choice(ctx.topics(user))
    return frame


def _spiced(rng: random.Random, value: str) -> str:
    at = rng.randrange(len(value) + 1)
    return value[:at] + rng.choice(SPICE) + value[at:]


def mutate(rng: random.Random, frame: dict[str, Any]) -> dict[str, Any]:
    frame = dict(frame)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(8)
        key = rng.choice(list(frame)) if frame else "type"
        if op == 0 and frame:
            del frame[key]
        elif op == 1:
            frame[rng.choice([key, *KEYS])] = rng.choice(HOSTILE)
        elif op == 2:
            strings = [k for k, v in frame.items() if isinstance(v, str)] or ["text"]
            target = rng.choice(strings)
            frame[target] = _spiced(rng, str(frame.get(target, "")))
        elif op == 3:
            frame[_spiced(rng, rng.choice(["pad", "x", key]))] = rng.choice(HOSTILE)
        elif op == 4:
            frame["type"] = rng.choice(["launch", "SENDMESSAGE", "send_message", "", "ping "])
        elif op == 5:
            frame[rng.choice(KEYS)] = "".join(rng.choice(EXOTIC) for _ in range(rng.randrange(9)))
        elif op == 6:
            frame[f"extra{rng.randrange(5)}"] = rng.choice(HOSTILE)
        else:
            frame[rng.choice(KEYS)] = rng.choice(["r" * 81, "c" * 65, "t" * 91, "x" * 4001])
    return frame


def raw_input(rng: random.Random, frame: dict[str, Any]) -> str | bytes:
    """The frame as sent: usually its JSON, sometimes broken at the byte or literal level."""
    roll = rng.random()
    if roll < 0.70:
        return json.dumps(frame)
    if roll < 0.76:
        text = json.dumps(frame)
        return text[: rng.randrange(len(text))]
    if roll < 0.84:
        key = rng.choice(KEYS)
        depth = rng.choice([LITERALS[-1], "[" * 50 + "]" * 50, "[" * 4000 + "]" * 4000])
        literal = rng.choice([*LITERALS, depth])
        return json.dumps({**frame, key: "__LITERAL__"}).replace('"__LITERAL__"', literal)
    if roll < 0.88:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if roll < 0.92:
        return json.dumps(frame).encode()
    if roll < 0.95:
        return json.dumps(frame)[:-1] + ', "type": "ping", "type": "sendMessage"}'
    if roll < 0.97:
        return json.dumps({**frame, "pad": "p" * rng.choice([16_000, 17_000, 40_000])})
    return "[" * 8000 + "]" * 8000


async def open_socket(server: LiveServer, user: Any) -> ClientConnection:
    ticket, _ = await sync_to_async(services.ticket_issue)(user=user)
    return await connect(f"{server.ws_url}/ws/?ticket={ticket}", open_timeout=10, max_size=None)


async def answer(ws: ClientConnection, fence: str) -> list[dict[str, Any]]:
    """Every frame up to the pong of `fence` (frames meanwhile broadcast included)."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == "pong" and frame.get("ref") == fence:
            return frames
        frames.append(frame)


def _world() -> tuple[list[Any], list[str]]:
    alice = StaffFactory.create(username="fuzz-alice")
    bob, carol = UserFactory.create(username="fuzz-bob"), UserFactory.create(username="fuzz-carol")
    services.room_create(user=alice, slug="lobby")
    services.room_create(user=alice, slug="secret", kind=Room.Kind.PRIVATE)
    services.room_default()
    direct = services.direct_get_or_create(user=alice, other_user_id=bob.pk)
    return [alice, bob, carol], ["lobby", "secret", "general", direct.slug, "nowhere"]


def _stored() -> list[tuple[int, str, str | None]]:
    return list(Message.objects.values_list("pk", "text", "client_id"))


def _online() -> dict[str, list[fanout.OnlineUser]]:
    hub = fanout.hub()
    return {room.slug: hub.presence_online(room.pk) for room in Room.objects.all()}


async def _eventually(check: Any, what: str) -> None:
    for _ in range(250):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


@pytest.mark.timeout(180)
async def test_websocket_fuzz_never_crashes_drops_or_leaks(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    for name in ("REALTIME_RATE_PER_SECOND", "REALTIME_USER_RATE_PER_SECOND"):
        setattr(settings, name, 1e9)
    for name in ("REALTIME_RATE_BURST", "REALTIME_USER_RATE_BURST"):
        setattr(settings, name, 10**9)
    users, rooms = await sync_to_async(_world)()
    ctx = Context(users, rooms)
    rng = random.Random(SEED)
    FIGURES.update(dict.fromkeys(FIGURES, 0))
    CODES.clear()
    failures: list[str] = []
    acked: set[int] = set()
    baseline = float(consumers.CONNECTIONS._value.get())
    sockets = [await open_socket(asgi_server, who) for who in users]
    started = time.monotonic()

    for n in range(INPUTS):
        index = rng.randrange(len(users))
        who, ws = users[index], sockets[index]
        frame = valid_frame(rng, ctx, who)
        raw = raw_input(rng, frame if rng.random() < 0.15 else mutate(rng, frame))
        fence = f"fence-{n}"
        FIGURES["tried"] += 1
        try:
            await ws.send(raw)
            await ws.send(json.dumps({"type": "ping", "ref": fence}))
            replies = await answer(ws, fence)
        except (ConnectionClosed, TimeoutError) as error:
            FIGURES["crashing"] += 1
            failures.append(f"#{n} {raw[:200]!r}: socket lost ({error!r})")
            sockets[index] = await open_socket(asgi_server, who)
            continue
        errors = [r for r in replies if r.get("type") == "error"]
        acked |= {r["id"] for r in replies if r.get("type") == "ack"}
        CODES.update(str(e.get("code")) for e in errors)
        if any(e.get("code") == "internal" for e in errors):
            FIGURES["crashing"] += 1
            failures.append(f"#{n} {raw[:200]!r}: {errors}")
        elif errors:
            FIGURES["refused"] += 1
        else:
            FIGURES["accepted"] += 1
        if n % DROP_EVERY == DROP_EVERY - 1:
            # Gone without a close frame, mid-conversation; the user comes back.
            dropped = rng.randrange(len(users))
            sockets[dropped].transport.abort()
            FIGURES["dropped_by_client"] += 1
            sockets[dropped] = await open_socket(asgi_server, users[dropped])

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **FIGURES,
        "seconds": round(time.monotonic() - started, 1),
        "codes": dict(CODES.most_common()),
    }
    REPORT.write_text(json.dumps(report, indent=2))
    print(f"WebSocket fuzz: {report}")
    # The server still serves a valid request, on the socket door and over REST.
    fresh = await open_socket(asgi_server, users[1])
    await fresh.send(
        json.dumps({"type": "sendMessage", "room": "lobby", "text": "after", "ref": 1})
    )
    await fresh.send(json.dumps({"type": "ping", "ref": "last"}))
    after = await answer(fresh, "last")
    assert [r["type"] for r in after if r.get("ref") == 1] == ["ack"], after
    acked |= {r["id"] for r in after if r.get("type") == "ack"}
    headers = await sync_to_async(auth_header)(users[1])
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=10) as http:
        page = await http.get("/api/realtime/rooms/lobby/messages", headers=headers)
    assert page.status_code == 200
    assert page.json()[-1]["text"] == "after"

    # Nothing leaked once everyone has gone.
    for ws in [*sockets, fresh]:
        await ws.close()
    hub = fanout.hub()
    await _eventually(
        lambda: float(consumers.CONNECTIONS._value.get()) == baseline, "gauge at its baseline"
    )
    await _eventually(lambda: not hub.by_user, "no user attached to the hub")
    await _eventually(lambda: not any(hub.by_room.values()), "no socket in any room")
    await _eventually(lambda: not any(hub.by_topic.values()), "no topic subscription")
    await _eventually(lambda: not any(hub.presence_conns.values()), "no presence connection")
    online = await sync_to_async(_online)()
    fuzz_ids = {who.pk for who in users}
    assert {
        slug: [u for u in members if u["id"] in fuzz_ids] for slug, members in online.items()
    } == {slug: [] for slug in online}
    stored = await sync_to_async(_stored)()
    assert {pk for pk, _, _ in stored} == acked
    for _, text, client_id in stored:
        assert parsers.text_problem(text, multiline=True) is None, text
        assert client_id is None or protocol.client_id_field({"client_id": client_id})

    assert failures == []
    assert FIGURES["crashing"] == 0
