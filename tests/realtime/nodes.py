"""Real processes for the scale-out and outage tests: `uvicorn config.asgi:application`
subprocesses on free ports with the production WebSocket flags, and throwaway `redis-server`s
of the test's own (never the shared Redis: a test may stop, kill or restart them)."""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from django.db import connection

from bench.harness import free_port
from bench.realtime import PRODUCTION_WS_FLAGS
from tests.realtime.conftest import PRODUCTION_WS_OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    """The URL of the database the test runs on, for a subprocess to share it."""
    settings = connection.settings_dict
    if settings["ENGINE"].endswith("postgresql"):
        password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
        host = settings.get("HOST") or "127.0.0.1"
        port = settings.get("PORT") or 5432
        return f"postgres://{settings['USER']}{password}@{host}:{port}/{settings['NAME']}"
    return f"sqlite:///{settings['NAME']}"


@dataclass
class Node:
    """One ASGI server process."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def asgi_process(redis_url: str, **env: str) -> Iterator[Node]:
    """A real `uvicorn config.asgi:application` subprocess on a free port, with `env` added to
    its environment; stopped (or found already killed) on exit."""
    port = free_port()
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "REALTIME_PRESENCE_FLUSH_MS": "20",
        **env,
    }
    environment.pop("CELERY_BROKER_URL", None)
    command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--lifespan", "off", "--no-access-log"]
    command += [*PRODUCTION_WS_FLAGS, "--ws", PRODUCTION_WS_OPTIONS["ws"]]  # the last --ws wins
    process = subprocess.Popen([*command, "--log-level", "warning"], cwd=ROOT, env=environment)
    try:
        # Generous: a loaded machine may take tens of seconds to import Django and the apps.
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("uvicorn subprocess did not start")
            time.sleep(0.1)
        yield Node(port=port, process=process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ThrowawayRedis:
    """An empty redis-server on `port` without persistence, so a restart starts empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> "ThrowawayRedis":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def redis_server(port: int) -> Iterator[ThrowawayRedis]:
    """A throwaway redis-server of this test's own (never the shared one)."""
    with ThrowawayRedis(port) as server:
        yield server
