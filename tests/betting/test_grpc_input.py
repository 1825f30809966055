"""The gRPC line provider under bad input (issue 10 item 6), against a real grpc.aio server.

Every field goes through the shared parsers: a refusal is INVALID_ARGUMENT whose details name
the field (OUT_OF_RANGE only for a resume point the log has not reached), never UNKNOWN with an
exception's text; anything unexpected is INTERNAL with a generic message, logged once with the
call's correlation id; the server keeps serving.
"""

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from asgiref.sync import sync_to_async
from google.protobuf.timestamp_pb2 import Timestamp

from betting import selectors
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Event
from tests.betting.factories import event_create
from tests.conftest import LiveServer
from tests.factories import StaffFactory, auth_header, token_for

pytestmark = pytest.mark.timeout(60)

Metadata = tuple[tuple[str, str], ...]
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a Timestamp can hold
MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
METHOD = "/betting.v1.LineProvider/"


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def in_an_hour() -> Timestamp:
    return stamp(datetime.now(UTC) + timedelta(hours=1))


async def staff_metadata() -> Metadata:
    staff = await sync_to_async(StaffFactory.create)()
    return (("authorization", f"Bearer {await sync_to_async(token_for)(staff)}"),)


@pytest.fixture
async def channel(line_provider: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(line_provider) as opened:
        yield opened


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def assert_invalid(call: Any, field: str) -> None:
    error = await refusal(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert (error.details() or "").startswith(f"{field}: "), error.details()


async def events_count() -> int:
    return await sync_to_async(Event.objects.count)()


async def assert_still_serving(stub: pb_grpc.LineProviderStub) -> None:
    listed = await stub.ListEvents(pb.ListEventsRequest(), timeout=10)
    assert listed.next_page_token == ""


@pytest.mark.parametrize("state", [5, 99, -1, 2**31 - 1, -(2**31)])
async def test_list_events_refuses_an_unknown_state_number(
    stub: pb_grpc.LineProviderStub, state: int
) -> None:
    await sync_to_async(event_create)(event_id="open")
    await assert_invalid(stub.ListEvents(pb.ListEventsRequest(state=state)), "state")  # type: ignore[arg-type]
    every = await stub.ListEvents(pb.ListEventsRequest(state=pb.EVENT_STATE_UNSPECIFIED))
    assert [event.id for event in every.events] == ["open"]
    cancelled = await stub.ListEvents(pb.ListEventsRequest(state=pb.EVENT_STATE_CANCELLED))
    assert list(cancelled.events) == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 501}, "page_size"),
        ({"page_size": 2**31 - 1}, "page_size"),
        ({"page_token": "-1"}, "page_token"),
        ({"page_token": "\u0661"}, "page_token"),
        ({"page_token": "1e3"}, "page_token"),
        ({"page_token": "1_0"}, "page_token"),
        ({"page_token": " 1"}, "page_token"),
        ({"page_token": "next"}, "page_token"),
        ({"page_token": "99999999999999999999"}, "page_token"),
        ({"page_token": "1\x00"}, "page_token"),
        ({"page_token": "9" * 100_000}, "page_token"),
    ],
)
async def test_list_events_refuses_a_bad_page_size_or_token(
    stub: pb_grpc.LineProviderStub, request_fields: dict[str, Any], field: str
) -> None:
    await assert_invalid(stub.ListEvents(pb.ListEventsRequest(**request_fields)), field)
    await assert_still_serving(stub)


