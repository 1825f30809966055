"""Run a long-running command until SIGINT/SIGTERM, with the same graceful shutdown everywhere.

The first signal sets the `stop` event the server's main coroutine watches: it finishes the unit
of work in hand (a batch, a frame, a call), acks, closes and returns. A second signal means the
operator is done waiting: the main task is cancelled.
"""

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

logger = structlog.get_logger(__name__)
T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main(stop))`, with `stop` set by the first SIGINT/SIGTERM and the task
    cancelled by a second one. Returns what `main` returns."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if not stop.is_set():
                logger.info("shutdown_requested", signal=signal.Signals(signum).name)
                stop.set()
            else:
                logger.warning("shutdown_forced", signal=signal.Signals(signum).name)
                task.cancel()

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await main(stop)
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    return asyncio.run(runner())
