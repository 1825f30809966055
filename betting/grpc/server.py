"""The gRPC line provider (`betting.v1.LineProvider`) on grpc.aio.

Thin servicer: parse the request, call one service/selector through a worker thread, convert the
answer. Every field goes through the shared parsers with the limits the REST door uses
(`betting.schemas`, `services.STAKE`/`COEFFICIENT`): strings by `identifier`/`text`, decimals by
`money`, enums by `choice` (proto3 enums are open: an unknown number is refused), Timestamps by
`proto_timestamp`, numbers by `integer`. A refusal is INVALID_ARGUMENT naming the field.
ApplicationError → gRPC status, the correlation id and the catch-all for anything unexpected
live in one place, `interceptor.DoorInterceptor`, which every method goes through.

Transport security (TLS, mutual TLS, the plaintext rule) is decided by `transport.py` at start.

A single `ChangeFeed` per server polls the append-only change log (and is woken at once by writes
made through this server); it keeps the latest state of every event in memory for `GetEvent` and
`WatchEvents` snapshots, plus a window of recent changes that every watcher reads from.
"""

import asyncio
import bisect
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

import grpc
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from knox.auth import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from betting import schemas, selectors, services
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.grpc.interceptor import DoorInterceptor, SequenceAhead
from betting.grpc.transport import bind_address, server_transport
from betting.models import Event, EventChange, EventState
from common import exceptions as app_errors
from common import parsers

logger = structlog.get_logger(__name__)

SERVICE_NAME = "betting.v1.LineProvider"
FEED_WINDOW = 20_000
FEED_PAGE = 1000

STATE_TO_PB = {
    EventState.NEW: pb.EVENT_STATE_NEW,
    EventState.FINISHED_WIN: pb.EVENT_STATE_FINISHED_WIN,
    EventState.FINISHED_LOSE: pb.EVENT_STATE_FINISHED_LOSE,
    EventState.CANCELLED: pb.EVENT_STATE_CANCELLED,
}
#: ListEvents' state filter: UNSPECIFIED means any state; any other number is refused.
STATE_FILTER_FROM_PB: Mapping[Any, EventState | None] = {
    pb.EVENT_STATE_UNSPECIFIED: None,
    **{value: key for key, value in STATE_TO_PB.items()},
}
KIND_TO_PB = {
    EventChange.Kind.CREATED: pb.CHANGE_KIND_CREATED,
    EventChange.Kind.ODDS: pb.CHANGE_KIND_ODDS,
    EventChange.Kind.FINISHED: pb.CHANGE_KIND_FINISHED,
    EventChange.Kind.CANCELLED: pb.CHANGE_KIND_CANCELLED,
}
OUTCOME_FROM_PB: Mapping[Any, str] = {pb.OUTCOME_WIN: "win", pb.OUTCOME_LOSE: "lose"}
DEFAULT_PAGE_SIZE = 100
#: API tokens are knox tokens: printable ASCII without spaces (hex plus any prefix).
TOKEN_PATTERN = re.compile(r"[!-~]+")
#: `authorization: Bearer <token>` or `Token <token>` (the REST door's scheme), any case.
TOKEN_SCHEMES = frozenset({"bearer", "token"})

P = ParamSpec("P")
R = TypeVar("R")


