"""The realtime tests run on the production WebSocket shape: the ASGI server with the flags
compose and the Procfile use (`bench/realtime.py: PRODUCTION_WS_FLAGS`: websockets Sans-I/O, no
permessage-deflate, 1 MiB frame bound) and the realtime app's own `websocket` entry
(`realtime.routing.websocket_application`). REALTIME_TEST_WS picks another uvicorn WebSocket
implementation (`websockets`, `wsproto`) to compare servers on the same tests."""

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from tests.conftest import LiveServer

#: uvicorn.Config options equal to PRODUCTION_WS_FLAGS.
PRODUCTION_WS_OPTIONS: dict[str, Any] = {
    "ws": os.environ.get("REALTIME_TEST_WS", "websockets-sansio"),
    "ws_per_message_deflate": False,
    "ws_max_size": 1 << 20,
    "proxy_headers": False,
}


def production_application() -> Any:
    """The project's ASGI application with its `websocket` side as production serves it."""
    from channels.routing import ProtocolTypeRouter

    from config.asgi import application
    from realtime.routing import websocket_application

    return ProtocolTypeRouter({"http": application, "websocket": websocket_application})


def start_production_ws_server() -> LiveServer:
    """`tests.conftest.start_live_server` with the production WebSocket options."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    config = uvicorn.Config(
        production_application(),
        lifespan="off",
        log_config=None,
        ws_ping_interval=None,
        **PRODUCTION_WS_OPTIONS,
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve(sockets=[sock]))
        loop.close()

    thread = threading.Thread(target=serve, name="live-asgi-ws", daemon=True)
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
    server = start_production_ws_server()
    try:
        yield server
    finally:
        server.stop()
