"""Issue 15: the consumer runs as several copies on one queue. Batches holding copies of the same
events commit side by side without a unique-index error or a deadlock, the ledger, stock and
duplicate counts end as one consumer would leave them, and the read cache is exact whatever
order the commits' cache writes (and racing read-through fills) land in."""

import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.db import close_old_connections, connection

from tests.warehouse.factories import body, envelope, example_pair, subprocess_env
from warehouse import queue, read_cache, selectors, services
from warehouse.models import ConsumerHeartbeat, DeadLetter, DuplicateMessage, LedgerEntry, Stock
from warehouse.schemas import envelope_parse
from warehouse.services import ingest, ledger_sql
from warehouse.simulator import Simulation

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _stock_body(warehouse_id: Any, product_id: Any) -> bytes:
    row = Stock.objects.get(warehouse_id=warehouse_id, product_id=product_id)
    return read_cache.body_of(read_cache.stock_view_of(row))


# --- the read cache: writes from older commits and racing fills never win --------------------


@pytest.mark.django_db
def test_write_throughs_landing_in_reverse_commit_order_leave_the_newer_stock_cached(
    django_capture_on_commit_callbacks: Any,
) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair: dict[str, Any] = {"warehouse_id": warehouse_id, "product_id": product_id}
    with django_capture_on_commit_callbacks() as older:
        services.movements_ingest(bodies=[body(envelope(quantity=5, **pair))])
    with django_capture_on_commit_callbacks() as newer:
        services.movements_ingest(bodies=[body(envelope(quantity=7, **pair))])
    # Two consumers: the newer commit's write-through lands first, the older one's after it.
    for callback in [*newer, *older]:
        callback()
    committed = _stock_body(warehouse_id, product_id)
    assert json.loads(committed)["balance"] == 12
    assert cache.get(read_cache.stock_cache_key(warehouse_id, product_id)) == committed
    assert selectors.stock_body_get(**pair) == committed


