"""Shared fixtures: live servers on 127.0.0.1:0, service gates, clients.

Real services are used when their URLs are set (DATABASE_URL, REDIS_URL, CELERY_BROKER_URL).
If a URL is set but the service does not answer, the whole run stops with an error: an
integration test is never skipped because its service is down.
"""

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import uvicorn
from django.conf import settings

SERVICE_URL_VARIABLES = {
    "postgres": "DATABASE_URL",
    "redis": "REDIS_URL",
    "broker": "CELERY_BROKER_URL",
}


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    default_ports = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "amqp": 5672}
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_ports.get(parsed.scheme, 0)
    if parsed.scheme.startswith("sqlite"):
        return True
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_postgres: needs DATABASE_URL (PostgreSQL)")
    config.addinivalue_line("markers", "needs_redis: needs REDIS_URL (Redis)")
    config.addinivalue_line("markers", "needs_broker: needs CELERY_BROKER_URL (RabbitMQ)")
    down = [
        f"{variable}={os.environ[variable]}"
        for variable in SERVICE_URL_VARIABLES.values()
        if os.environ.get(variable) and not _reachable(os.environ[variable])
    ]
    if down:
        pytest.exit(f"configured service unreachable: {', '.join(down)}", returncode=3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for service, variable in SERVICE_URL_VARIABLES.items():
            if item.get_closest_marker(f"needs_{service}") is None:
                continue
            url = os.environ.get(variable, "")
            if service == "postgres" and not url.startswith("postgres"):
                url = ""
            if not url:
                item.add_marker(pytest.mark.skip(reason=f"{variable} not set (embedded run)"))


@dataclass
class LiveServer:
    """A real uvicorn serving the project's ASGI application in a background thread."""

    host: str
    port: int
    loop: asyncio.AbstractEventLoop
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_live_server(
    app: Any = "config.asgi:application", ws_options: dict[str, Any] | None = None
) -> LiveServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    # As in production: the client address is the socket's (common/network.py decides on proxies).
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        ws_ping_interval=None,
        proxy_headers=False,
        **(ws_options or settings.ASGI_WEBSOCKET_OPTIONS),
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve(sockets=[sock]))
        loop.close()

    thread = threading.Thread(target=serve, name="live-asgi", daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    else:
        raise RuntimeError("live ASGI server did not start")
    host, port = sock.getsockname()[:2]
    return LiveServer(host=host, port=port, loop=loop, server=server, thread=thread)


@pytest.fixture
def asgi_server(transactional_db: None) -> Iterator[LiveServer]:
    server = start_live_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(asgi_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=asgi_server.http_url, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    from django.core.cache import cache

    cache.clear()
    yield
