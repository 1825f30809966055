"""The README's runnable examples work as printed, against real servers: the WebSocket chat
client and the gRPC client of the line provider (each run as its own process)."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from betting.models import Event
from realtime.models import Message
from tests.betting.servers import line_provider_running
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _token(user: object) -> str:
    return auth_header(user)["Authorization"].split()[1]


@pytest.mark.django_db(transaction=True)
def test_the_websocket_chat_example_sends_and_gets_its_ack(asgi_server: LiveServer) -> None:
    token = _token(UserFactory.create())
    result = subprocess.run(
        [
            sys.executable,
            "examples/ws_chat.py",
            "--url",
            asgi_server.http_url,
            "--token",
            token,
            "hello from the README",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert '"type": "ack"' in result.stdout
    assert Message.objects.filter(text="hello from the README").count() == 1


@pytest.mark.django_db(transaction=True)
async def test_the_grpc_client_example_creates_watches_and_updates() -> None:
    token = await sync_to_async(_token)(await sync_to_async(StaffFactory.create)())
    async with line_provider_running() as port:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "examples/grpc_client.py",
            "--target",
            f"127.0.0.1:{port}",
            "--token",
            token,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode() + out.decode()
    text = out.decode()
    assert "snapshot complete" in text
    assert "→ 2.10" in text
    event = await Event.objects.filter(id__startswith="example-").aget()
    assert str(event.coefficient) == "2.10"