@pytest.mark.parametrize(
    ("deadline", "why"),
    [
        (Timestamp(seconds=MAX_SECONDS + 1), "the issue's case: one past 9999-12-31"),
        (Timestamp(seconds=2**63 - 1), "int64 max"),
        (Timestamp(seconds=MIN_SECONDS - 1), "before year 1"),
        (Timestamp(seconds=-(2**63)), "int64 min"),
        (Timestamp(seconds=4_102_444_800, nanos=-1), "negative nanos"),
        (Timestamp(seconds=4_102_444_800, nanos=1_000_000_000), "nanos overflow"),
        (Timestamp(seconds=4_102_444_800, nanos=-(2**31)), "int32 min nanos"),
        (Timestamp(seconds=0), "the epoch (past)"),
        (Timestamp(seconds=MIN_SECONDS), "year 1 (past)"),
        (Timestamp(seconds=1_600_000_000), "2020 (past)"),
        (None, "missing"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_create_event_refuses_a_deadline_outside_the_timestamp_range_or_not_ahead(
    stub: pb_grpc.LineProviderStub, deadline: Timestamp | None, why: str
) -> None:
    auth = await staff_metadata()
    request = pb.CreateEventRequest(id="e1", name="Final", coefficient="1.50", deadline=deadline)
    await assert_invalid(stub.CreateEvent(request, metadata=auth), "deadline")
    assert await events_count() == 0
    await assert_still_serving(stub)


async def test_create_event_accepts_only_a_deadline_ahead_up_to_the_last_timestamp_second(
    stub: pb_grpc.LineProviderStub,
) -> None:
    auth = await staff_metadata()
    ago = stamp(datetime.now(UTC) - timedelta(seconds=1))
    request = pb.CreateEventRequest(id="ago", name="Ago", coefficient="1.50", deadline=ago)
    await assert_invalid(stub.CreateEvent(request, metadata=auth), "deadline")
    last = Timestamp(seconds=MAX_SECONDS, nanos=999_999_999)
    request = pb.CreateEventRequest(id="far", name="Far", coefficient="1.50", deadline=last)
    created = await stub.CreateEvent(request, metadata=auth)
    assert created.deadline.seconds == MAX_SECONDS
    assert (await stub.GetEvent(pb.GetEventRequest(id="far"))).id == "far"
    listed = await stub.ListEvents(pb.ListEventsRequest(open_only=True))
    assert [event.id for event in listed.events] == ["far"]
    stream = stub.WatchEvents(pb.WatchEventsRequest())
    first = await stream.read()
    assert first.snapshot.deadline.seconds == MAX_SECONDS
    stream.cancel()


NOT_MONEY = [
    "\u0661\u0660",
    "\uff11\uff10",
    "\u00b2",
    "1_0",
    "1e1",
    "+1",
    "-1",
    " 1",
    "1.555",
    "1.500",
    "NaN",
    "Infinity",
    "",
    "0",
    "0.00",
    "1000.01",
    "1\x00",
    # Past the 28 digits of the default decimal context, within the parser's 40 characters.
    "9" * 27,
    "9" * 38 + ".99",
    "9" * 40,
    "9" * 100_000,
]
BAD_IDS = ["", "a b", "a\x00b", "a\x01b", "a\nb", "\u00e9", "a/b", "x" * 65, "x" * 100_000]
BAD_NAMES = ["", "   ", "a\x00b", "a\x07b", "two\nlines", "x" * 201, "x" * 100_000]


def create_request(**overrides: Any) -> pb.CreateEventRequest:
    fields: dict[str, Any] = {"id": "e1", "name": "Final", "coefficient": "1.50"}
    return pb.CreateEventRequest(**({**fields, "deadline": in_an_hour()} | overrides))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("id", value) for value in BAD_IDS],
        *[("name", value) for value in BAD_NAMES],
        *[("coefficient", value) for value in NOT_MONEY],
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_create_event_refuses_a_bad_id_name_or_coefficient(
    stub: pb_grpc.LineProviderStub, field: str, value: str
) -> None:
    auth = await staff_metadata()
    await assert_invalid(stub.CreateEvent(create_request(**{field: value}), metadata=auth), field)
    assert await events_count() == 0
    assert not await sync_to_async(AuditEntry.objects.exists)()


@pytest.mark.parametrize("coefficient", NOT_MONEY, ids=lambda value: repr(value)[:40])
async def test_update_odds_refuses_a_coefficient_that_is_not_an_ascii_decimal(
    stub: pb_grpc.LineProviderStub, coefficient: str
) -> None:
    auth = await staff_metadata()
    await stub.CreateEvent(create_request(), metadata=auth)
    request = pb.UpdateOddsRequest(id="e1", coefficient=coefficient)
    await assert_invalid(stub.UpdateOdds(request, metadata=auth), "coefficient")
    assert (await stub.GetEvent(pb.GetEventRequest(id="e1"))).version == 1


@pytest.mark.parametrize("event_id", BAD_IDS, ids=lambda value: repr(value)[:40])
async def test_every_method_refuses_an_event_id_outside_the_identifier_charset(
    stub: pb_grpc.LineProviderStub, event_id: str
) -> None:
    """On PostgreSQL a NUL used to reach the query and come back as UNKNOWN."""
    auth = await staff_metadata()
    await assert_invalid(stub.GetEvent(pb.GetEventRequest(id=event_id)), "id")
    update = pb.UpdateOddsRequest(id=event_id, coefficient="2.00")
    await assert_invalid(stub.UpdateOdds(update, metadata=auth), "id")
    finish = pb.FinishEventRequest(id=event_id, outcome=pb.OUTCOME_WIN)
    await assert_invalid(stub.FinishEvent(finish, metadata=auth), "id")
    await assert_invalid(stub.CancelEvent(pb.CancelEventRequest(id=event_id), metadata=auth), "id")
    await assert_still_serving(stub)


@pytest.mark.parametrize("outcome", [0, 3, 99, -1, 2**31 - 1])
async def test_finish_refuses_an_unspecified_or_unknown_outcome(
    stub: pb_grpc.LineProviderStub, outcome: int
) -> None:
    auth = await staff_metadata()
    await stub.CreateEvent(create_request(), metadata=auth)
    request = pb.FinishEventRequest(id="e1", outcome=outcome)  # type: ignore[arg-type]
    await assert_invalid(stub.FinishEvent(request, metadata=auth), "outcome")
    assert (await stub.GetEvent(pb.GetEventRequest(id="e1"))).state == pb.EVENT_STATE_NEW


async def test_watch_refuses_a_negative_resume_point(stub: pb_grpc.LineProviderStub) -> None:
    stream = stub.WatchEvents(pb.WatchEventsRequest(from_sequence=-1))
    await assert_invalid(stream.read(), "from_sequence")
    await assert_still_serving(stub)


@pytest.mark.parametrize("from_sequence", [2, 2**63 - 1])
async def test_watch_from_a_sequence_the_log_has_not_reached_is_out_of_range(
    stub: pb_grpc.LineProviderStub, from_sequence: int
) -> None:
    await sync_to_async(event_create)(event_id="only")
    stream = stub.WatchEvents(pb.WatchEventsRequest(from_sequence=from_sequence))
    error = await refusal(stream.read())
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (error.details() or "").startswith("from_sequence: ")
    resumed = stub.WatchEvents(pb.WatchEventsRequest(from_sequence=1))
    item = await resumed.read()
    assert item.HasField("heartbeat")
    resumed.cancel()


@pytest.mark.parametrize(
    ("method", "raw", "field"),
    [
        ("GetEvent", b"\x0a\x03\xed\xa0\x80", "id"),  # a lone surrogate, UTF-8 encoded
        ("GetEvent", b"\x0a\x02\xc3\x28", "id"),
        ("GetEvent", b"\x0a\x01\xff", "id"),
        ("CreateEvent", b"\x0a\x02e1\x12\x03\xed\xb0\x80\x1a\x041.50", "name"),
        ("CreateEvent", b"\x0a\x02e1\x1a\x02\xc0\xaf", "coefficient"),
        ("ListEvents", b"\x22\x02\xed\xa0", "page_token"),
        ("GetEvent", b"\x0a\x05ab", "request"),  # truncated
        ("GetEvent", b"\x0a", "request"),
        ("ListEvents", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "request"),
        ("CreateEvent", b"\x22\x03\x08\x80\x80", "request"),  # deadline cut inside a varint
        ("WatchEvents", b"\x08\x80", "request"),
    ],
)
async def test_request_bytes_that_do_not_decode_are_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, stub: pb_grpc.LineProviderStub, method: str, raw: bytes, field: str
) -> None:
    auth = await staff_metadata()
    if method == "WatchEvents":
        call: Any = channel.unary_stream(f"{METHOD}{method}", None, None)(raw).read()
    else:
        call = channel.unary_unary(f"{METHOD}{method}", None, None)(raw, metadata=auth)
    await assert_invalid(call, field)
    await assert_still_serving(stub)


async def test_an_unexpected_failure_is_internal_generic_and_logged_once_with_the_request_id(
    stub: pb_grpc.LineProviderStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("secret internals: password=hunter2")

    monkeypatch.setattr(selectors, "event_get", broken)
    call = stub.GetEvent(pb.GetEventRequest(id="nowhere"), metadata=(("x-request-id", "rq-7"),))
    error = await refusal(call)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (error.details() or "")
    assert "x-request-id" in (error.details() or "")
    assert ("x-request-id", "rq-7") in tuple(error.trailing_metadata() or ())
    logged = [
        record
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == "grpc_unhandled_exception"
    ]
    assert len(logged) == 1
    assert logged[0].msg["request_id"] == "rq-7"  # type: ignore[index]
    assert logged[0].msg["rpc"] == f"{METHOD}GetEvent"  # type: ignore[index]
    await assert_still_serving(stub)


async def test_an_unexpected_failure_inside_the_stream_is_internal_with_a_fresh_request_id(
    stub: pb_grpc.LineProviderStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    def broken() -> int:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(selectors, "change_sequence_current", broken)
    unsafe = (("x-request-id", "not safe; id"),)
    stream = stub.WatchEvents(pb.WatchEventsRequest(from_sequence=5), metadata=unsafe)
    error = await refusal(stream.read())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (error.details() or "")
    trailer: dict[str, Any] = dict(tuple(error.trailing_metadata() or ()))  # type: ignore[arg-type]
    assert trailer["x-request-id"] != "not safe; id"
    assert len(trailer["x-request-id"]) == 32
    logged = [
        record
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == "grpc_unhandled_exception"
    ]
    assert [record.msg["request_id"] for record in logged] == [trailer["x-request-id"]]  # type: ignore[index]


async def test_domain_errors_keep_their_status_and_echo_the_request_id(
    stub: pb_grpc.LineProviderStub,
) -> None:
    error = await refusal(
        stub.GetEvent(pb.GetEventRequest(id="missing"), metadata=(("x-request-id", "rq-8"),))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "rq-8") in tuple(error.trailing_metadata() or ())


@pytest.mark.parametrize(
    "coefficient", ["1.50", "\u0661\u066b\u0665", "1_5", "1.5e0", "1.505", "0", "1000.01", "2"]
)
async def test_rest_and_grpc_judge_a_coefficient_alike(
    asgi_server: LiveServer, stub: pb_grpc.LineProviderStub, coefficient: str
) -> None:
    auth = await staff_metadata()
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    body = {"id": "rest", "name": "R", "coefficient": coefficient}
    body["deadline"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=10) as http:
        rest = await http.post("/api/betting/events", json=body, headers=headers)
    try:
        await stub.CreateEvent(create_request(id="grpc", coefficient=coefficient), metadata=auth)
        grpc_accepted = True
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        grpc_accepted = False
    assert (rest.status_code == 201) == grpc_accepted, rest.text
    assert (rest.status_code == 201) == (coefficient in {"1.50", "2"})
