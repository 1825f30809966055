"""Run a long-running command until SIGINT/SIGTERM, with the same graceful shutdown everywhere.

The first signal sets the `stop` event the server's main coroutine watches: it finishes the unit
of work in hand (a batch, a frame, a call), acks, closes and returns. A second signal at least
`FORCE_AFTER_SECONDS` later means the operator is done waiting: the main task is cancelled and
the process exits with status 1. (Supervisors such as `timeout` or a process-group kill deliver
the same signal twice at once; that is still one request.)
"""

import asyncio
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

logger = structlog.get_logger(__name__)
T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER_SECONDS = 1.0


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main(stop))`, with `stop` set by the first SIGINT/SIGTERM and the task
    cancelled by a later one. Returns what `main` returns; raises SystemExit(1) when forced."""
    forced = False

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        first_at = 0.0

        def on_signal(signum: int) -> None:
            nonlocal first_at, forced
            name = signal.Signals(signum).name
            if not stop.is_set():
                logger.info("shutdown_requested", signal=name)
                first_at = time.monotonic()
                stop.set()
            elif time.monotonic() - first_at >= FORCE_AFTER_SECONDS and not forced:
                logger.warning("shutdown_forced", signal=name)
                forced = True
                task.cancel()

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await main(stop)
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        if forced:
            raise SystemExit(1) from None
        raise
