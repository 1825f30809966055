"""The console's topics over a real WebSocket on the live server: staff only, and what arrives
there is what the snapshot API serves afterwards."""

import asyncio
import json
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from websockets.asyncio.client import ClientConnection, connect

from common.console import console_panels
from common.console_publisher import console_tick
from common.db import orm_async
from realtime import services as realtime_services
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.timeout(60)


async def _socket(server: LiveServer, user: Any) -> ClientConnection:
    ticket, _ = await sync_to_async(realtime_services.ticket_issue)(user=user)
    return await connect(f"{server.ws_url}/ws/?ticket={ticket}", open_timeout=10)


async def _answer(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    ref = f"r-{frame.get('topic')}"
    await ws.send(json.dumps({**frame, "ref": ref}))
    while True:
        answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if answer.get("ref") == ref:
            return answer


async def _event(ws: ClientConnection, topic: str) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == "event" and frame.get("topic") == topic:
            return frame["payload"]


async def test_a_non_staff_user_is_refused_every_console_topic(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    ws = await _socket(asgi_server, user)
    try:
        for panel in console_panels():
            answer = await _answer(ws, {"type": "subscribe", "topic": panel.topic})
            assert answer["type"] == "error" and answer["code"] == "forbidden", answer
    finally:
        await ws.close()


async def test_staff_gets_each_tick_live_and_the_snapshot_then_serves_the_same(
    asgi_server: LiveServer,
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    ws = await _socket(asgi_server, staff)
    topics = [panel.topic for panel in console_panels()]
    try:
        for topic in topics:
            assert (await _answer(ws, {"type": "subscribe", "topic": topic}))["type"] == (
                "subscribed"
            )
        assert await orm_async(console_tick)(min_gap=0)
        live = {topic: await _event(ws, topic) for topic in topics}
        headers = await sync_to_async(auth_header)(staff)
        async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
            snapshot = (await http.get("/api/console/snapshot", headers=headers)).json()
    finally:
        await ws.close()
    for panel in snapshot["panels"]:
        event = live[panel["topic"]]
        assert event["panel"] == panel["name"]
        for field in ("sample", "status", "error", "at", "ms"):
            assert panel[field] == event[field], (panel["name"], field)
        for key, rate in event["rates"].items():
            assert panel["rates"][key]["series"][-1:] == rate["series"]
