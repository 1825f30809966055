"""Line-provider copies side by side on one database: each copy's watchers get every change, in
global sequence order, whichever copy (or another process) made it; reads agree within the
staleness bound; settlement stays exactly-once when a copy is killed mid-run."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from google.protobuf.timestamp_pb2 import Timestamp

from bench.harness import celery_worker_args
from betting import selectors, services
from betting.grpc.feed import event_to_pb
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Bet, BetStatus, Event
from betting.tasks import reconcile_settlements, settle_event
from config.celery import app as celery_app
from tests.betting.factories import bet_place
from tests.betting.servers import ROOT, LineProviderCopy, command_env, line_provider_copies
from tests.factories import StaffFactory, UserFactory, token_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.django_db(transaction=True)]

Auth = tuple[tuple[str, str], ...]
#: The copies' `BETTING_WATCH_POLL_SECONDS`, the staleness bound of what they answer from memory.
BOUND = 0.05
FAST = {"BETTING_WATCH_POLL_SECONDS": str(BOUND), "BETTING_WATCH_HEARTBEAT_SECONDS": "0.3"}
DEADLINE = 20.0


def in_an_hour() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return stamp


def staff_auth() -> Auth:
    return (("authorization", f"Bearer {token_for(StaffFactory.create())}"),)


@pytest.fixture(autouse=True)
async def _thread_connections_closed() -> AsyncIterator[None]:
    """The test's sync_to_async calls share one thread; its connection would keep the test
    database busy at teardown."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def copies(transactional_db: None, tmp_path: Path) -> Iterator[dict[str, LineProviderCopy]]:
    with line_provider_copies(("a", "b"), log_dir=tmp_path, environment=FAST) as running:
        yield running


class Watcher:
    """A WatchEvents stream read in the background: `changes` in arrival order."""

    def __init__(self, address: str, request: pb.WatchEventsRequest) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stream = pb_grpc.LineProviderStub(self.channel).WatchEvents(request)
        self.snapshot: list[pb.Event] = []
        self.snapshot_end: int | None = None
        self.changes: list[pb.EventChange] = []
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.stream:
            if item.HasField("snapshot"):
                self.snapshot.append(item.snapshot)
            elif item.HasField("snapshot_end"):
                self.snapshot_end = item.snapshot_end.sequence
            elif item.HasField("change"):
                self.changes.append(item.change)
            self.started.set()

    async def until(self, sequence: int) -> list[pb.EventChange]:
        """Every change received once one numbered `sequence` or later has arrived."""
        deadline = time.monotonic() + DEADLINE
        while not self.changes or self.changes[-1].sequence < sequence:
            if self.task.done():
                self.task.result()
                raise AssertionError("the stream ended")
            assert time.monotonic() < deadline, f"no change {sequence} within {DEADLINE} s"
            await asyncio.sleep(0.01)
        return list(self.changes)

    async def close(self) -> None:
        self.stream.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close(None)


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        await watcher.close()


async def watch(opened: list[Watcher], address: str, from_sequence: int | None = None) -> Watcher:
    request = (
        pb.WatchEventsRequest()
        if from_sequence is None
        else pb.WatchEventsRequest(from_sequence=from_sequence)
    )
    watcher = Watcher(address, request)
    opened.append(watcher)
    await asyncio.wait_for(watcher.started.wait(), DEADLINE)
    return watcher


