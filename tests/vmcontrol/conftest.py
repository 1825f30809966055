"""vmcontrol fixtures: the real TCP server on 127.0.0.1:0 (in the live ASGI server's event loop,
so the in-memory channel layer reaches it) and a raw line-JSON client."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from tests.conftest import LiveServer
from vmcontrol.consumers import application
from vmcontrol.server import serve
from vmcontrol.sessions import ServerConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class VmServer:
    loop: asyncio.AbstractEventLoop
    config: ServerConfig
    port: int = 0
    stop_event: asyncio.Event | None = None
    future: Any = None

    def start(self, port: int = 0) -> "VmServer":
        ready: list[int] = []

        async def main() -> None:
            self.stop_event = asyncio.Event()
            await serve(
                self.stop_event,
                app=application,
                host="127.0.0.1",
                port=port,
                config=self.config,
                started=ready.append,
            )

        self.future = asyncio.run_coroutine_threadsafe(main(), self.loop)
        deadline = time.monotonic() + 20
        while not ready:
            if self.future.done():
                self.future.result()
            if time.monotonic() > deadline:
                raise RuntimeError("vmcontrol server did not start")
            time.sleep(0.01)
        self.port = ready[0]
        return self

    def stop(self) -> None:
        if self.future is None or self.future.done():
            return
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.future.result(timeout=30)


@pytest.fixture
def start_vmserver(asgi_server: LiveServer) -> Iterator[Callable[..., VmServer]]:
    servers: list[VmServer] = []

    def start(port: int = 0, **overrides: Any) -> VmServer:
        options: dict[str, Any] = {
            "heartbeat_interval": 1.0,
            "missed_heartbeats": 3,
            "auth_timeout": 5.0,
            "flush_interval": 0.2,
            "server_name": "test-vmcontrol",
        }
        options.update(overrides)
        server = VmServer(loop=asgi_server.loop, config=ServerConfig(**options)).start(port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def vmserver(start_vmserver: Callable[..., VmServer]) -> VmServer:
    return start_vmserver()


@dataclass
class Wire:
    """A raw agent-side connection speaking line-delimited JSON."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    counter: int = 0
    unsolicited: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, port: int) -> "Wire":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(frame).encode() + b"\n")

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), wait)
        if not line:
            raise ConnectionError("closed")
        return dict(json.loads(line))

    async def request(self, frame: dict[str, Any], wait: float = 10) -> dict[str, Any]:
        """Send with a fresh id and return the reply echoing it (other frames are kept)."""
        self.counter += 1
        frame = {"id": f"t{self.counter}", **frame}
        await self.send(frame)
        while True:
            reply = await self.recv(wait)
            if reply.get("id") == frame["id"]:
                return reply
            self.unsolicited.append(reply)

    async def closed_by_server(self, wait: float = 10) -> bool:
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                line = await asyncio.wait_for(self.reader.readline(), deadline - time.monotonic())
                if not line:
                    return True
                self.unsolicited.append(json.loads(line))
        except TimeoutError:
            return False
        except ConnectionError:
            # A reset is the server's close too: the client wrote after the server had closed
            # (a sender still trickling frames), and the peer's kernel answered with RST.
            return True
        return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


INVENTORY = {"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]}


async def authorized_wire(port: int, vm_id: int, token: str, inventory: Any = None) -> Wire:
    wire = await Wire.open(port)
    welcome = await wire.request(
        {"type": "hello", "protocol": 1, "vm_id": vm_id, "inventory": inventory or INVENTORY}
    )
    assert welcome["type"] == "welcome", welcome
    reply = await wire.request({"type": "auth", "vm_id": vm_id, "token": token})
    assert reply["type"] == "auth_ok", reply
    return wire


async def eventually(check: Callable[[], Any], wait: float = 10, every: float = 0.05) -> Any:
    """Poll an async-safe check until it returns truthy (timing-based behaviour, generous)."""
    deadline = time.monotonic() + wait
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(every)


def test_database_url() -> str:
    """The URL of the test database, for server and web processes the test starts."""
    settings_dict = connection.settings_dict
    if settings_dict["ENGINE"].endswith("postgresql"):
        user = settings_dict.get("USER") or "postgres"
        password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"
    return f"sqlite:///{settings_dict['NAME']}"


test_database_url.__test__ = False  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manage(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_port(port: int, wait: float = 30) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")
