"""A real line provider in the test's event loop, and the environment for running its command
in a child process against the test database; copies of it in child processes (scale-out)."""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LineProviderCopy:
    """`manage.py run_line_provider` in a child process; `address` is `127.0.0.1:<port>`."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[str] | None = None
    address: str = ""
    _log: IO[str] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start it on an ephemeral port and wait until it serves."""
        self.spawn()
        self.wait_serving()

    def spawn(self) -> None:
        """Start the process; `wait_serving` waits for it (copies start in parallel)."""
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_line_provider", "--port", "0"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def wait_serving(self) -> None:
        """Return once it serves (it prints the bound port only after its feed has loaded).
        Raises RuntimeError, quoting its log, if it exits instead."""
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"line provider {self.name} did not start: {self.log()[-3000:]}")
        self.address = f"127.0.0.1:{match.group(1)}"

    def kill(self) -> None:
        """SIGKILL: no grace, no cleanup (a crash)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=20)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def line_provider_copies(
    names: tuple[str, ...], *, log_dir: Path, environment: dict[str, str], broker: bool = False
) -> Iterator[dict[str, LineProviderCopy]]:
    """Copies of the line provider, each its own process with its own feed and database
    connections, all on the test database; `environment` holds their settings (variables).
    Without `broker` their Celery runs in-process (settlement right after a finish commits),
    so no message is left on a queue no worker reads."""
    env = command_env(**environment)
    if not broker:
        env["CELERY_BROKER_URL"] = ""
    copies = {
        name: LineProviderCopy(name=name, env=env, log_path=log_dir / f"{name}.log")
        for name in names
    }
    try:
        for copy in copies.values():
            copy.spawn()
        for copy in copies.values():
            copy.wait_serving()
        yield copies
    finally:
        for copy in copies.values():
            copy.stop()
