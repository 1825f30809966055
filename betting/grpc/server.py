"""The gRPC line provider (`betting.v1.LineProvider`) on grpc.aio.

Thin servicer: parse the request, call one service/selector through a worker thread, convert the
answer. Every field goes through the shared parsers with the limits the REST door uses
(`betting.schemas`, `services.STAKE`/`COEFFICIENT`): strings by `identifier`/`text`, decimals by
`money`, enums by `choice` (proto3 enums are open: an unknown number is refused), Timestamps by
`proto_timestamp`, numbers by `integer`. A refusal is INVALID_ARGUMENT naming the field.
ApplicationError → gRPC status, the correlation id and the catch-all for anything unexpected
live in one place, `interceptor.DoorInterceptor`, which every method goes through.

Transport security (TLS, mutual TLS, the plaintext rule) is decided by `transport.py` at start.

Reads of events are served from the server's one `feed.ChangeFeed` where it can. Several
copies of this server may run side by side on one database (see `feed` for how each learns of
the others' writes and the staleness bound of what it answers from memory).
"""

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from django.conf import settings
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from knox.auth import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from betting import schemas, selectors, services
from betting.grpc.feed import (
    FEED_PAGE,
    STATE_TO_PB,
    ChangeFeed,
    change_to_pb,
    event_to_pb,
    listen_params,
    timestamp_pb,
)
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.grpc.interceptor import DoorInterceptor, SequenceAhead
from betting.grpc.transport import bind_address, server_transport
from betting.models import Event, EventChange, EventState
from common import exceptions as app_errors
from common import parsers
from common.db import orm_async

logger = structlog.get_logger(__name__)

SERVICE_NAME = "betting.v1.LineProvider"

#: ListEvents' state filter: UNSPECIFIED means any state; any other number is refused.
STATE_FILTER_FROM_PB: Mapping[Any, EventState | None] = {
    pb.EVENT_STATE_UNSPECIFIED: None,
    **{value: key for key, value in STATE_TO_PB.items()},
}
OUTCOME_FROM_PB: Mapping[Any, str] = {pb.OUTCOME_WIN: "win", pb.OUTCOME_LOSE: "lose"}
DEFAULT_PAGE_SIZE = 100
#: API tokens are knox tokens: printable ASCII without spaces (hex plus any prefix).
TOKEN_PATTERN = re.compile(r"[!-~]+")
#: `authorization: Bearer <token>` or `Token <token>` (the REST door's scheme), any case.
TOKEN_SCHEMES = frozenset({"bearer", "token"})


def _staff_user_id(metadata: Any) -> int:
    """Authenticate `authorization: Bearer <token>` (or `Token <token>`) and require staff.

    The token is a knox API token checked exactly as the REST door checks it (its charset first,
    then knox: digest compared in constant time, expired tokens deleted and refused, inactive
    users refused, the expiry refreshed on use). A missing, malformed, unknown, revoked or
    expired token is NotAuthenticated (UNAUTHENTICATED); a valid token of a non-staff user is
    PermissionDenied. ORM work: event-loop callers run it through `orm_async`."""
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
    try:
        user, _ = TokenAuthentication().authenticate_credentials(token.encode())
    except AuthenticationFailed:
        raise app_errors.NotAuthenticated("invalid or expired token") from None
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
        return await orm_async(_staff_user_id)(context.invocation_metadata())

    async def _written(self, event: Event, kind: str) -> pb.Event:
        self.feed.apply_own(event, kind)
        await self.feed.catch_up(event.sequence)
        return event_to_pb(event)

    async def CreateEvent(
        self, request: pb.CreateEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await orm_async(services.event_create)(
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
        """From memory once the view is within the staleness bound (`ChangeFeed.fresh`); from
        the database when the event is not in it yet or the view cannot catch up."""
        arrived = time.monotonic()
        event_id = schemas.event_id(request.id, field="id")
        if await self.feed.fresh(arrived):
            cached = self.feed.events.get(event_id)
            if cached is not None:
                return cached
        return event_to_pb(await orm_async(selectors.event_get)(event_id=event_id))

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

        events = await orm_async(page)()
        more = len(events) > size
        return pb.ListEventsResponse(
            events=[event_to_pb(event) for event in events[:size]],
            next_page_token=str(offset + size) if more else "",
        )

    async def UpdateOdds(
        self, request: pb.UpdateOddsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Event:
        actor_id = await self._staff(context)
        event = await orm_async(services.event_odds_update)(
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
        event = await orm_async(services.event_finish)(
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
        event = await orm_async(services.event_cancel)(
            event_id=schemas.event_id(request.id, field="id"), actor_id=actor_id, via="grpc"
        )
        return await self._written(event, EventChange.Kind.CANCELLED)

    async def _resume_point(self, request: pb.WatchEventsRequest) -> int:
        """`from_sequence`: 0..the latest sequence committed (a point beyond it is OUT_OF_RANGE,
        never a silent wait that would skip the changes numbered up to it)."""
        sequence = parsers.integer(request.from_sequence, field="from_sequence")
        if sequence > self.feed.sequence:
            latest = await orm_async(selectors.change_sequence_current)()
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
        arrived = time.monotonic()
        await self.feed.loaded.wait()
        heartbeat = settings.BETTING_WATCH_HEARTBEAT_SECONDS
        if request.HasField("from_sequence"):
            cursor = await self._resume_point(request)
        else:
            # Within the staleness bound like GetEvent; the snapshot names its own sequence
            # and the changes after it follow, so even a late one loses nothing.
            await self.feed.fresh(arrived)
            cursor, events = self.feed.snapshot()
            for event in events:
                yield pb.WatchEventsResponse(snapshot=event)
            yield pb.WatchEventsResponse(snapshot_end=pb.SnapshotEnd(sequence=cursor))
        while True:
            changes = self.feed.changes_after(cursor)
            if changes is None:
                rows = await orm_async(selectors.event_changes_after)(
                    sequence=cursor, limit=FEED_PAGE
                )
                changes = [change_to_pb(row) for row in rows]
            for change in changes:
                yield pb.WatchEventsResponse(change=change)
                cursor = change.sequence
            if changes:
                continue
            if not await self.feed.wait_beyond(cursor, heartbeat):
                yield pb.WatchEventsResponse(
                    heartbeat=pb.Heartbeat(sequence=cursor, at=timestamp_pb(datetime.now(UTC)))
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
    feed = ChangeFeed(
        poll_seconds=settings.BETTING_WATCH_POLL_SECONDS,
        listen=await orm_async(listen_params)(),
    )
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
