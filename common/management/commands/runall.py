"""Every process of the system in one process, on the embedded defaults (or the real services
when their URLs are set): the ASGI server plus every server an app registered, and a periodic
runner for the Celery beat schedule when tasks run in-process. Ctrl-C stops everything."""

import asyncio
import contextlib
import signal
from collections.abc import Generator
from typing import Any

import structlog
import uvicorn
from asgiref.sync import sync_to_async
from celery import current_app as current_celery_app
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections

from common.processes import embedded_processes

logger = structlog.get_logger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: runall owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _run_task_now(task_name: str) -> None:
    close_old_connections()
    try:
        current_celery_app.tasks[task_name].apply()
    finally:
        close_old_connections()


async def _beat(stop: asyncio.Event, task_name: str, every: float) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        try:
            await sync_to_async(_run_task_now, thread_sensitive=False)(task_name)
        except Exception:
            logger.exception("embedded_beat_task_failed", task=task_name)


def _seconds(schedule: Any) -> float:
    return float(schedule.total_seconds() if hasattr(schedule, "total_seconds") else schedule)


class Command(BaseCommand):
    help = "Run the whole system in one process (ASGI server and every registered server)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.HTTP_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        asyncio.run(self._main(host, port))

    async def _main(self, host: str, port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        config = uvicorn.Config(
            "config.asgi:application",
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            ws_max_size=settings.REALTIME_MAX_FRAME_BYTES * 4,
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
            for entry in settings.CELERY_BEAT_SCHEDULE.values():
                beat = _beat(stop, str(entry["task"]), _seconds(entry["schedule"]))
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
            ("Admin", f"{base}/admin/"),
            ("API docs", f"{base}/api/docs/"),
            ("Health", f"{base}/health"),
            ("Readiness", f"{base}/readyz"),
            ("Metrics", f"{base}/metrics"),
            ("WebSocket", f"ws://{host}:{port}/ws/"),
        ]:
            self.stdout.write(f"  {label:<12} {url}")
        for line in lines:
            self.stdout.write(f"  {line}")