class Writer:
    """Event writes over gRPC to one copy, or through the services as a web process would."""

    def __init__(self, address: str | None, auth: Auth) -> None:
        self.auth = auth
        self.channel = grpc.aio.insecure_channel(address) if address else None
        self.stub = pb_grpc.LineProviderStub(self.channel) if self.channel else None

    async def create(self, event_id: str, odds: str) -> pb.Event:
        if self.stub is None:
            return await self._service(
                services.event_create,
                event_id=event_id,
                name=f"Match {event_id}",
                coefficient=Decimal(odds),
                deadline=datetime.now(UTC) + timedelta(hours=1),
            )
        request = pb.CreateEventRequest(
            id=event_id, name=f"Match {event_id}", coefficient=odds, deadline=in_an_hour()
        )
        return await self.stub.CreateEvent(request, metadata=self.auth)

    async def odds(self, event_id: str, odds: str) -> pb.Event:
        if self.stub is None:
            return await self._service(
                services.event_odds_update, event_id=event_id, coefficient=Decimal(odds)
            )
        request = pb.UpdateOddsRequest(id=event_id, coefficient=odds)
        return await self.stub.UpdateOdds(request, metadata=self.auth)

    async def finish(self, event_id: str, outcome: str = "win") -> pb.Event:
        if self.stub is None:
            return await self._service(services.event_finish, event_id=event_id, outcome=outcome)
        number = pb.OUTCOME_WIN if outcome == "win" else pb.OUTCOME_LOSE
        request = pb.FinishEventRequest(id=event_id, outcome=number)
        return await self.stub.FinishEvent(request, metadata=self.auth)

    async def cancel(self, event_id: str) -> pb.Event:
        if self.stub is None:
            return await self._service(services.event_cancel, event_id=event_id)
        return await self.stub.CancelEvent(pb.CancelEventRequest(id=event_id), metadata=self.auth)

    async def get(self, event_id: str) -> pb.Event:
        assert self.stub is not None
        return await self.stub.GetEvent(pb.GetEventRequest(id=event_id))

    async def list(self) -> list[pb.Event]:
        assert self.stub is not None
        answer = await self.stub.ListEvents(pb.ListEventsRequest(page_size=500))
        return list(answer.events)

    async def _service(self, write: Callable[..., Event], **kwargs: Any) -> pb.Event:
        event = await sync_to_async(write)(actor_id=None, via="test", **kwargs)
        return event_to_pb(event)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)


@pytest.fixture
async def writers(copies: dict[str, LineProviderCopy]) -> AsyncIterator[dict[str, Writer]]:
    auth = await sync_to_async(staff_auth)()
    opened = {name: Writer(copy.address, auth) for name, copy in copies.items()}
    opened["web"] = Writer(None, auth)
    yield opened
    for writer in opened.values():
        await writer.close()


def lifecycle(event_id: str, n: int) -> list[Callable[[Writer], Awaitable[pb.Event]]]:
    """Every kind of change to one event: created, odds twice, then finished or cancelled."""
    end: Callable[[Writer], Awaitable[pb.Event]] = (
        (lambda w: w.finish(event_id, "win" if n % 4 else "lose"))
        if n % 2
        else (lambda w: w.cancel(event_id))
    )
    return [
        lambda w: w.create(event_id, "1.50"),
        lambda w: w.odds(event_id, f"2.{n:02d}"),
        lambda w: w.odds(event_id, f"3.{n:02d}"),
        end,
    ]


def as_changes(written: list[pb.Event]) -> list[tuple[int, str, int, str]]:
    return [(e.sequence, e.id, e.version, e.coefficient) for e in written]


def received(changes: list[pb.EventChange]) -> list[tuple[int, str, int, str]]:
    return [(c.sequence, c.event.id, c.event.version, c.event.coefficient) for c in changes]


