"""The line provider's view of the change log, shared by every call to one server (one copy).

A single `ChangeFeed` per copy reads the append-only change log (`EventChange`, numbered by the
gapless global sequence) and keeps the latest state of every event in memory for `GetEvent` and
`WatchEvents` snapshots, plus a window of recent changes that every watcher reads from. It is
told of new changes three ways, all of which only make it read the log sooner:

- its own writes: applied at once when they are the very next sequence (`apply_own`);
- on PostgreSQL, a LISTEN on `lock_objects.CHANGES_CHANNEL`: every commit, by any copy, any web
  process or any other writer of the same database, wakes it within milliseconds;
- a poll every `BETTING_WATCH_POLL_SECONDS` (start to start), the bound when a notification is
  lost or there is no PostgreSQL.

Changes are applied strictly in sequence order, each once, so every copy's watchers see the same
gapless stream. Staleness contract: the view answers a read that arrived at time t only once it
holds every change committed before t - BETTING_WATCH_POLL_SECONDS (`fresh`); a copy that
cannot catch up (its database unreachable) waits for it, then answers from the database.

Also the conversion of events and changes to their protobuf messages."""

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from django.db import connections
from google.protobuf.timestamp_pb2 import Timestamp

from betting import schemas, selectors
from betting.grpc.generated import betting_pb2 as pb
from betting.lock_objects import CHANGES_CHANNEL
from betting.models import Event, EventChange, EventState
from common.db import orm_async

logger = structlog.get_logger(__name__)

FEED_WINDOW = 20_000
FEED_PAGE = 1000
#: How long a read waits for a lagging view before it reads the database itself.
FEED_REFRESH_WAIT_SECONDS = 2.0
#: Pause before re-opening a LISTEN connection that failed.
LISTEN_RETRY_SECONDS = 1.0

STATE_TO_PB = {
    EventState.NEW: pb.EVENT_STATE_NEW,
    EventState.FINISHED_WIN: pb.EVENT_STATE_FINISHED_WIN,
    EventState.FINISHED_LOSE: pb.EVENT_STATE_FINISHED_LOSE,
    EventState.CANCELLED: pb.EVENT_STATE_CANCELLED,
}

KIND_TO_PB = {
    EventChange.Kind.CREATED: pb.CHANGE_KIND_CREATED,
    EventChange.Kind.ODDS: pb.CHANGE_KIND_ODDS,
    EventChange.Kind.FINISHED: pb.CHANGE_KIND_FINISHED,
    EventChange.Kind.CANCELLED: pb.CHANGE_KIND_CANCELLED,
}