def _db(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ORM work in a worker thread, recycling stale connections around it."""

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


def _timestamp(value: datetime) -> Timestamp:
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
        deadline=_timestamp(deadline),
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

        upto, latest = await _db(load)()
        self.events = {change.event_id: change_to_pb(change).event for change in latest}
        self.sequence = self._window_floor = upto
        self.loaded.set()

    async def _poll(self) -> bool:
        """Apply new changes; True when a full page came back (more may follow)."""
        changes = await _db(selectors.event_changes_after)(sequence=self.sequence, limit=FEED_PAGE)
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


def _staff_user_id(metadata: Any) -> int:
    """Authenticate `authorization: Bearer <token>` (or `Token <token>`) and require staff.

    The token is a knox API token checked exactly as the REST door checks it (its charset first,
    then knox: digest compared in constant time, expired tokens deleted and refused, inactive
    users refused, the expiry refreshed on use). A missing, malformed, unknown, revoked or
    expired token is NotAuthenticated (UNAUTHENTICATED); a valid token of a non-staff user is
    PermissionDenied."""
    header = next((value for key, value in metadata or () if key == "authorization"), "")
    if not isinstance(header, str):
        header = ""
    scheme, _, token = header.partition(" ")
    try:
        token = parsers.identifier(
            token.strip(), field="authorization", max_length=256, pattern=TOKEN_PATTERN
        )
    except parsers.InvalidValue:
        token = ""
    if scheme.lower() not in TOKEN_SCHEMES or not token:
        raise app_errors.NotAuthenticated(
            "a staff API token is required: authorization: Bearer <token> (or Token <token>)"
        )
    close_old_connections()
    try:
        user, _ = TokenAuthentication().authenticate_credentials(token.encode())
    except AuthenticationFailed:
        raise app_errors.NotAuthenticated("invalid or expired token") from None
    finally:
        close_old_connections()
    if not user.is_staff:
        raise app_errors.PermissionDenied("staff only")
    return int(user.pk)


def _outcome(number: int) -> str:
    outcome: str = parsers.choice(number, field="outcome", choices=OUTCOME_FROM_PB)
    return outcome


def _deadline(request: pb.CreateEventRequest) -> datetime:
    """A new event's deadline: a valid Timestamp after now (the REST rule)."""
    if not request.HasField("deadline"):
        raise parsers.InvalidValue("deadline", "required", "is required")
    stamp = request.deadline
    moment = parsers.proto_timestamp(stamp.seconds, stamp.nanos, field="deadline")
    return schemas.deadline_ahead(moment, now=datetime.now(UTC), field="deadline")


class LineProviderServicer(pb_grpc.LineProviderServicer):
    """`betting.v1.LineProvider`. Writes authenticate first (as REST does), then parse."""

    def __init__(self, feed: ChangeFeed) -> None:
        self.feed = feed

    async def _staff(self, context: grpc.aio.ServicerContext[Any, Any]) -> int:
        return await sync_to_async(_staff_user_id, thread_sensitive=False)(
            context.invocation_metadata()
        )

    async def _written(self, event: Event, kind: str) -> pb.Event:
        self.feed.apply_own(event, kind)
        await self.feed.catch_up(event.sequence)
        return event_to_pb(event)

    async def CreateEvent(
        self, request: pb.CreateEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await _db(services.event_create)(
            event_id=schemas.event_id(request.id, field="id"),
            name=schemas.event_name(request.name, field="name"),
            coefficient=services.COEFFICIENT.parse(request.coefficient, field="coefficient"),
            deadline=_deadline(request),
            actor_id=actor_id,
            via="grpc",
        )
        return await self._written(event, EventChange.Kind.CREATED)

    async def GetEvent(
        self, request: pb.GetEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        event_id = schemas.event_id(request.id, field="id")
        cached = self.feed.events.get(event_id)
        if cached is not None:
            return cached
        return event_to_pb(await _db(selectors.event_get)(event_id=event_id))

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListEventsResponse:
        state: EventState | None = parsers.choice(
            request.state, field="state", choices=STATE_FILTER_FROM_PB
        )
        size = parsers.integer(
            request.page_size, field="page_size", max_value=settings.API_MAX_PAGE_SIZE
        )
        size = size or DEFAULT_PAGE_SIZE
        offset = (
            parsers.integer(request.page_token, field="page_token", max_value=parsers.INT32_MAX)
            if request.page_token
            else 0
        )
        open_only = request.open_only

        def page() -> list[Event]:
            events = selectors.events_list(state=state, open_only=open_only)
            return list(events[offset : offset + size + 1])

        events = await _db(page)()
        more = len(events) > size
        return pb.ListEventsResponse(
            events=[event_to_pb(event) for event in events[:size]],
            next_page_token=str(offset + size) if more else "",
        )

    async def UpdateOdds(
        self, request: pb.UpdateOddsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await _db(services.event_odds_update)(
            event_id=schemas.event_id(request.id, field="id"),
            coefficient=services.COEFFICIENT.parse(request.coefficient, field="coefficient"),
            actor_id=actor_id,
            via="grpc",
        )
        return await self._written(event, EventChange.Kind.ODDS)

    async def FinishEvent(
        self, request: pb.FinishEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await _db(services.event_finish)(
            event_id=schemas.event_id(request.id, field="id"),
            outcome=_outcome(request.outcome),
            actor_id=actor_id,
            via="grpc",
        )
        return await self._written(event, EventChange.Kind.FINISHED)

    async def CancelEvent(
        self, request: pb.CancelEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await _db(services.event_cancel)(
            event_id=schemas.event_id(request.id, field="id"), actor_id=actor_id, via="grpc"
        )
        return await self._written(event, EventChange.Kind.CANCELLED)

    async def _resume_point(self, request: pb.WatchEventsRequest) -> int:
        """`from_sequence`: 0..the latest sequence committed (a point beyond it is OUT_OF_RANGE,
        never a silent wait that would skip the changes numbered up to it)."""
        sequence = parsers.integer(request.from_sequence, field="from_sequence")
        if sequence > self.feed.sequence:
            latest = await _db(selectors.change_sequence_current)()
            if sequence > latest:
                raise SequenceAhead(
                    f"from_sequence: {sequence} is after the latest sequence {latest}",
                    details={"from_sequence": [f"is after the latest sequence {latest}"]},
                )
            await self.feed.catch_up(sequence)
        return sequence

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        await self.feed.loaded.wait()
        heartbeat = settings.BETTING_WATCH_HEARTBEAT_SECONDS
        if request.HasField("from_sequence"):
            cursor = await self._resume_point(request)
        else:
            cursor, events = self.feed.snapshot()
            for event in events:
                yield pb.WatchEventsResponse(snapshot=event)
            yield pb.WatchEventsResponse(snapshot_end=pb.SnapshotEnd(sequence=cursor))
        while True:
            changes = self.feed.changes_after(cursor)
            if changes is None:
                rows = await _db(selectors.event_changes_after)(sequence=cursor, limit=FEED_PAGE)
                changes = [change_to_pb(row) for row in rows]
            for change in changes:
                yield pb.WatchEventsResponse(change=change)
                cursor = change.sequence
            if changes:
                continue
            if not await self.feed.wait_beyond(cursor, heartbeat):
                yield pb.WatchEventsResponse(
                    heartbeat=pb.Heartbeat(sequence=cursor, at=_timestamp(datetime.now(UTC)))
                )


async def serve(
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    on_bound: Callable[[int], None] | None = None,
) -> None:
    """Serve the line provider (plus grpc.health.v1 and, by setting, reflection) until `stop`.

    Raises ImproperlyConfigured before binding when the transport settings are unusable or
    forbid plaintext on `host` (`transport.server_transport`)."""
    transport = server_transport(host)
    server = grpc.aio.server(interceptors=[DoorInterceptor()])
    feed = ChangeFeed(poll_seconds=settings.BETTING_WATCH_POLL_SECONDS)
    pb_grpc.add_LineProviderServicer_to_server(LineProviderServicer(feed), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.BETTING_GRPC_REFLECTION:
        from grpc_reflection.v1alpha import reflection

        names = (
            pb.DESCRIPTOR.services_by_name["LineProvider"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
    address = bind_address(host, port)
    if transport.credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, transport.credentials)
    await server.start()
    feed_task = asyncio.create_task(feed.run(stop), name="betting-feed")
    await feed.loaded.wait()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info("line_provider_started", host=host, port=bound, transport=transport.mode)
    if on_bound is not None:
        on_bound(bound)
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        feed_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed_task
        logger.info("line_provider_stopped")
