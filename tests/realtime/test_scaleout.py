"""Scale-out: two uvicorn processes sharing Redis, and a Redis restart (own redis-server)."""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from bench.harness import free_port
from realtime import services
from tests.factories import UserFactory
from tests.realtime.client import Client
from tests.realtime.factories import room_create

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def _database_url() -> str:
    settings = connection.settings_dict
    if settings["ENGINE"].endswith("postgresql"):
        password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
        host = settings.get("HOST") or "127.0.0.1"
        port = settings.get("PORT") or 5432
        return f"postgres://{settings['USER']}{password}@{host}:{port}/{settings['NAME']}"
    return f"sqlite:///{settings['NAME']}"


@contextmanager
def asgi_process(redis_url: str) -> Iterator[str]:
    """A real `uvicorn config.asgi:application` subprocess on a free port; yields its ws URL."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": redis_url,
        "REALTIME_PRESENCE_FLUSH_MS": "20",
    }
    env.pop("CELERY_BROKER_URL", None)
    command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--lifespan", "off", "--no-access-log"]
    process = subprocess.Popen(
        [*command, "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("uvicorn subprocess did not start")
            time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A throwaway redis-server of this test's own (never the shared one)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    import redis

    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


async def joined(ws_url: str, who: Any, room: str) -> Client:
    client = await Client.open(ws_url, who)
    reply = await client.request({"type": "join", "room": room}, "joined", wait=10)
    assert reply["type"] == "joined", reply
    return client


@pytest.mark.django_db(transaction=True)
async def test_two_processes_deliver_room_and_direct_messages_to_users_on_either() -> None:
    alice = await sync_to_async(UserFactory.create)(username="alice")
    bob = await sync_to_async(UserFactory.create)(username="bob")
    await sync_to_async(room_create)(slug="lobby")
    dm = await sync_to_async(services.direct_get_or_create)(user=alice, other_user_id=bob.pk)
    redis_url = os.environ["REDIS_URL"]
    with asgi_process(redis_url) as node_a, asgi_process(redis_url) as node_b:
        a = await joined(node_a, alice, "lobby")
        b = await joined(node_b, bob, "lobby")
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
            a = await joined(node, alice, "lobby")
            b = await joined(node, bob, "lobby")
            await b.request({"type": "sendMessage", "room": "lobby", "text": "m1"}, "ack")
            seen = [(await a.expect("message", wait=10))["seq"]]
        # Redis is down: messages are still committed and acknowledged, but not broadcast.
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