@pytest.mark.django_db
def test_a_stock_read_racing_a_commit_does_not_cache_the_balance_it_read(
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair: dict[str, Any] = {"warehouse_id": warehouse_id, "product_id": product_id}
    with django_capture_on_commit_callbacks(execute=True):
        services.movements_ingest(bodies=[body(envelope(quantity=5, **pair))])
    key = read_cache.stock_cache_key(warehouse_id, product_id)
    cache.delete(key)  # the next read misses and fills from the database
    view_of = read_cache.stock_view_of

    def commit_meanwhile(stock: Stock) -> read_cache.StockView:
        # The reader has read the row; a batch commits and writes through before it fills.
        with django_capture_on_commit_callbacks(execute=True):
            services.movements_ingest(bodies=[body(envelope(quantity=7, **pair))])
        return view_of(stock)

    monkeypatch.setattr(read_cache, "stock_view_of", commit_meanwhile)
    raced = selectors.stock_body_get(**pair)
    monkeypatch.undo()
    assert raced is not None and json.loads(raced)["balance"] == 5
    committed = _stock_body(warehouse_id, product_id)
    assert json.loads(committed)["balance"] == 12
    assert cache.get(key) == committed
    assert selectors.stock_body_get(**pair) == committed


@pytest.mark.django_db
def test_a_movement_read_racing_a_commit_does_not_cache_the_view_it_built(
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    departure, arrival = example_pair()
    movement_id = uuid.UUID(departure["data"]["movement_id"])
    with django_capture_on_commit_callbacks(execute=True):
        services.movements_ingest(bodies=[body(departure)])
    view_of = selectors.movement_view

    def commit_meanwhile(entries: list[LedgerEntry]) -> Any:
        # The reader has read the departure; the arrival commits and is invalidated meanwhile.
        with django_capture_on_commit_callbacks(execute=True):
            services.movements_ingest(bodies=[body(arrival)])
        return view_of(entries)

    monkeypatch.setattr(selectors, "movement_view", commit_meanwhile)
    raced = selectors.movement_body_get(movement_id=movement_id)
    monkeypatch.undo()
    assert raced is not None and json.loads(raced)["status"] == "in_transit"
    again = selectors.movement_body_get(movement_id=movement_id)
    assert again is not None and json.loads(again)["status"] == "completed"
    assert selectors.movement_body_get(movement_id=movement_id) == again


# --- the database: two batches with the same events at once ---------------------------------


def _together(
    monkeypatch: pytest.MonkeyPatch, name: str, after: Callable[[tuple[Any, ...]], bool]
) -> None:
    """Make the first call of `ingest.<name>` in each of two threads (whose arguments satisfy
    `after`) wait for the other's, so both batches have looked before either writes."""
    barrier = threading.Barrier(2, timeout=20)
    waited = threading.local()
    original = getattr(ingest, name)

    def looked_together(*args: Any) -> Any:
        found = original(*args)
        if after(args) and not getattr(waited, "done", False):
            waited.done = True
            barrier.wait()
        return found

    monkeypatch.setattr(ingest, name, looked_together)


def _side_by_side(batches: dict[str, tuple[list[bytes], list[str]]]) -> dict[str, Any]:
    """Run each batch through `movements_ingest` in its own thread and connection at once;
    returns each one's `BatchResult` or the exception it raised."""
    results: dict[str, Any] = {}

    def run(name: str, bodies: list[bytes], keys: list[str]) -> None:
        try:
            results[name] = services.movements_ingest(bodies=bodies, keys=keys)
        except Exception as exc:
            results[name] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(name, *batch)) for name, batch in batches.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_two_batches_storing_the_same_events_at_once_settle_them_without_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    departure, arrival = example_pair()
    other = envelope(quantity=4)
    rival = {**other, "data": {**other["data"], "quantity": 5}}
    _together(monkeypatch, "entries_existing", lambda args: True)
    results = _side_by_side(
        {
            # "shared" is one message delivered to both (a redelivery racing its first delivery).
            "first": (
                [body(departure), body(arrival), body(arrival), body(other)],
                ["first-departure", "shared", "first-arrival", "first-other"],
            ),
            "second": (
                [body(departure), body(arrival), body(rival)],
                ["second-departure", "shared", "second-rival"],
            ),
        }
    )
    assert [type(result).__name__ for result in results.values()] == ["BatchResult"] * 2
    # Whichever committed first, the other saw its events as stored: the same totals.
    outcomes = Counter(results["first"].outcomes + results["second"].outcomes)
    assert outcomes == {"stored": 3, "duplicate": 2, "redelivered": 1, "conflict": 1}
    close_old_connections()
    assert LedgerEntry.objects.count() == 3
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == 2
    assert DuplicateMessage.objects.count() == 2
    assert list(DeadLetter.objects.values_list("reason", flat=True)) == ["conflict"]
    assert selectors.stock_mismatches() == []
    for row in Stock.objects.all():
        key = read_cache.stock_cache_key(row.warehouse_id, row.product_id)
        assert cache.get(key) == _stock_body(row.warehouse_id, row.product_id)


@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_two_batches_counting_the_same_duplicate_message_at_once_count_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body(departure)], keys=["stored-it"])
    # Both batches look the message up among the counted duplicates before either records it.
    _together(
        monkeypatch,
        "message_keys_known",
        lambda args: args[0] is DuplicateMessage,
    )
    results = _side_by_side(
        {
            "first": ([body(departure)], ["the-copy"]),
            "second": ([body(departure)], ["the-copy"]),
        }
    )
    assert [type(result).__name__ for result in results.values()] == ["BatchResult"] * 2
    assert sorted(results["first"].outcomes + results["second"].outcomes) == [
        "duplicate",
        "redelivered",
    ]
    close_old_connections()
    assert LedgerEntry.objects.get().duplicates == 1
    assert list(DuplicateMessage.objects.values_list("message_key", flat=True)) == ["the-copy"]


