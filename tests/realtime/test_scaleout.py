"""Scale-out: two uvicorn processes sharing Redis, and a Redis restart (own redis-server)."""

import asyncio
import os
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from bench.harness import free_port
from realtime import services
from tests.factories import UserFactory
from tests.realtime.client import Client
from tests.realtime.factories import room_create
from tests.realtime.nodes import asgi_process, redis_server

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(120)]


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
