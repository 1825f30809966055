"""A real line provider in the test's event loop, and the environment for running its command
in a child process against the test database."""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from betting.grpc.server import serve


@contextlib.asynccontextmanager
async def line_provider_running(host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve on `host`:0 until the block ends; yields the bound port. A server that fails to
    start (a refused configuration) raises its error here."""
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(stop, host=host, port=0, on_bound=lambda port: bound.set_result(port))
    )
    either: list[asyncio.Future[Any]] = [server, bound]
    await asyncio.wait(either, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        server.result()
    if not bound.done():
        stop.set()
        await asyncio.wait_for(server, 20)
        raise TimeoutError("the line provider did not start within 20 s")
    port = bound.result()
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(server, 20)
        # The test's own sync_to_async calls ran on one shared thread; its connection would
        # keep the test database busy at teardown.
        await sync_to_async(connections.close_all)()


def command_env(**extra: str) -> dict[str, str]:
    """The environment for `manage.py` in a child process on the test database."""
    database = settings.DATABASES["default"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", **extra}
    if database["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{database['NAME']}"
    else:
        env["DATABASE_URL"] = (
            f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/"
            f"{database['NAME']}"
        )
    return env