def timestamp_pb(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _event_pb(
    *,
    event_id: str,
    name: str,
    coefficient: Decimal,
    deadline: datetime,
    state: str,
    version: int,
    sequence: int,
) -> pb.Event:
    return pb.Event(
        id=event_id,
        name=name,
        coefficient=schemas.money_format(coefficient),
        deadline=timestamp_pb(deadline),
        state=STATE_TO_PB[EventState(state)],
        version=version,
        sequence=sequence,
    )


def event_to_pb(event: Event) -> pb.Event:
    return _event_pb(
        event_id=event.id,
        name=event.name,
        coefficient=event.coefficient,
        deadline=event.deadline,
        state=event.state,
        version=event.version,
        sequence=event.sequence,
    )


def change_to_pb(change: EventChange) -> pb.EventChange:
    return pb.EventChange(
        sequence=change.sequence,
        kind=KIND_TO_PB[EventChange.Kind(change.kind)],
        event=_event_pb(
            event_id=change.event_id,
            name=change.name,
            coefficient=change.coefficient,
            deadline=change.deadline,
            state=change.state,
            version=change.version,
            sequence=change.sequence,
        ),
    )


def listen_params() -> dict[str, Any] | None:
    """psycopg keywords for a LISTEN connection to the default database, or None when it is
    not PostgreSQL (then the feed only polls). Reads settings only; opens nothing."""
    database = connections["default"]
    if database.vendor != "postgresql":
        return None
    params: dict[str, Any] = database.get_connection_params()
    # Django's cursor class and adapters are for its sync connections; a LISTEN needs neither.
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return params


class ChangeFeed:
    """One copy's view of the change log: latest event states plus a window of changes.

    `sequence` is the last change applied; `fresh_as_of` (time.monotonic()) is when the last
    complete read of the log started: every change committed before it is applied."""

    def __init__(self, *, poll_seconds: float, listen: Mapping[str, Any] | None = None) -> None:
        self.poll_seconds = poll_seconds
        self.listen = listen
        self.sequence = 0
        self.fresh_as_of = -math.inf
        self.events: dict[str, pb.Event] = {}
        self._window: list[pb.EventChange] = []
        self._window_sequences: list[int] = []
        self._window_floor = 0
        """The window holds every change with sequence > _window_floor."""
        self._wake = asyncio.Event()
        self._tick = asyncio.Event()
        self._refreshed = asyncio.Event()
        self.loaded = asyncio.Event()
        # Its own thread (and connection), so the reads that keep the view fresh never queue
        # behind the calls' database work in the shared pool.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="betting-feed")

    async def run(self, stop: asyncio.Event) -> None:
        """Read the log until cancelled: at once when woken, else every `poll_seconds`; plus,
        with `listen`, the LISTEN task that wakes it. Failures are logged and retried."""
        listener = None
        if self.listen is not None:
            listener = asyncio.create_task(self._listen(stop), name="betting-feed-listen")
        try:
            while not stop.is_set():
                # Cleared before reading, so a wake-up that arrives during the read (a change
                # committed after its snapshot) makes the next read start at once.
                self._wake.clear()
                started = time.monotonic()
                try:
                    if not self.loaded.is_set():
                        await self._load()
                    await self._read()
                except Exception:
                    logger.exception("betting_feed_poll_failed")
                pause = started + self.poll_seconds - time.monotonic()
                # asyncio.timeout, not wait_for: no helper task per pause (3.11's wait_for wraps
                # the wait in a task on every poll).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(pause, 0.0)):
                        await self._wake.wait()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            self._reader.shutdown(wait=False, cancel_futures=True)

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN on the changes channel; a notified sequence beyond the view wakes the reader.
        Reconnects after LISTEN_RETRY_SECONDS when the connection fails (the poll covers the
        gap, and every (re)connection wakes the reader once)."""
        import psycopg
        from psycopg import sql

        assert self.listen is not None
        while not stop.is_set():
            try:
                connection = await psycopg.AsyncConnection.connect(autocommit=True, **self.listen)
                async with connection:
                    await connection.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(CHANGES_CHANNEL))
                    )
                    self.wake()
                    async for notice in connection.notifies():
                        if not notice.payload.isdigit() or int(notice.payload) > self.sequence:
                            self.wake()
            except Exception as error:  # the poll covers meanwhile; retry after a pause
                logger.warning("betting_feed_listen_failed", error=repr(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=LISTEN_RETRY_SECONDS)

    async def _load(self) -> None:
        def load() -> tuple[int, list[EventChange]]:
            upto = selectors.change_sequence_current()
            return upto, selectors.event_changes_latest_per_event(up_to=upto)

        started = time.monotonic()
        upto, latest = await orm_async(load, executor=self._reader)()
        self.events = {change.event_id: change_to_pb(change).event for change in latest}
        self.sequence = self._window_floor = upto
        self.loaded.set()
        self._fresh(started)

    async def _read(self) -> None:
        """Apply every change committed before this call, page by page."""
        while True:
            started = time.monotonic()
            changes = await orm_async(selectors.event_changes_after, executor=self._reader)(
                sequence=self.sequence, limit=FEED_PAGE
            )
            self._apply([change_to_pb(change) for change in changes])
            if len(changes) < FEED_PAGE:
                self._fresh(started)
                return

    def _fresh(self, started: float) -> None:
        # The read's snapshot was taken after `started`: everything committed before it is in.
        self.fresh_as_of = max(self.fresh_as_of, started)
        refreshed, self._refreshed = self._refreshed, asyncio.Event()
        refreshed.set()

    def apply_own(self, event: Event, kind: str) -> None:
        """A write made through this server: when it is the very next sequence, apply it at
        once instead of waiting for a read (sequences are gapless, so order stays exact);
        otherwise a change made elsewhere comes first, and the next read brings both."""
        if self.loaded.is_set() and event.sequence == self.sequence + 1:
            self._apply(
                [
                    pb.EventChange(
                        sequence=event.sequence,
                        kind=KIND_TO_PB[EventChange.Kind(kind)],
                        event=event_to_pb(event),
                    )
                ]
            )

    def _apply(self, messages: list[pb.EventChange]) -> None:
        fresh = [message for message in messages if message.sequence > self.sequence]
        for message in fresh:
            self.events[message.event.id] = message.event
            self._window.append(message)
            self._window_sequences.append(message.sequence)
            self.sequence = message.sequence
        if len(self._window) > 2 * FEED_WINDOW:
            drop = len(self._window) - FEED_WINDOW
            self._window_floor = self._window_sequences[drop - 1]
            del self._window[:drop]
            del self._window_sequences[:drop]
        if fresh:
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    def wake(self) -> None:
        self._wake.set()

    async def fresh(self, arrived: float, within: float = FEED_REFRESH_WAIT_SECONDS) -> bool:
        """Wait until the view holds every change committed before `arrived` (a
        time.monotonic() reading) minus `poll_seconds`: the staleness bound of every answer
        served from memory. Usually it already does (no wait); otherwise it wakes the reader
        and waits for its next read. False when that has not happened within `within` seconds
        (the database is unreachable or slow): the caller then reads the database itself."""
        deadline = time.monotonic() + within
        while self.fresh_as_of < arrived - self.poll_seconds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            refreshed = self._refreshed
            self.wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await refreshed.wait()
        return True

    async def catch_up(self, sequence: int, within: float = 5.0) -> None:
        """Return once the feed has applied `sequence` (read-your-writes through this server)."""
        deadline = time.monotonic() + within
        while self.sequence < sequence and time.monotonic() < deadline:
            self.wake()
            await self.wait_beyond(self.sequence, deadline - time.monotonic())

    async def wait_beyond(self, sequence: int, within: float) -> bool:
        """Wait until a change after `sequence` is applied; False on timeout."""
        while self.sequence <= sequence:
            tick = self._tick
            try:
                async with asyncio.timeout(max(within, 0)):
                    await tick.wait()
            except TimeoutError:
                return self.sequence > sequence
        return True

    def changes_after(self, sequence: int) -> list[pb.EventChange] | None:
        """Changes after `sequence` from memory; None when the window no longer covers them."""
        if sequence < self._window_floor:
            return None
        start = bisect.bisect_right(self._window_sequences, sequence)
        return self._window[start:]

    def snapshot(self) -> tuple[int, list[pb.Event]]:
        return self.sequence, sorted(self.events.values(), key=lambda event: event.sequence)
