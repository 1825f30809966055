"""Betting fixtures: in-process Celery unless a test drives a real worker, and a real grpc.aio
line provider on 127.0.0.1:0 in the test's event loop."""

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from config.celery import app as celery_app
from tests.betting.servers import line_provider_running


@pytest.fixture(autouse=True)
def _celery_in_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """Settlement runs in-process after commit, except in tests that start a real worker."""
    if request.node.get_closest_marker("needs_broker") is not None:
        yield
        return
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = previous


@pytest.fixture
def fast_watch(settings: pytest.FixtureRequest) -> None:
    settings.BETTING_WATCH_HEARTBEAT_SECONDS = 0.3  # type: ignore[attr-defined]
    settings.BETTING_WATCH_POLL_SECONDS = 0.02  # type: ignore[attr-defined]


@pytest.fixture
async def line_provider(transactional_db: None, fast_watch: None) -> AsyncIterator[str]:
    """A real plaintext line provider on loopback; yields its address."""
    async with line_provider_running() as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def stub(line_provider: str) -> AsyncIterator[pb_grpc.LineProviderStub]:
    async with grpc.aio.insecure_channel(line_provider) as channel:
        yield pb_grpc.LineProviderStub(channel)
