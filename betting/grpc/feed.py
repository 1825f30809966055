"""The line provider's view of the change log, shared by every call to one server: a single
`ChangeFeed` polls the append-only change log (and is woken at once by writes made through this
server); it keeps the latest state of every event in memory for `GetEvent` and `WatchEvents`
snapshots, plus a window of recent changes that every watcher reads from. Also the conversion
of events and changes to their protobuf messages."""

import asyncio
import bisect
import contextlib
import time
from datetime import datetime
from decimal import Decimal

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from betting import schemas, selectors
from betting.grpc.generated import betting_pb2 as pb
from betting.models import Event, EventChange, EventState
from common.db import orm_async

logger = structlog.get_logger(__name__)

FEED_WINDOW = 20_000
FEED_PAGE = 1000

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


class ChangeFeed:
    """The server's view of the change log: latest event states plus a window of changes."""

    def __init__(self, *, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self.sequence = 0
        self.events: dict[str, pb.Event] = {}
        self._window: list[pb.EventChange] = []
        self._window_sequences: list[int] = []
        self._window_floor = 0
        """The window holds every change with sequence > _window_floor."""
        self._wake = asyncio.Event()
        self._tick = asyncio.Event()
        self.loaded = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if not self.loaded.is_set():
                    await self._load()
                while await self._poll():
                    pass
            except Exception:
                logger.exception("betting_feed_poll_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)

    async def _load(self) -> None:
        def load() -> tuple[int, list[EventChange]]:
            upto = selectors.change_sequence_current()
            return upto, selectors.event_changes_latest_per_event(up_to=upto)

        upto, latest = await orm_async(load)()
        self.events = {change.event_id: change_to_pb(change).event for change in latest}
        self.sequence = self._window_floor = upto
        self.loaded.set()

    async def _poll(self) -> bool:
        """Apply new changes; True when a full page came back (more may follow)."""
        changes = await orm_async(selectors.event_changes_after)(
            sequence=self.sequence, limit=FEED_PAGE
        )
        self._apply([change_to_pb(change) for change in changes])
        return len(changes) == FEED_PAGE

    def apply_own(self, event: Event, kind: str) -> None:
        """A write made through this server: when it is the very next sequence, apply it at
        once instead of waiting for a poll (sequences are gapless, so order stays exact)."""
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
                await asyncio.wait_for(tick.wait(), timeout=max(within, 0))
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
