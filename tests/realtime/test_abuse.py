"""Abuse at the `/ws/` door (issue 11 item 12), over real sockets.

The Origin check compares scheme, host and port: the same origin as the request's Host (an
allowed host), or an origin listed exactly in WS_ALLOWED_ORIGINS. A flood is rate-limited frame
by frame; a violation that lasts REALTIME_RATE_STRIKE_SECONDS is told why and closed with 1008,
while bursts with pauses are never disconnected.
"""

import asyncio
import base64
import json
import os
import socket
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from pytest_django.fixtures import Settings as SettingsWrapper
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from realtime import protocol, services
from tests.conftest import LiveServer
from tests.factories import UserFactory
from tests.realtime.client import Client

pytestmark = pytest.mark.timeout(90)


def handshake(server: LiveServer, ticket: str, *, origin: str | None, host: str) -> int:
    """The HTTP status a WebSocket upgrade gets with these Origin and Host headers."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET /ws/?ticket={ticket} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = b""
        while b"\r\n" not in response:
            chunk = sock.recv(1024)
            if not chunk:
                break
            response += chunk
    return int(response.split(b" ", 2)[1])


async def ticket_for_new_user() -> str:
    user = await sync_to_async(UserFactory.create)()
    ticket, _ = await sync_to_async(services.ticket_issue)(user=user)
    return ticket


SAME = "http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("origin", "host", "configured", "status"),
    [
        # The same origin: scheme, host and port of the page are the request's own.
        (SAME, "127.0.0.1:{port}", [], 101),
        ("http://localhost:{port}", "localhost:{port}", [], 101),
        (None, "127.0.0.1:{port}", [], 101),  # not a browser: authenticates like anyone
        # Same host, another port or scheme: another origin.
        ("http://127.0.0.1:{other}", "127.0.0.1:{port}", [], 403),
        ("https://127.0.0.1:{port}", "127.0.0.1:{port}", [], 403),
        ("http://localhost:9999", "localhost:{port}", [], 403),
        ("http://localhost", "localhost:{port}", [], 403),
        # Another allowed host is still another origin.
        ("http://localhost:{port}", "127.0.0.1:{port}", [], 403),
        # A host outside ALLOWED_HOSTS, even when Host agrees (DNS rebinding).
        ("http://evil.example:{port}", "evil.example:{port}", [], 403),
        ("http://evil.example", "127.0.0.1:{port}", [], 403),
        # Not an origin at all.
        ("null", "127.0.0.1:{port}", [], 403),
        ("http://127.0.0.1:{port}/app", "127.0.0.1:{port}", [], 403),
        ("http://user@127.0.0.1:{port}", "127.0.0.1:{port}", [], 403),
        ("http://127.0.0.1:{port}.evil.example", "127.0.0.1:{port}", [], 403),
        ("file://", "127.0.0.1:{port}", [], 403),
        # Configured origins match exactly: scheme, host and port (default ports implied).
        ("http://localhost:8000", "127.0.0.1:{port}", ["http://localhost:8000"], 101),
        ("http://LOCALHOST:8000", "127.0.0.1:{port}", ["http://localhost:8000"], 101),
        ("http://localhost:9999", "127.0.0.1:{port}", ["http://localhost:8000"], 403),
        ("https://localhost:8000", "127.0.0.1:{port}", ["http://localhost:8000"], 403),
        ("https://app.example", "127.0.0.1:{port}", ["https://app.example:443"], 101),
        ("https://app.example:8443", "127.0.0.1:{port}", ["https://app.example"], 403),
        ("http://evil.example", "127.0.0.1:{port}", ["*"], 101),
    ],
)
async def test_the_origin_check_compares_scheme_host_and_port(
    asgi_server: LiveServer,
    settings: SettingsWrapper,
    origin: str | None,
    host: str,
    configured: list[str],
    status: int,
) -> None:
    settings.WS_ALLOWED_ORIGINS = configured
    ticket = await ticket_for_new_user()
    values = {"port": asgi_server.port, "other": asgi_server.port + 1}
    sent = origin.format(**values) if origin is not None else None
    assert (
        await asyncio.to_thread(
            handshake, asgi_server, ticket, origin=sent, host=host.format(**values)
        )
        == status
    )


async def test_a_same_origin_browser_socket_is_served(asgi_server: LiveServer) -> None:
    ticket = await ticket_for_new_user()
    origin = f"http://127.0.0.1:{asgi_server.port}"
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}", origin=origin) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "ping", "ref": 1}))
        assert json.loads(await ws.recv()) == {"type": "pong", "ref": 1}


@pytest.mark.parametrize("entry", ["localhost:8000", "http://x/path", "ftp://x", "null"])
def test_a_malformed_allowed_origin_stops_the_start(settings: SettingsWrapper, entry: str) -> None:
    settings.WS_ALLOWED_ORIGINS = ["http://ok.example", entry]
    with pytest.raises(ImproperlyConfigured, match="WS_ALLOWED_ORIGINS"):
        apps.get_app_config("realtime").ready()


# --- floods -------------------------------------------------------------------------------------


async def flood(client: Client, per_second: int, seconds: float) -> float:
    """Send `per_second` pings a second (in 20 ms slices) for `seconds` or until closed; the
    seconds it kept sending."""
    started = time.monotonic()
    sent = 0
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * per_second:
                await client.send({"type": "ping", "ref": sent})
                sent += 1
            await asyncio.sleep(0.02)
    except ConnectionClosed:
        pass
    return time.monotonic() - started


async def read_until_closed(client: Client, limit: float) -> tuple[int | None, str, float]:
    """Read every frame until the server closes; (code, reason, monotonic time of the close)."""
    try:
        while True:
            await client.recv(wait=limit)
    except ConnectionClosed as closed:
        received = closed.rcvd
        return (
            received.code if received else None,
            received.reason if received else "",
            time.monotonic(),
        )


async def test_a_steady_flood_is_rate_limited_then_told_why_and_closed_with_1008(
    asgi_server: LiveServer,
) -> None:
    # The defaults: 20 frames/s (burst 40) per connection, closed after 5 s of violation.
    flooder = await Client.open(asgi_server.ws_url, await sync_to_async(UserFactory.create)())
    bystander = await Client.open(asgi_server.ws_url, await sync_to_async(UserFactory.create)())
    started = time.monotonic()
    reader = asyncio.create_task(read_until_closed(flooder, 15))
    await flood(flooder, per_second=200, seconds=12)
    code, reason, closed_at = await reader
    assert (code, reason) == (1008, "rate limit exceeded")
    errors = flooder.of("error")
    assert errors[-1]["code"] == "rate_limit_exceeded"
    assert "rate-limited for 5 s in a row" in errors[-1]["detail"]
    assert {e["code"] for e in errors[:-1]} == {"rate_limited"}
    first_refused = flooder.frames.index(errors[0])
    # Served at the limit until the close (burst + ~20/s), and not closed before 5 s of it.
    pongs = flooder.of("pong")
    lasted = closed_at - started
    assert 5 <= lasted < 8, lasted
    assert 40 + 18 * 5 <= len(pongs) <= 40 + 22 * lasted, len(pongs)
    assert first_refused >= 40
    # Nobody else noticed.
    await bystander.fence()
    await bystander.close()


async def test_bursts_with_pauses_are_refused_in_part_but_never_disconnected(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    settings.REALTIME_RATE_STRIKE_SECONDS = 2
    client = await Client.open(asgi_server.ws_url, await sync_to_async(UserFactory.create)())
    for _ in range(4):  # 6 s in all, three times the strike period
        for n in range(120):
            await client.send({"type": "ping", "ref": n})
        await client.fence()
        await asyncio.sleep(1.5)
    await client.fence()
    assert {f["code"] for f in client.of("error")} == {"rate_limited"}
    assert len(client.of("pong")) > 40 + 3 * 25  # the burst, then what each pause refilled
    await client.close()


@pytest.mark.parametrize(
    ("gaps", "lasted"),
    [
        ([0.0, 0.5, 0.5, 0.5], 1.5),  # refusals under a second apart: one violation
        ([0.0, 0.5, 1.0, 0.5], 0.5),  # a full second without one: it starts again
    ],
)
def test_a_violation_lasts_while_refusals_are_under_a_second_apart(
    gaps: list[float], lasted: float
) -> None:
    violation = protocol.Violation()
    now = 100.0
    seconds: Any = None
    for gap in gaps:
        now += gap
        seconds = violation.refused(now)
    assert seconds == pytest.approx(lasted)