async def test_two_line_providers_serve_watch_events_without_gaps_when_writes_alternate(
    writers: dict[str, Writer], copies: dict[str, LineProviderCopy], watchers: list[Watcher]
) -> None:
    on_a = await watch(watchers, copies["a"].address)
    on_b = await watch(watchers, copies["b"].address)
    assert on_a.snapshot_end == on_b.snapshot_end == 0
    # One write after the other, to A, then B, then A ...; every fifth through the services,
    # as the REST API in a web process makes it.
    order = ["a", "b", "a", "b", "web"]
    steps = [step for n in range(6) for step in lifecycle(f"alt-{n}", n)]
    written = [await step(writers[order[k % len(order)]]) for k, step in enumerate(steps)]
    assert [event.sequence for event in written] == list(range(1, len(steps) + 1))

    # Then both copies at once, each on its own events, while a web process writes too.
    async def burst(name: str) -> list[pb.Event]:
        made = []
        for n in range(10):
            made += [await step(writers[name]) for step in lifecycle(f"{name}-{n}", n)]
        return made

    for made in await asyncio.gather(burst("a"), burst("b"), burst("web")):
        written += made
    written.sort(key=lambda event: event.sequence)
    last = len(written)
    assert [event.sequence for event in written] == list(range(1, last + 1))

    expected = as_changes(written)
    assert received(await on_a.until(last)) == expected
    assert received(await on_b.until(last)) == expected
    assert on_a.changes == on_b.changes


async def test_a_watcher_resumes_on_the_other_copy_without_a_gap(
    writers: dict[str, Writer], copies: dict[str, LineProviderCopy], watchers: list[Watcher]
) -> None:
    on_a = await watch(watchers, copies["a"].address)
    steps = [step for n in range(4) for step in lifecycle(f"res-{n}", n)]
    written = [await step(writers["ab"[k % 2]]) for k, step in enumerate(steps[:8])]
    seen = await on_a.until(8)
    await on_a.close()
    # A write on A the moment before the watcher moves to B: B may not have read it yet.
    written.append(await steps[8](writers["a"]))
    on_b = await watch(watchers, copies["b"].address, from_sequence=written[-1].sequence - 1)
    assert on_b.snapshot_end is None
    written += [await step(writers["ab"[k % 2]]) for k, step in enumerate(steps[9:])]
    resumed = await on_b.until(len(steps))
    assert received(seen + resumed) == as_changes(written)
    # From a sequence B has certainly not applied yet: it waits for it instead of skipping.
    ahead = await writers["a"].create("ahead", "1.10")
    on_b_again = await watch(watchers, copies["b"].address, from_sequence=ahead.sequence)
    later = await writers["b"].odds("ahead", "1.20")
    assert received(await on_b_again.until(later.sequence)) == as_changes([later])


async def agreed(reader: Writer, written: pb.Event, written_at: float) -> pb.Event:
    """Read until the copy answers the written state, checking the staleness contract on each
    answer: one that misses the write must come from a call that started within the bound."""
    deadline = time.monotonic() + DEADLINE
    while True:
        called_at = time.monotonic()
        answer = await reader.get(written.id)
        if answer == written:
            return answer
        assert answer.sequence < written.sequence, "an answer ahead of the last write"
        assert called_at < written_at + BOUND, (
            f"{answer} misses a write committed {called_at - written_at:.3f} s before the call"
        )
        assert time.monotonic() < deadline


async def test_reads_from_either_copy_agree_within_the_staleness_bound(
    writers: dict[str, Writer],
) -> None:
    steps = [step for n in range(5) for step in lifecycle(f"read-{n}", n)]
    for k, step in enumerate(steps):
        mine, other = ("a", "b") if k % 2 == 0 else ("b", "a")
        written = await step(writers[mine])
        written_at = time.monotonic()
        # The copy that made the write answers it as soon as the write returns ...
        assert await writers[mine].get(written.id) == written
        # ... the other one once the bound has passed, at the latest.
        await agreed(writers[other], written, written_at)
        # ListEvents reads the database: both copies agree at once.
        assert await writers["a"].list() == await writers["b"].list()
    for event in await writers["a"].list():
        assert event.state != pb.EVENT_STATE_NEW