@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
def test_a_batch_the_database_rolls_back_as_a_deadlock_victim_runs_again_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = ingest.ledger_store
    attempts: list[int] = []

    def victim_once(*args: Any) -> Any:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            with ledger_sql._pg_cursor() as cursor:
                # What PostgreSQL answers the transaction it picks to break a deadlock.
                cursor.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' "
                    "USING ERRCODE = 'deadlock_detected'; END $$"
                )
        return store(*args)

    monkeypatch.setattr(ingest, "ledger_store", victim_once)
    departure, arrival = example_pair()
    result = services.movements_ingest_isolated(
        bodies=[body(departure), body(arrival)], keys=["one", "two"]
    )
    assert result.outcomes == ["stored", "stored"]
    assert attempts == [1, 2]
    messages = [str(record.msg) for record in caplog.records]
    assert sum("warehouse_batch_rolled_back_retrying" in m for m in messages) == 1
    assert not any("retrying_singly" in m for m in messages)
    assert LedgerEntry.objects.count() == 2
    assert selectors.stock_mismatches() == []


# --- two real consumer processes on one queue ------------------------------------------------


def _publish(transport: dict[str, str], messages: list[tuple[bytes, str]]) -> None:
    """Publish `(body, message_id)` pairs as persistent messages, in order."""
    bound = queue.movement_queue(transport["queue"])
    with queue.connection_open(transport["url"]) as conn:
        channel = conn.channel()
        bound(channel).declare()
        producer = conn.Producer(channel, exchange=bound.exchange, routing_key=bound.routing_key)
        for raw, message_id in messages:
            producer.publish(
                raw,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=message_id,
                retry=True,
            )


def _interleaved_copies(bodies: list[bytes], window: int, seed: int) -> list[tuple[bytes, str]]:
    """Each body three times: its message, a second delivery of that same message (same
    `message_id`) and a real duplicate (another `message_id`), shuffled within windows of
    `window` bodies, so the copies of one event land in batches that commit side by side."""
    rng = random.Random(seed)
    messages: list[tuple[bytes, str]] = []
    for start in range(0, len(bodies), window):
        chunk: list[tuple[bytes, str]] = []
        for raw in bodies[start : start + window]:
            message_id, duplicate_id = uuid.uuid4().hex, uuid.uuid4().hex
            chunk += [(raw, message_id), (raw, message_id), (raw, duplicate_id)]
        rng.shuffle(chunk)
        messages += chunk
    return messages


_COLLISION = re.compile(
    r"traceback|uniqueviolation|integrityerror|deadlock|40P01|rolled_back|failed", re.IGNORECASE
)


