"""The realtime tests run on the production WebSocket shape: config.asgi's application on the
shared live server with settings.ASGI_WEBSOCKET_OPTIONS (websockets Sans-I/O, no
permessage-deflate, 1 MiB frame bound), as compose and the Procfile serve it. REALTIME_TEST_WS
picks another uvicorn WebSocket implementation (`websockets`, `wsproto`) to compare servers on
the same tests."""

import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings

from tests.conftest import LiveServer, start_live_server

#: uvicorn.Config WebSocket options: production's (settings.ASGI_WEBSOCKET_OPTIONS), with the
#: implementation REALTIME_TEST_WS names, if any.
PRODUCTION_WS_OPTIONS: dict[str, Any] = {
    **settings.ASGI_WEBSOCKET_OPTIONS,
    "ws": os.environ.get("REALTIME_TEST_WS", settings.ASGI_WEBSOCKET_OPTIONS["ws"]),
}


@pytest.fixture
def asgi_server(transactional_db: None) -> Iterator[LiveServer]:
    server = start_live_server(ws_options=PRODUCTION_WS_OPTIONS)
    try:
        yield server
    finally:
        server.stop()
