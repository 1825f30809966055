"""The gRPC line provider against a real grpc.aio server on 127.0.0.1:0."""

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from asgiref.sync import sync_to_async
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import free_port
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Event
from tests.betting.factories import bet_place, event_create
from tests.betting.servers import command_env
from tests.factories import StaffFactory, UserFactory, token_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def in_an_hour() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return stamp


async def staff_metadata() -> tuple[tuple[str, str], ...]:
    staff = await sync_to_async(StaffFactory.create)()
    token = await sync_to_async(token_for)(staff)
    return (("authorization", f"Bearer {token}"),)


async def create(
    stub: pb_grpc.LineProviderStub, auth: tuple[tuple[str, str], ...], event_id: str, odds: str
) -> pb.Event:
    request = pb.CreateEventRequest(
        id=event_id, name=f"Match {event_id}", coefficient=odds, deadline=in_an_hour()
    )
    return await stub.CreateEvent(request, metadata=auth)


async def test_health_service_answers_serving(line_provider: str) -> None:
    async with grpc.aio.insecure_channel(line_provider) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "betting.v1.LineProvider"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_writes_without_a_token_are_unauthenticated(stub: pb_grpc.LineProviderStub) -> None:
    malformed = ["Bearer not-a-token", "x", "Bearer ", "Bearer a b", "Bearer " + "a" * 4000]
    for metadata in [(), *[(("authorization", header),) for header in malformed]]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CreateEvent(
                pb.CreateEventRequest(id="e", name="n", coefficient="1.50", deadline=in_an_hour()),
                metadata=metadata,
            )
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.FinishEvent(pb.FinishEventRequest(id="e", outcome=pb.OUTCOME_WIN))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_writes_with_a_non_staff_token_are_permission_denied(
    stub: pb_grpc.LineProviderStub,
) -> None:
    user = await sync_to_async(UserFactory.create)()
    token = await sync_to_async(token_for)(user)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.UpdateOdds(
            pb.UpdateOddsRequest(id="e", coefficient="1.50"),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("coefficient", ["1.555", "0", "-1.00", "NaN", "Infinity", "", "abc"])
async def test_bad_decimal_is_invalid_argument(
    stub: pb_grpc.LineProviderStub, coefficient: str
) -> None:
    auth = await staff_metadata()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create(stub, auth, "bad", coefficient)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "coefficient" in (error.value.details() or "")
    await create(stub, auth, "good", "1.50")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.UpdateOdds(
            pb.UpdateOddsRequest(id="good", coefficient=coefficient), metadata=auth
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_event_lifecycle_over_grpc(stub: pb_grpc.LineProviderStub) -> None:
    auth = await staff_metadata()
    created = await create(stub, auth, "m1", "1.80")
    assert created.state == pb.EVENT_STATE_NEW
    assert created.coefficient == "1.80"
    assert created.version == 1
    fetched = await stub.GetEvent(pb.GetEventRequest(id="m1"))
    assert fetched == created
    updated = await stub.UpdateOdds(
        pb.UpdateOddsRequest(id="m1", coefficient="2.05"), metadata=auth
    )
    assert (updated.coefficient, updated.version) == ("2.05", 2)
    assert (await stub.GetEvent(pb.GetEventRequest(id="m1"))).coefficient == "2.05"
    finished = await stub.FinishEvent(
        pb.FinishEventRequest(id="m1", outcome=pb.OUTCOME_LOSE), metadata=auth
    )
    assert finished.state == pb.EVENT_STATE_FINISHED_LOSE
    again = await stub.FinishEvent(
        pb.FinishEventRequest(id="m1", outcome=pb.OUTCOME_LOSE), metadata=auth
    )
    assert again.version == finished.version
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.CancelEvent(pb.CancelEventRequest(id="m1"), metadata=auth)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetEvent(pb.GetEventRequest(id="missing"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.FinishEvent(pb.FinishEventRequest(id="m1"), metadata=auth)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    vias = await sync_to_async(
        lambda: set(AuditEntry.objects.filter(subject_id="m1").values_list("via", flat=True))
    )()
    assert vias == {"grpc"}


async def test_finish_over_grpc_settles_bets(stub: pb_grpc.LineProviderStub) -> None:
    auth = await staff_metadata()
    await create(stub, auth, "s1", "2.50")
    user = await sync_to_async(UserFactory.create)()
    event = await sync_to_async(Event.objects.get)(pk="s1")
    bet = await sync_to_async(bet_place)(user=user, event=event, amount="4.00")
    await stub.FinishEvent(pb.FinishEventRequest(id="s1", outcome=pb.OUTCOME_WIN), metadata=auth)
    await sync_to_async(bet.refresh_from_db)()
    assert (bet.status, str(bet.payout)) == ("won", "10.00")


async def test_list_events_filters_and_paginates(stub: pb_grpc.LineProviderStub) -> None:
    auth = await staff_metadata()
    for n in range(5):
        await create(stub, auth, f"l{n}", "1.10")
    await stub.CancelEvent(pb.CancelEventRequest(id="l0"), metadata=auth)
    page = await stub.ListEvents(pb.ListEventsRequest(open_only=True, page_size=3))
    assert [event.id for event in page.events] == ["l1", "l2", "l3"]
    rest = await stub.ListEvents(
        pb.ListEventsRequest(open_only=True, page_size=3, page_token=page.next_page_token)
    )
    assert [event.id for event in rest.events] == ["l4"]
    assert rest.next_page_token == ""
    cancelled = await stub.ListEvents(pb.ListEventsRequest(state=pb.EVENT_STATE_CANCELLED))
    assert [event.id for event in cancelled.events] == ["l0"]


async def next_item(stream: object) -> pb.WatchEventsResponse:
    return await asyncio.wait_for(stream.read(), 5)  # type: ignore[attr-defined]


async def test_watch_gives_snapshot_then_changes_in_sequence_order(
    stub: pb_grpc.LineProviderStub,
) -> None:
    auth = await staff_metadata()
    await create(stub, auth, "w1", "1.50")
    await create(stub, auth, "w2", "1.60")
    await stub.UpdateOdds(pb.UpdateOddsRequest(id="w1", coefficient="1.55"), metadata=auth)
    stream = stub.WatchEvents(pb.WatchEventsRequest())
    first, second = await next_item(stream), await next_item(stream)
    assert [(item.snapshot.id, item.snapshot.coefficient) for item in (first, second)] == [
        ("w2", "1.60"),
        ("w1", "1.55"),
    ]
    end = await next_item(stream)
    assert end.snapshot_end.sequence == 3
    await stub.UpdateOdds(pb.UpdateOddsRequest(id="w2", coefficient="1.70"), metadata=auth)
    await create(stub, auth, "w3", "3.00")
    await stub.FinishEvent(pb.FinishEventRequest(id="w1", outcome=pb.OUTCOME_WIN), metadata=auth)
    changes: list[pb.EventChange] = []
    while len(changes) < 3:
        item = await next_item(stream)
        if item.HasField("change"):
            changes.append(item.change)
    assert [change.sequence for change in changes] == [4, 5, 6]
    assert [change.kind for change in changes] == [
        pb.CHANGE_KIND_ODDS,
        pb.CHANGE_KIND_CREATED,
        pb.CHANGE_KIND_FINISHED,
    ]
    assert changes[2].event.state == pb.EVENT_STATE_FINISHED_WIN
    stream.cancel()


async def test_watch_resumes_from_a_sequence_without_gaps_or_duplicates(
    stub: pb_grpc.LineProviderStub,
) -> None:
    auth = await staff_metadata()
    await create(stub, auth, "r1", "1.10")
    for n in range(1, 8):
        await stub.UpdateOdds(
            pb.UpdateOddsRequest(id="r1", coefficient=f"1.{10 + n}"), metadata=auth
        )
    stream = stub.WatchEvents(pb.WatchEventsRequest(from_sequence=3))
    seen: list[int] = []
    while len(seen) < 5:
        item = await next_item(stream)
        assert not item.HasField("snapshot")
        if item.HasField("change"):
            seen.append(item.change.sequence)
    assert seen == [4, 5, 6, 7, 8]
    await stub.UpdateOdds(pb.UpdateOddsRequest(id="r1", coefficient="9.99"), metadata=auth)
    item = await next_item(stream)
    while not item.HasField("change"):
        item = await next_item(stream)
    assert (item.change.sequence, item.change.event.coefficient) == (9, "9.99")
    stream.cancel()


async def test_watch_sees_changes_made_by_other_processes(stub: pb_grpc.LineProviderStub) -> None:
    stream = stub.WatchEvents(pb.WatchEventsRequest())
    assert (await next_item(stream)).HasField("snapshot_end")
    await sync_to_async(event_create)(event_id="rest-made")
    item = await next_item(stream)
    while not item.HasField("change"):
        item = await next_item(stream)
    assert item.change.event.id == "rest-made"
    assert (await stub.GetEvent(pb.GetEventRequest(id="rest-made"))).id == "rest-made"
    stream.cancel()


async def test_watch_heartbeats_when_idle(stub: pb_grpc.LineProviderStub) -> None:
    stream = stub.WatchEvents(pb.WatchEventsRequest())
    assert (await next_item(stream)).snapshot_end.sequence == 0
    beats = [await next_item(stream) for _ in range(2)]
    assert all(beat.HasField("heartbeat") for beat in beats)
    assert beats[0].heartbeat.sequence == 0
    stream.cancel()


@pytest.mark.timeout(90)
def test_run_line_provider_command_serves_grpc(transactional_db: None) -> None:
    port = free_port()
    env = command_env()
    child = subprocess.Popen(
        [sys.executable, "manage.py", "run_line_provider", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert f"127.0.0.1:{port} (plaintext)" in line

        async def check() -> int:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="betting.v1.LineProvider"), timeout=10
                )
                return int(answer.status)

        assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING
    finally:
        child.terminate()
        assert child.wait(timeout=20) == 0


def test_runall_registers_the_line_provider() -> None:
    from common.processes import embedded_processes

    names = {process.name: process for process in embedded_processes()}
    assert "betting-line-provider" in names
    assert "gRPC" in names["betting-line-provider"].describe()