@pytest.mark.needs_postgres
async def test_a_change_reaches_the_other_copys_watchers_at_once_without_waiting_for_a_poll(
    transactional_db: None, tmp_path: Path, watchers: list[Watcher]
) -> None:
    """With a poll an hour apart, only the commit's notification can tell the other copies."""
    slow = {"BETTING_WATCH_POLL_SECONDS": "3600", "BETTING_WATCH_HEARTBEAT_SECONDS": "0.3"}
    auth = await sync_to_async(staff_auth)()
    with line_provider_copies(("a", "b", "c"), log_dir=tmp_path, environment=slow) as running:
        addresses = [copy.address for copy in running.values()]
        on = [await watch(watchers, address) for address in addresses]
        a, b = Writer(addresses[0], auth), Writer(addresses[1], auth)
        web = Writer(None, auth)
        try:
            written = [
                await a.create("n1", "1.40"),
                await b.odds("n1", "1.45"),
                await web.odds("n1", "1.50"),
                await a.finish("n1"),
            ]
            for watcher in on:
                assert received(await watcher.until(4)) == as_changes(written)
            assert await b.get("n1") == written[-1]
        finally:
            await a.close()
            await b.close()


async def test_get_event_answers_within_the_bound_even_when_the_feed_stalls(
    stub: pb_grpc.LineProviderStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy whose view cannot catch up (its reads of the change log fail) must not keep
    answering from memory: after a short wait it reads the event from the database."""
    event = await sync_to_async(services.event_create)(
        event_id="stall",
        name="Stall",
        coefficient=Decimal("1.50"),
        deadline=datetime.now(UTC) + timedelta(hours=1),
        actor_id=None,
        via="test",
    )
    assert (await stub.GetEvent(pb.GetEventRequest(id="stall"))).sequence == event.sequence

    def broken(**kwargs: Any) -> Any:
        raise ConnectionError("the change log is unreachable")

    monkeypatch.setattr(selectors, "event_changes_after", broken)
    changed = await sync_to_async(services.event_odds_update)(
        event_id="stall", coefficient=Decimal("2.25"), actor_id=None, via="test"
    )
    deadline = time.monotonic() + DEADLINE
    while (answer := await stub.GetEvent(pb.GetEventRequest(id="stall"))) != event_to_pb(changed):
        assert time.monotonic() < deadline, f"still answering {answer.coefficient}"
    assert answer.coefficient == "2.25"


# --- settlement across copies -------------------------------------------------------------


@pytest.fixture
def worker(transactional_db: None, tmp_path: Path) -> Iterator[None]:
    """A real Celery worker on the test database (RabbitMQ), the queue purged around it."""
    import subprocess

    celery_app.control.purge()
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        celery_worker_args(extra=("--without-heartbeat",)),
        cwd=ROOT,
        env=command_env(),
        stdout=log,
        stderr=log,
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        celery_app.control.purge()


@pytest.fixture
async def reconciler(transactional_db: None) -> AsyncIterator[None]:
    """The reconciler (beat) running all along in a thread of its own, racing the worker's
    settlements; it is also the net for a settlement lost with a killed copy."""
    stop = threading.Event()

    def reconcile_until_stopped() -> None:
        try:
            while not stop.is_set():
                reconcile_settlements.apply().get()
                stop.wait(0.02)
        finally:
            connections.close_all()

    running = asyncio.create_task(sync_to_async(reconcile_until_stopped, thread_sensitive=False)())
    yield
    stop.set()
    await running


OUTCOMES = ("win", "lose", "cancel")
EVENTS = 18
BETS_PER_EVENT = 6


def placed() -> dict[str, str]:
    """EVENTS events with BETS_PER_EVENT bets of 2.00 each at 1.50; their intended outcomes."""
    users = [UserFactory.create() for _ in range(3)]
    plan = {}
    for n in range(EVENTS):
        event = services.event_create(
            event_id=f"s{n}",
            name=f"Settle {n}",
            coefficient=Decimal("1.50"),
            deadline=datetime.now(UTC) + timedelta(hours=1),
            actor_id=None,
            via="test",
        )
        for k in range(BETS_PER_EVENT):
            bet_place(user=users[k % 3], event=event, amount="2.00")
        plan[event.id] = OUTCOMES[n % 3]
    return plan


async def end(stub: pb_grpc.LineProviderStub, auth: Auth, event_id: str, outcome: str) -> None:
    if outcome == "cancel":
        await stub.CancelEvent(pb.CancelEventRequest(id=event_id), metadata=auth, timeout=20)
        return
    number = pb.OUTCOME_WIN if outcome == "win" else pb.OUTCOME_LOSE
    request = pb.FinishEventRequest(id=event_id, outcome=number)
    await stub.FinishEvent(request, metadata=auth, timeout=20)


@pytest.mark.needs_postgres
@pytest.mark.needs_broker
async def test_every_bet_settles_once_when_a_copy_is_killed_mid_run_and_restarted(
    worker: None, reconciler: None, tmp_path: Path
) -> None:
    plan = await sync_to_async(placed)()
    auth = await sync_to_async(staff_auth)()
    ids = list(plan)
    with line_provider_copies(
        ("a", "b"), log_dir=tmp_path, broker=True, environment=FAST
    ) as running:
        a, b = running["a"], running["b"]

        answered = asyncio.Event()

        async def through(copy: LineProviderCopy, event_ids: list[str]) -> list[str]:
            """End each event through `copy`, all at once; the ids whose call failed."""

            async def one(stub: pb_grpc.LineProviderStub, event_id: str) -> None:
                await end(stub, auth, event_id, plan[event_id])
                answered.set()

            async with grpc.aio.insecure_channel(copy.address) as channel:
                stub = pb_grpc.LineProviderStub(channel)
                answers = await asyncio.gather(
                    *(one(stub, event_id) for event_id in event_ids), return_exceptions=True
                )
            return [i for i, answer in zip(event_ids, answers, strict=True) if answer is not None]

        # A is killed as soon as one of its finishes has returned, the others in flight: some
        # committed with their settlement not yet sent, some not committed at all.
        first, second = ids[: EVENTS // 2], ids[EVENTS // 2 :]
        calls_to_a = asyncio.create_task(through(a, first))
        await asyncio.wait_for(answered.wait(), DEADLINE)
        a.kill()
        failed_on_a = await calls_to_a
        # The client retries on B and, once it is back, on A; every finish also goes to the
        # other copy (a retry that crossed the answer), so settlements race for each event.
        assert await through(b, first) == []
        a.start()
        results = await asyncio.gather(through(a, failed_on_a + second), through(b, second))
        assert results == [[], []]

    def settled() -> bool:
        return not Bet.objects.filter(status=BetStatus.PENDING).exists()

    deadline = time.monotonic() + 60
    while not await sync_to_async(settled)():
        assert time.monotonic() < deadline, "bets still pending"
        await asyncio.sleep(0.1)

    def outcome() -> tuple[dict[str, set[tuple[str, str]]], dict[str, list[int]]]:
        bets: dict[str, set[tuple[str, str]]] = {}
        for event_id, status, payout in Bet.objects.values_list("event_id", "status", "payout"):
            bets.setdefault(event_id, set()).add((status, str(payout)))
        audits: dict[str, list[int]] = {}
        for row in AuditEntry.objects.filter(subject=AuditEntry.Subject.BET).order_by("id"):
            audits.setdefault(row.subject_id, []).append(row.data["bets"])
        return bets, audits

    bets, audits = await sync_to_async(outcome)()
    result = {"win": ("won", "3.00"), "lose": ("lost", "0.00"), "cancel": ("void", "2.00")}
    assert bets == {event_id: {result[plan[event_id]]} for event_id in ids}
    # One settlement per event, covering all its bets: nothing applied twice.
    assert audits == {event_id: [BETS_PER_EVENT] for event_id in ids}
    assert await sync_to_async(lambda: reconcile_settlements.apply().get())() == 0
    # A settlement message delivered again (RabbitMQ redelivers unacked ones) changes nothing.
    for event_id in ids:
        assert await sync_to_async(lambda i=event_id: settle_event.apply(args=[i]).get())() == 0
    assert await sync_to_async(outcome)() == (bets, audits)