@pytest.mark.needs_broker
@pytest.mark.needs_postgres
@pytest.mark.needs_redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_two_consumer_processes_draining_one_queue_with_interleaved_copies_end_as_one_would(
    transport: dict[str, str], tmp_path: Path
) -> None:
    consumer_logs = [tmp_path / "copy-0.log", tmp_path / "copy-1.log"]
    simulation = Simulation(seed=15, warehouses=3, products=4, movements=300)
    bodies = simulation.movement_bodies()
    expected_stock: dict[tuple[uuid.UUID, uuid.UUID], int] = defaultdict(int)
    for raw in bodies:
        env = envelope_parse(raw)
        expected_stock[(env.warehouse_id, env.product_id)] += env.delta
    env_vars = subprocess_env(
        WAREHOUSE_BROKER_URL=transport["url"],
        WAREHOUSE_QUEUE=transport["queue"],
        WAREHOUSE_HEARTBEAT_SECONDS="0.2",
    )
    command = [sys.executable, "manage.py", "run_warehouse_consumer"]
    command += ["--batch-size", "20", "--prefetch", "40", "--linger-ms", "20"]
    consumers = []
    for index, log in enumerate(consumer_logs):
        with log.open("wb") as handle:
            consumers.append(
                subprocess.Popen(
                    [*command, "--name", f"copy-{index}"],
                    cwd=ROOT,
                    env=env_vars,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        # Both consume before anything is published, so the broker spreads the messages.
        _wait_for(lambda: "warehouse_consumer_started" in consumer_logs[0].read_text())
        _wait_for(lambda: "warehouse_consumer_started" in consumer_logs[1].read_text())
        _publish(transport, _interleaved_copies(bodies, window=40, seed=15))

        def drained() -> bool:
            close_old_connections()
            duplicates = sum(LedgerEntry.objects.values_list("duplicates", flat=True))
            return LedgerEntry.objects.count() == len(bodies) and duplicates == len(bodies)

        def collided() -> bool:
            return any(_COLLISION.search(log.read_text()) for log in consumer_logs)

        _wait_for(lambda: drained() or collided(), 180)
        for child in consumers:
            child.send_signal(signal.SIGTERM)
        assert [child.wait(timeout=30) for child in consumers] == [0, 0]
    finally:
        for child in consumers:
            if child.poll() is None:
                child.kill()
                child.wait()
    texts = [log.read_text() for log in consumer_logs]
    # Both copies took part, and neither collided with the other.
    batches = [
        int(re.findall(r"warehouse_consumer_stopped\b.*batches=(\d+)", text)[-1]) for text in texts
    ]
    assert all(count > 0 for count in batches), batches
    for text in texts:
        assert not _COLLISION.search(text), text[-3000:]
    with queue.connection_open(transport["url"]) as conn:
        declared = queue.movement_queue(transport["queue"])(conn.channel()).queue_declare(
            passive=True
        )
    assert declared.message_count == 0, "everything was acked"

    # What one consumer would have left: one row per event, one counted duplicate per event
    # (the second delivery of a message is no duplicate), stock == the sum of the events.
    close_old_connections()
    assert LedgerEntry.objects.count() == len(bodies)
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == len(bodies)
    assert DuplicateMessage.objects.count() == len(bodies)
    assert DeadLetter.objects.count() == 0
    stock = {(row.warehouse_id, row.product_id): row for row in Stock.objects.all()}
    assert {pair: row.balance for pair, row in stock.items()} == expected_stock
    assert selectors.stock_mismatches() == []
    # The cache holds every pair's committed view, written through by whichever copy committed
    # the pair last.
    for (warehouse_id, product_id), row in stock.items():
        committed = read_cache.body_of(read_cache.stock_view_of(row))
        key = read_cache.stock_cache_key(warehouse_id, product_id)
        assert cache.get(key) == committed
        assert cache.get(read_cache.guard_key(key)) == row.version
        read = selectors.stock_body_get(warehouse_id=warehouse_id, product_id=product_id)
        assert read == committed
    for movement_id in set(LedgerEntry.objects.values_list("movement_id", flat=True)):
        entries = list(LedgerEntry.objects.filter(movement_id=movement_id))
        view = selectors.movement_view(entries)
        assert view is not None and view["status"] == "completed"
        assert selectors.movement_body_get(movement_id=movement_id) == read_cache.body_of(view)


def _heartbeats() -> dict[str, Any]:
    close_old_connections()
    return dict(ConsumerHeartbeat.objects.values_list("name", "beat_at"))


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_copies_on_one_host_keep_their_own_heartbeats_and_forget_a_killed_one(
    transport: dict[str, str],
) -> None:
    env_vars = subprocess_env(
        WAREHOUSE_BROKER_URL=transport["url"],
        WAREHOUSE_QUEUE=transport["queue"],
        WAREHOUSE_QUEUE_DIR=transport["dir"],
        WAREHOUSE_HEARTBEAT_SECONDS="0.2",
    )
    command = [sys.executable, "manage.py", "run_warehouse_consumer"]
    copies = [subprocess.Popen(command, cwd=ROOT, env=env_vars) for _ in range(2)]
    prefix = f"{socket.gethostname()}:{transport['queue']}:"
    killed, survivor = (f"{prefix}{copy.pid}" for copy in copies)
    try:
        _wait_for(lambda: _heartbeats().keys() == {killed, survivor})
        copies[0].send_signal(signal.SIGKILL)
        copies[0].wait(timeout=10)
        # The survivor forgets the dead copy's heartbeat and keeps beating its own.
        _wait_for(lambda: _heartbeats().keys() == {survivor})
        beat = _heartbeats()[survivor]
        _wait_for(lambda: _heartbeats().get(survivor, beat) > beat)
        copies[1].send_signal(signal.SIGTERM)
        assert copies[1].wait(timeout=20) == 0
    finally:
        for copy in copies:
            if copy.poll() is None:
                copy.kill()
                copy.wait()
    assert _heartbeats() == {}
