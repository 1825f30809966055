"""Scale-out: two uvicorn processes sharing Redis (delivery to users on either, one rate budget
per user, nothing lost when one is SIGKILLed and restarted), and a Redis restart (own
redis-server)."""

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from websockets.exceptions import ConnectionClosed

from bench.harness import free_port
from realtime import services
from realtime.fanout.limits import LEASE_DIVISOR
from tests.factories import UserFactory
from tests.realtime.client import Client
from tests.realtime.factories import room_create
from tests.realtime.nodes import Node, asgi_process, redis_server

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(300)]


async def joined(ws_url: str, who: Any, room: str) -> Client:
    client = await Client.open(ws_url, who)
    reply = await client.request({"type": "join", "room": room}, "joined", wait=10)
    assert reply["type"] == "joined", reply
    return client


@pytest.mark.django_db(transaction=True)
async def test_two_processes_deliver_room_and_direct_messages_to_users_on_either() -> None:
    alice = await sync_to_async(UserFactory.create)(username="alice")
    bob = await sync_to_async(UserFactory.create)(username="bob")
    await sync_to_async(room_create)(owner=bob, slug="lobby")  # alice can see bob there
    dm = await sync_to_async(services.direct_get_or_create)(user=alice, other_user_id=bob.pk)
    redis_url = os.environ["REDIS_URL"]
    with asgi_process(redis_url) as node_a, asgi_process(redis_url) as node_b:
        a = await joined(node_a.ws_url, alice, "lobby")
        b = await joined(node_b.ws_url, bob, "lobby")
        await a.request({"type": "sendMessage", "room": "lobby", "text": "from A"}, "ack")
        assert (await b.expect("message", wait=10))["display"] == "alice: from A"
        await b.request({"type": "sendMessage", "room": "lobby", "text": "from B"}, "ack")
        assert (await a.expect("message", wait=10, text="from B"))["user"] == "bob"
        # A direct message reaches the other user without any join.
        await b.request({"type": "sendMessage", "room": dm.slug, "text": "psst"}, "ack")
        direct = await a.expect("message", wait=10, text="psst")
        assert (direct["room"], direct["display"]) == (dm.slug, "bob: psst")
        # Presence is shared: bob on B sees alice on A in the snapshot.
        snapshot = (await b.expect("presence", wait=10))["online"]
        assert {u["username"] for u in snapshot} <= {"alice", "bob"}
        await a.close()
        await b.close()


@pytest.mark.django_db(transaction=True)
async def test_redis_restart_loses_nothing_clients_detect_the_gap_and_sync() -> None:
    alice = await sync_to_async(UserFactory.create)(username="alice")
    bob = await sync_to_async(UserFactory.create)(username="bob")
    await sync_to_async(room_create)(slug="lobby")
    port = free_port()
    with asgi_process(f"redis://127.0.0.1:{port}/0") as node:
        with redis_server(port):
            a = await joined(node.ws_url, alice, "lobby")
            b = await joined(node.ws_url, bob, "lobby")
            await b.request({"type": "sendMessage", "room": "lobby", "text": "m1"}, "ack")
            seen = [(await a.expect("message", wait=10))["seq"]]
        # Redis is down: messages are still committed and acknowledged, and reach this
        # process's sockets only.
        for text in ("m2", "m3"):
            ack = await b.request({"type": "sendMessage", "room": "lobby", "text": text}, "ack")
            assert ack["type"] == "ack", ack
        with redis_server(port):
            hint = await a.expect("sync_required", wait=15)
            assert "lobby" in hint["rooms"]
            await b.request({"type": "sendMessage", "room": "lobby", "text": "m4"}, "ack")
            live = await a.expect("message", wait=10, text="m4")
            assert live["seq"] > seen[-1] + 1  # the gap is visible by seq
            batch = await a.request(
                {"type": "sync", "room": "lobby", "after_seq": seen[-1]}, "sync", wait=10
            )
            seen += [m["seq"] for m in batch["messages"]]
            assert [m["text"] for m in batch["messages"]] == ["m2", "m3", "m4"]
            assert seen == [1, 2, 3, 4]
            await a.close()
            await b.close()
    await asyncio.sleep(0)


