"""A connection's bounded outbox: every frame to a WebSocket client goes through it (room
broadcasts and the consumer's own answers alike), so one client that stops reading is dropped
alone and never delays the others."""

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter

SLOW_CLIENTS = Counter("realtime_slow_clients_dropped_total", "Sockets dropped on overflow")

Send = Callable[[dict[str, Any]], Awaitable[None]]


def dumps(frame: Mapping[str, Any]) -> str:
    """A frame as compact JSON text (UTF-8 kept as is), the form every socket is sent."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def dumps_with_encoded(frame: Mapping[str, Any], name: str, encoded: Sequence[str]) -> str:
    """`dumps(frame)` with one more member `name`: a list of frames already encoded (spliced in
    rather than decoded and encoded again)."""
    return f'{dumps(frame)[:-1]},"{name}":[{",".join(encoded)}]}}'


class Outbox:
    """A connection's bounded outgoing buffer, drained by a writer task that exists only while
    frames are pending. Overflow calls `on_overflow` once and drops everything after. A write
    that raises (the transport refused the frame) closes the outbox and awaits `on_failure`
    with the exception, which must close the transport so the client reconnects and recovers
    (`input-policy.md`); it must not raise."""

    __slots__ = ("_on_failure", "_on_overflow", "_queue", "_send", "_writer", "closed", "limit")

    def __init__(
        self,
        send: Send,
        limit: int,
        on_overflow: Callable[[], None],
        on_failure: Callable[[Exception], Awaitable[None]] | None = None,
    ) -> None:
        self._send = send
        # Created with the first frame and dropped once drained: an empty deque is a 64-slot
        # block, the largest part of an idle socket's outbox.
        self._queue: deque[str | tuple[int, str]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._on_overflow = on_overflow
        self._on_failure = on_failure
        self.limit = limit
        self.closed = False

    def push(self, text: str) -> None:
        """Queue one encoded frame; on overflow drop everything and call `on_overflow` once.
        Ignored once closed."""
        if self.closed:
            return
        if self._queue is not None and len(self._queue) >= self.limit:
            self.close()
            self._on_overflow()
            return
        self._append(text)

    def push_close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code` and `reason` after the frames already queued; nothing is
        queued after it."""
        if not self.closed:
            self._append((code, reason))
            self.closed = True

    def _append(self, item: str | tuple[int, str]) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def close(self) -> None:
        """Drop what is queued and refuse everything after; idempotent."""
        self.closed = True
        self._queue = None

    async def _drain(self) -> None:
        try:
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, tuple):
                    code, reason = item
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                    self._queue = None
                else:
                    await self._send({"type": "websocket.send", "text": item})
        except Exception as error:
            self.close()
            if self._on_failure is not None:
                await self._on_failure(error)
        finally:
            self._writer = None
            self._queue = None
