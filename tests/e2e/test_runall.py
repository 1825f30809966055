"""`manage.py runall` (what `make run` starts) serves every platform address and stops cleanly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from bench.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _embedded_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'runall.sqlite3'}",
        HTTP_PORT=str(port),
        VMCONTROL_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
        DJANGO_SUPERUSER_USERNAME="boss",
        DJANGO_SUPERUSER_PASSWORD="a-long-demo-passphrase",
        METRICS_BEARER_TOKEN="e2e-scraper-token",
    )
    return env


def _wait_until_serving(base: str, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert child.poll() is None, "runall exited early"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("runall did not start serving")


def test_runall_serves_every_platform_address_and_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    env = _embedded_env(tmp_path, port)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120)
    created = subprocess.run(
        [*manage, "ensure_operator"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert "Created operator 'boss'" in created.stdout
    child = subprocess.Popen(
        [*manage, "runall"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(base, child)
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
        assert httpx.get(f"{base}/metrics").status_code == 401
        scraper = {"Authorization": "Bearer e2e-scraper-token"}
        assert httpx.get(f"{base}/metrics", headers=scraper).status_code == 200
        assert httpx.get(f"{base}/admin/login/").status_code == 200
        assert httpx.get(f"{base}/api/docs/").status_code == 200
        token = httpx.post(
            f"{base}/api/auth/token",
            json={"username": "boss", "password": "a-long-demo-passphrase"},
        ).json()["token"]
        ticket = httpx.post(
            f"{base}/api/realtime/ticket", headers={"Authorization": f"Token {token}"}
        ).json()["ticket"]
        with connect(f"ws://127.0.0.1:{port}/ws/?ticket={ticket}") as ws:
            ws.send(json.dumps({"type": "ping", "ref": 1}))
            assert json.loads(ws.recv(timeout=5)) == {"type": "pong", "ref": 1}
    finally:
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=30)
    assert child.returncode == 0, output
    assert f"{base}/admin/" in output
    assert f"ws://127.0.0.1:{port}/ws/" in output
    assert "Stopped." in output


@pytest.mark.parametrize("variable", ["HTTP_PORT", "VMCONTROL_PORT", "GRPC_PORT"])
def test_a_busy_port_is_one_line_naming_its_variable_and_a_nonzero_exit(
    tmp_path: Path, variable: str
) -> None:
    env = _embedded_env(tmp_path, free_port())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        env[variable] = str(busy)
        result = subprocess.run(
            [sys.executable, "manage.py", "runall"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Quintet is running" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"Port {busy} on 127.0.0.1 is in use: set {variable}" in lines[0]