@pytest.mark.django_db(transaction=True)
async def test_one_users_frames_on_two_processes_draw_on_one_budget() -> None:
    alice = await sync_to_async(UserFactory.create)(username="alice")
    # 40 frames per 800 s for the user; each socket alone could send 40 at once (its own
    # bucket's burst), so only the user's budget refuses here.
    env = {"REALTIME_USER_RATE_PER_SECOND": "0.05", "REALTIME_USER_RATE_BURST": "40"}
    lease = max(1, 40 // LEASE_DIVISOR)
    redis_url = os.environ["REDIS_URL"]
    with asgi_process(redis_url, **env) as node_a, asgi_process(redis_url, **env) as node_b:
        on_a = await Client.open(node_a.ws_url, alice)
        on_b = await Client.open(node_b.ws_url, alice)
        first = [(await on_a.request({"type": "ping"}, "pong"))["type"] for _ in range(30)]
        then = [(await on_b.request({"type": "ping"}, "pong"))["type"] for _ in range(30)]
        assert first == ["pong"] * 30
        served = first.count("pong") + then.count("pong")
        # One budget of 40, less at most one unspent lease per process.
        assert 40 - 2 * lease <= served <= 40, then
        assert then[-1] == "error"
        assert {e["code"] for e in on_b.of("error")} == {"rate_limited"}
        await on_a.close()
        await on_b.close()


class Member:
    """A chat client that holds on: it reconnects (to whichever node `node()` names) when its
    socket dies, `sync`s from the last seq it applied, applies messages strictly in seq order
    (a gap asks for a `sync`), and ignores what it already has."""

    def __init__(self, who: Any, node: Callable[[], Node]) -> None:
        self.who = who
        self.node = node
        self.applied: list[int] = []
        self.ahead: set[int] = set()
        self.reconnects = 0
        self.client: Client | None = None
        self.syncing = False

    def _apply(self, seq: int) -> None:
        last = self.applied[-1] if self.applied else 0
        if seq <= last:
            return
        self.ahead.add(seq)
        while (self.applied[-1] if self.applied else 0) + 1 in self.ahead:
            self.ahead.remove((self.applied[-1] if self.applied else 0) + 1)
            self.applied.append((self.applied[-1] if self.applied else 0) + 1)

    async def _ask_sync(self, client: Client) -> None:
        if not self.syncing:
            self.syncing = True
            last = self.applied[-1] if self.applied else 0
            await client.send({"type": "sync", "room": "lobby", "after_seq": last})

    async def run(self) -> None:
        while True:
            try:
                client = await Client.open(self.node().ws_url, self.who)
            except OSError:
                await asyncio.sleep(0.1)  # the node is down or restarting
                continue
            self.client, self.syncing = client, False
            try:
                await client.send({"type": "join", "room": "lobby"})
                await self._ask_sync(client)
                while True:
                    frame = await client.recv(wait=60)
                    if frame["type"] == "message" and frame["room"] == "lobby":
                        self._apply(frame["seq"])
                        if self.ahead:
                            await self._ask_sync(client)
                    elif frame["type"] == "sync":
                        assert not frame["reset_required"], frame
                        self.syncing = False
                        for message in frame["messages"]:
                            self._apply(message["seq"])
                        if self.ahead:
                            await self._ask_sync(client)
                    elif frame["type"] == "error":
                        raise AssertionError(frame)
            except (ConnectionClosed, OSError):
                self.reconnects += 1


class Sender:
    """Sends numbered messages with a client_id each; a send whose ack never came (its node
    died) is sent again with the same client_id after reconnecting."""

    def __init__(self, who: Any, node: Callable[[], Node], prefix: str) -> None:
        self.who = who
        self.node = node
        self.prefix = prefix
        self.client: Client | None = None

    async def send(self, n: int) -> None:
        frame = {"type": "sendMessage", "room": "lobby", "text": f"{self.prefix}{n}"}
        frame["client_id"] = f"{self.prefix}-{n}"
        while True:
            try:
                if self.client is None:
                    self.client = await Client.open(self.node().ws_url, self.who)
                ack = await self.client.request(frame, "ack", wait=10)
                assert ack["type"] == "ack", ack
                return
            except (ConnectionClosed, OSError):
                self.client = None
                await asyncio.sleep(0.1)


@pytest.mark.django_db(transaction=True)
async def test_every_member_gets_every_message_in_order_across_a_killed_and_restarted_process() -> (
    None
):
    people = [await sync_to_async(UserFactory.create)(username=f"m{n}") for n in range(6)]
    sender_a = await sync_to_async(UserFactory.create)(username="sa")
    sender_b = await sync_to_async(UserFactory.create)(username="sb")
    room = await sync_to_async(room_create)(slug="lobby")
    redis_url = os.environ["REDIS_URL"]
    per_sender = 30
    with asgi_process(redis_url) as node_a, ExitStack() as b_stack:
        nodes = {"b": b_stack.enter_context(asgi_process(redis_url))}
        members = [
            Member(who, (lambda: node_a) if n % 2 else (lambda: nodes["b"]))
            for n, who in enumerate(people)
        ]
        tasks = [asyncio.create_task(member.run()) for member in members]
        from_a = Sender(sender_a, lambda: node_a, "a")
        from_b = Sender(sender_b, lambda: nodes["b"], "b")

        async def restart_b() -> None:
            victim = nodes["b"]
            victim.process.kill()  # SIGKILL: no goodbye to any socket, no cleanup
            victim.process.wait()
            b_stack.close()
            nodes["b"] = b_stack.enter_context(asgi_process(redis_url))

        for n in range(per_sender):
            if n == per_sender // 3:
                restarting = asyncio.create_task(restart_b())
            await asyncio.gather(from_a.send(n), from_b.send(n))
            await asyncio.sleep(0.02)
        await restarting
        # A last message through a live node: a member whose last frames died with the killed
        # process sees the gap by seq and syncs.
        await from_a.send(per_sender)

        total = per_sender * 2 + 1
        deadline = time.monotonic() + 30
        while any(len(member.applied) < total for member in members):
            if time.monotonic() > deadline:
                raise AssertionError([member.applied[-5:] for member in members])
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        await sync_to_async(room.refresh_from_db)()
        assert room.last_seq == total  # each retried send stored once
        for member in members:
            assert member.applied == list(range(1, total + 1))
        assert all(member.reconnects >= 1 for member in members[::2])  # those on B
        for member in members:
            if member.client is not None:
                await member.client.close()
        for sender in (from_a, from_b):
            if sender.client is not None:
                await sender.client.close()
