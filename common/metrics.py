"""Prometheus helpers shared by every app and process."""

import functools
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from prometheus_client import Histogram, start_http_server

P = ParamSpec("P")
R = TypeVar("R")

INTEGRATION_CALL_SECONDS = Histogram(
    "quintet_integration_call_seconds",
    "Duration of calls to other systems (Telegram, backend API, brokers), by target and outcome",
    ["target", "operation", "outcome"],
)


def timed_integration(
    target: str, operation: str
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an async integration call so its duration lands in one histogram."""

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = await func(*args, **kwargs)
                outcome = "ok"
                return result
            finally:
                INTEGRATION_CALL_SECONDS.labels(target, operation, outcome).observe(
                    time.perf_counter() - started
                )

        return wrapper

    return decorate


def metrics_server_start(port: int, host: str = "127.0.0.1") -> None:
    """Expose this process's metrics on its own port (for processes that serve no HTTP)."""
    if port:
        start_http_server(port, addr=host)
