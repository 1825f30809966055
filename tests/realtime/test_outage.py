"""Presence across processes and Redis outages (issue 11 item 7, issue 15 item 2), on real
uvicorn processes and a throwaway redis-server that each test starts, stops and restarts.

Presence is global with Redis: entries of a killed process expire within
`REALTIME_PRESENCE_TTL_SECONDS`, and after Redis restarts empty every live process re-announces
its sockets within the TTL. While Redis is down, connects and messages keep working on each
process, and what cannot (global presence over REST) answers 503 JSON, never 500.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from websockets.asyncio.client import connect

from bench.harness import free_port
from tests.factories import UserFactory, auth_header
from tests.realtime.client import Client
from tests.realtime.factories import room_create
from tests.realtime.nodes import Node, ThrowawayRedis, asgi_process

pytestmark = [
    pytest.mark.needs_redis,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]

TTL = 3.0
NODE_ENV = {"REALTIME_PRESENCE_TTL_SECONDS": str(TTL)}
REPORT = Path(__file__).resolve().parents[2] / "var" / "realtime-outage.json"


def record(name: str, seconds: float) -> None:
    """Keep the measured figure in var/realtime-outage.json (printed too)."""
    figures = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    figures[name] = round(seconds, 3)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2))
    print(f"{name}: {seconds:.3f} s")


async def users(prefix: str, count: int) -> list[Any]:
    return [
        await sync_to_async(UserFactory.create)(username=f"{prefix}{n:02d}") for n in range(count)
    ]


async def joined(node: Node, who: Any, room: str = "lobby") -> Client:
    client = await Client.open(node.ws_url, who)
    reply = await client.request({"type": "join", "room": room}, "joined", wait=10)
    assert reply["type"] == "joined", reply
    return client


async def presence(node: Node, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
        return await http.get("/api/realtime/rooms/lobby/presence", headers=headers)


async def online(node: Node, headers: dict[str, str]) -> set[str] | None:
    """Who the REST presence shows in the lobby; None while it answers 503."""
    response = await presence(node, headers)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return {user["username"] for user in response.json()["online"]}


def showing(nodes: list[Node], headers: dict[str, str], names: set[str]) -> Callable[[], Any]:
    async def check() -> bool:
        return all([await online(node, headers) == names for node in nodes])

    return check


async def seconds_until(check: Callable[[], Awaitable[bool]], limit: float) -> float:
    """Poll `check` every 50 ms until it holds; the seconds it took (fails past `limit`)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_presence_is_rebuilt_within_the_ttl_after_redis_restarts_empty() -> None:
    people = await users("p", 20)
    late = await sync_to_async(UserFactory.create)(username="late")
    await sync_to_async(room_create)(slug="lobby")
    headers = await sync_to_async(auth_header)(people[0])
    names = {who.username for who in people}
    redis_server = ThrowawayRedis(free_port())
    with (
        redis_server,
        asgi_process(redis_server.url, **NODE_ENV) as a,
        asgi_process(redis_server.url, **NODE_ENV) as b,
    ):
        sockets = [await joined(a if n % 2 else b, who) for n, who in enumerate(people)]
        await seconds_until(showing([a, b], headers, names), 5)

        redis_server.stop()
        down = await presence(a, headers)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "presence_unavailable"
        for client in sockets:
            await client.fence()  # every socket still served
        # Someone joins on B during the outage: A's sockets cannot hear of it yet.
        sockets.append(await joined(b, late))
        watcher = sockets[1]  # on A
        assert all(
            "late" not in {u["username"] for u in f["joined"]} for f in watcher.of("presence")
        )

        redis_server.start()  # empty: no persistence
        took = await seconds_until(showing([a, b], headers, names | {"late"}), TTL)
        record("presence_rebuilt_after_redis_restart_s", took)
        # ... and the rebuild tells A's sockets who is online again, `late` included.
        arrived: set[str] = set()
        while "late" not in arrived:
            frame = await watcher.expect("presence", wait=TTL)
            arrived |= {user["username"] for user in frame["joined"]}
        for client in sockets:
            await client.fence()
            await client.close()


