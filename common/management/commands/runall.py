"""Every process of the system in one process, on the embedded defaults (or the real services
when their URLs are set): the ASGI server plus every server an app registered, and a periodic
runner for the Celery beat schedule when tasks run in-process. Ctrl-C stops everything."""

import asyncio
import contextlib
import errno
import socket
from collections.abc import Generator
from typing import Any

import structlog
import uvicorn
from celery import current_app as current_celery_app
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from common.db import orm_async
from common.heartbeat import process_heartbeat_start
from common.processes import embedded_processes
from common.signals import run_until_signal

logger = structlog.get_logger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: runall owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _run_task_now(task: Any) -> None:
    task.apply()


async def _beat(stop: asyncio.Event, task: Any, every: float) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        try:
            await orm_async(_run_task_now)(task)
        except Exception:
            logger.exception("embedded_beat_task_failed", task=task.name)


def _check_free(variable: str, host: str, port: int) -> None:
    """Raise CommandError (one line naming the setting) when (host, port) cannot be bound."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
            raise CommandError(
                f"Port {port} on {host} {reason}: set {variable} to a free port "
                f"(e.g. {variable}={port + 1} make run) or stop what holds it."
            ) from None


def _seconds(schedule: Any) -> float:
    return float(schedule.total_seconds() if hasattr(schedule, "total_seconds") else schedule)


class Command(BaseCommand):
    help = "Run the whole system in one process (ASGI server and every registered server)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.HTTP_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        _check_free("HTTP_PORT", host, port)
        for process in embedded_processes():
            for variable, process_host, process_port in process.listens():
                _check_free(variable, process_host, process_port)
        # One process runs every kind: the console shows it once, with what it runs.
        names = ["http", *(p.name for p in embedded_processes())]
        if settings.CELERY_TASK_ALWAYS_EAGER:
            names.append("beat")
        process_heartbeat_start("embedded", names=names)
        run_until_signal(lambda stop: self._main(stop, host, port))

    async def _main(self, stop: asyncio.Event, host: str, port: int) -> None:
        config = uvicorn.Config(
            "config.asgi:application",
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            **settings.ASGI_WEBSOCKET_OPTIONS,  # type: ignore[arg-type]
            # Client addresses are the socket's; TRUSTED_PROXY_HOPS is the one place that trusts
            # X-Forwarded-For (common/network.py), so uvicorn must not rewrite them first.
            proxy_headers=False,
        )
        server = _EmbeddedUvicorn(config)
        tasks = [asyncio.create_task(server.serve(), name="http")]
        processes = embedded_processes()
        for process in processes:
            tasks.append(asyncio.create_task(process.run(stop), name=process.name))
        if settings.CELERY_TASK_ALWAYS_EAGER:
            # What a worker does at start: import every app's tasks module, so a schedule entry
            # names a registered task before any request has imported its app's tasks.
            current_celery_app.loader.import_default_modules()
            for entry in settings.CELERY_BEAT_SCHEDULE.values():
                task = current_celery_app.tasks[str(entry["task"])]
                beat = _beat(stop, task, _seconds(entry["schedule"]))
                tasks.append(asyncio.create_task(beat, name=f"beat:{entry['task']}"))

        self._banner(host, port, [p.describe() for p in processes])
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper and t.exception() is not None]
        for task in failed:
            logger.error("process_crashed", process=task.get_name(), error=repr(task.exception()))
        stop.set()
        server.should_exit = True
        self.stdout.write("Stopping ...")
        _, pending = await asyncio.wait(tasks, timeout=15)
        for task in pending:
            task.cancel()
        if failed:
            raise SystemExit(1)
        self.stdout.write("Stopped.")

    def _banner(self, host: str, port: int, lines: list[str]) -> None:
        base = f"http://{host}:{port}"
        mode = "embedded" if settings.CELERY_TASK_ALWAYS_EAGER else "broker"
        self.stdout.write(
            self.style.SUCCESS(f"Quintet is running ({mode} mode). Ctrl-C stops everything.")
        )
        for label, url in [
            ("Home", f"{base}/"),
            ("Admin", f"{base}/admin/"),
            ("Console", f"{base}/console/"),
            ("API docs", f"{base}/api/docs/"),
            ("Health", f"{base}/health"),
            ("Readiness", f"{base}/readyz"),
            ("Metrics", f"{base}/metrics"),
            ("WebSocket", f"ws://{host}:{port}/ws/"),
        ]:
            self.stdout.write(f"  {label:<12} {url}")
        for line in lines:
            self.stdout.write(f"  {line}")
