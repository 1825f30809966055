"""ORM calls from code outside Django's request cycle (servers, consumers, pollers).

Django recycles database connections around each request (`close_old_connections` on
`request_started`/`request_finished`); a long-running process has no requests, so each unit of
ORM work does the same itself, or a connection the database closed (a restart, an idle
timeout, a pool recycle) would fail the next call. One helper for every such process.
"""

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def orm_call(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Call `fn` between two `close_old_connections()`: a stale connection is replaced before
    it, and the connection goes back (to the pool, when there is one) right after it."""
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


def orm_async(
    fn: Callable[P, R], *, executor: ThreadPoolExecutor | None = None
) -> Callable[P, Awaitable[R]]:
    """`fn` as a coroutine function running `orm_call(fn, ...)` in a worker thread (not the
    single thread-sensitive one, so calls from many connections run in parallel; `executor`
    bounds them)."""

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return orm_call(fn, *args, **kwargs)

    return sync_to_async(call, thread_sensitive=False, executor=executor)