async def test_presence_of_a_killed_process_expires_within_the_ttl() -> None:
    on_a, on_b = await users("a", 5), await users("b", 5)
    both = await sync_to_async(UserFactory.create)(username="both")
    await sync_to_async(room_create)(slug="lobby")
    headers = await sync_to_async(auth_header)(on_a[0])
    names_a = {who.username for who in on_a} | {"both"}
    names_b = {who.username for who in on_b}
    redis_server = ThrowawayRedis(free_port())
    with (
        redis_server,
        asgi_process(redis_server.url, **NODE_ENV) as a,
        asgi_process(redis_server.url, **NODE_ENV) as b,
    ):
        watchers = [await joined(a, who) for who in on_a] + [await joined(a, both)]
        doomed = [await joined(b, who) for who in on_b] + [await joined(b, both)]
        await seconds_until(showing([a], headers, names_a | names_b), 5)

        b.process.kill()  # SIGKILL: no cleanup of any kind
        b.process.wait()
        killed_at = time.monotonic()
        took = await seconds_until(showing([a], headers, names_a), TTL + 0.5)
        record("presence_of_killed_process_expired_s", took)
        # `both` still has a socket on A, so counts as online; the others are reported left
        # to A's sockets by A's next sweep (at most a third of the TTL after expiry).
        watcher = watchers[0]
        left: set[str] = set()
        while left != names_b:
            remaining = TTL + TTL / 3 + 1 - (time.monotonic() - killed_at)
            frame = await watcher.expect("presence", wait=max(remaining, 0.01))
            left |= {user["username"] for user in frame["left"]}
            assert "both" not in left
        for client in watchers:
            await client.fence()
            await client.close()
        del doomed


async def test_while_redis_is_down_tickets_connects_and_messages_keep_working_per_process() -> None:
    alice, bob = await users("alice", 1) + await users("bob", 1)
    await sync_to_async(room_create)(owner=bob, slug="lobby")
    alice_headers = await sync_to_async(auth_header)(alice)
    bob_headers = await sync_to_async(auth_header)(bob)
    redis_server = ThrowawayRedis(free_port())
    with redis_server, asgi_process(redis_server.url, **NODE_ENV) as up_first:
        early = await joined(up_first, alice)
        redis_server.stop()
        # A process that starts while Redis is down serves too.
        with asgi_process(redis_server.url, **NODE_ENV) as down_first:
            for node in (up_first, down_first):
                started = time.monotonic()
                async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
                    ticket = await http.post("/api/realtime/ticket", headers=alice_headers)
                assert ticket.status_code == 201, ticket.text
                url = f"{node.ws_url}/ws/?ticket={ticket.json()['ticket']}"
                a = Client(await connect(url, open_timeout=10))
                b = await Client.open(node.ws_url, bob)
                reply = await a.request({"type": "join", "room": "lobby"}, "joined")
                assert reply["type"] == "joined", reply
                await b.request({"type": "join", "room": "lobby"}, "joined")
                assert time.monotonic() - started < 2, "connects must not wait for Redis"
                snapshot = await b.expect("presence", snapshot=True)
                assert snapshot["partial"] is True
                assert {u["username"] for u in snapshot["online"]} == {"alice00", "bob00"}

                ack = await a.request({"type": "sendMessage", "room": "lobby", "text": "hi"}, "ack")
                assert ack["type"] == "ack", ack
                assert (await b.expect("message", text="hi"))["user"] == "alice00"
                await a.send({"type": "typing", "room": "lobby"})
                assert (await b.expect("typing"))["user"] == "alice00"
                async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
                    posted = await http.post(
                        "/api/realtime/rooms/lobby/messages",
                        headers=bob_headers,
                        json={"text": "over rest"},
                    )
                    unavailable = await http.get(
                        "/api/realtime/rooms/lobby/presence", headers=bob_headers
                    )
                assert posted.status_code == 201, posted.text
                assert (await a.expect("message", text="over rest"))["user"] == "bob00"
                assert unavailable.status_code == 503
                assert unavailable.json()["error"]["code"] == "presence_unavailable"
                await a.close()
                await b.close()
        await early.fence()
        await early.close()
