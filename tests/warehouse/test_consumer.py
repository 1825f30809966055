"""The queue consumer: batches from the real transport (RabbitMQ when CELERY_BROKER_URL is set,
kombu's filesystem queue otherwise), poison messages, heartbeat, SIGTERM and SIGKILL."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import close_old_connections, connection
from django.db.models import Model
from django.test import Client, override_settings
from django.utils import timezone
from kombu import Consumer
from prometheus_client import REGISTRY

from common.processes import embedded_processes
from tests.factories import StaffFactory, auth_header
from tests.warehouse.factories import (
    UNSTORABLE,
    body,
    envelope,
    example_pair,
    mutated,
    subprocess_env,
)
from warehouse import queue, selectors
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock
from warehouse.services import ingest
from warehouse.simulator import POISON_BODIES, Simulation

ROOT = Path(__file__).resolve().parents[2]
ConsumerT = TypeVar("ConsumerT", bound=queue.MovementConsumer)


def _child_env(transport: dict[str, str], **extra: str) -> dict[str, str]:
    return subprocess_env(
        WAREHOUSE_BROKER_URL=transport["url"],
        WAREHOUSE_QUEUE=transport["queue"],
        WAREHOUSE_QUEUE_DIR=transport["dir"],
        WAREHOUSE_HEARTBEAT_SECONDS="0.2",
        **extra,
    )


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _count(model: type[Model]) -> int:
    close_old_connections()
    return int(model._default_manager.count())


def _consumer_thread(
    *, batch_size: int, linger_ms: int
) -> tuple[queue.MovementConsumer, threading.Thread, threading.Event]:
    return _run_in_thread(queue.MovementConsumer(batch_size=batch_size, linger_ms=linger_ms))


def _run_in_thread(
    consumer: ConsumerT,
) -> tuple[ConsumerT, threading.Thread, threading.Event]:
    halt = threading.Event()
    thread = threading.Thread(target=consumer.run_blocking, args=(halt,), daemon=True)
    thread.start()
    return consumer, thread, halt


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
@override_settings(WAREHOUSE_HEARTBEAT_SECONDS=0.1)
def test_poison_messages_are_dead_lettered_and_the_consumer_keeps_running(
    transport: dict[str, str],
) -> None:
    departure, arrival = example_pair()
    conflicting = {**departure, "data": {**departure["data"], "quantity": 1}}
    _consumer, thread, halt = _consumer_thread(batch_size=10, linger_ms=100)
    try:
        queue.envelopes_publish([b"\x00garbage", body(departure), b"{}", body(conflicting)])
        _wait_for(lambda: _count(DeadLetter) == 3 and _count(LedgerEntry) == 1)
        assert thread.is_alive()
        assert _count(ConsumerHeartbeat) == 1
        queue.envelopes_publish([body(arrival), body(arrival)])
        _wait_for(lambda: _count(LedgerEntry) == 2)
        _wait_for(lambda: LedgerEntry.objects.get(event="arrival").duplicates == 1)
        reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
        assert reasons == ["conflict", "malformed", "malformed"]
    finally:
        halt.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert _count(ConsumerHeartbeat) == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_produce_command_reaches_the_embedded_consumer_without_any_service(
    tmp_path: Path,
) -> None:
    queue_dir = str(tmp_path / "embedded-queue")
    name = "warehouse.movements"
    child = subprocess_env(WAREHOUSE_QUEUE_DIR=queue_dir)
    for variable in ("CELERY_BROKER_URL", "WAREHOUSE_BROKER_URL", "WAREHOUSE_QUEUE"):
        child.pop(variable, None)  # the embedded defaults
    options = ["--movements", "25", "--duplicate-rate", "0.2", "--poison-rate", "0.1"]
    produced = subprocess.run(
        [sys.executable, "manage.py", "warehouse_produce", *options, "--shuffle", "--seed", "3"],
        cwd=ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "filesystem://" in produced.stdout
    simulation = Simulation(seed=3, movements=25, duplicate_rate=0.2, poison_rate=0.1, shuffle=True)
    # What to query next: every warehouse with its source name, every product id.
    for index, warehouse_id in enumerate(simulation.warehouse_ids):
        assert f"{simulation.source(index)}  {warehouse_id}" in produced.stdout
    assert all(str(product_id) in produced.stdout for product_id in simulation.product_ids)
    expected = simulation.movement_bodies()
    poison = sum(1 for b in expected if not b.startswith(b'{"id"'))

    async def run_embedded() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(queue.consumer_run(stop))
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            stored = await asyncio.to_thread(_count, LedgerEntry)
            letters = await asyncio.to_thread(_count, DeadLetter)
            if stored == 50 and letters == poison:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 15)

    with override_settings(
        WAREHOUSE_BROKER_URL="filesystem://", WAREHOUSE_QUEUE=name, WAREHOUSE_QUEUE_DIR=queue_dir
    ):
        asyncio.run(run_embedded())
    assert _count(LedgerEntry) == 50
    assert _count(DeadLetter) == poison
    duplicates = sum(LedgerEntry.objects.values_list("duplicates", flat=True))
    assert 50 + duplicates + poison == len(expected)


def test_the_embedded_default_registers_the_consumer_with_runall() -> None:
    names = [process.name for process in embedded_processes()]
    assert ("warehouse-consumer" in names) is settings.WAREHOUSE_EMBEDDED_CONSUMER
    if not os.environ.get("CELERY_BROKER_URL"):
        assert "warehouse-consumer" in names


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_sigterm_finishes_the_batch_acks_and_exits(transport: dict[str, str]) -> None:
    bodies = Simulation(seed=5, movements=50).movement_bodies()
    queue.envelopes_publish(bodies)
    child = subprocess.Popen(
        [sys.executable, "manage.py", "run_warehouse_consumer", "--batch-size", "20"],
        cwd=ROOT,
        env=_child_env(transport),
    )
    try:
        _wait_for(lambda: _count(LedgerEntry) == 100, 60)
        _wait_for(lambda: _count(ConsumerHeartbeat) == 1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _count(ConsumerHeartbeat) == 0
    # Everything was acked: a fresh consumer finds nothing to redeliver.
    _consumer, thread, halt = _consumer_thread(batch_size=20, linger_ms=50)
    time.sleep(1.5)
    halt.set()
    thread.join(timeout=15)
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scraped_redelivered(port: int) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1.0
    for line in text.splitlines():
        if line.startswith('warehouse_messages_total{result="redelivered"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.needs_broker
@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_sigkill_between_commit_and_ack_redelivers_without_effect(
    transport: dict[str, str], tmp_path: Path
) -> None:
    simulation = Simulation(
        seed=11, movements=30, initial_stock=0, duplicate_rate=0.2, poison_rate=0.1, shuffle=True
    )
    bodies = simulation.movement_bodies()
    poison = sum(1 for b in bodies if not b.startswith(b'{"id"'))
    real_duplicates = len(bodies) - 60 - poison
    assert poison and real_duplicates
    queue.envelopes_publish(bodies)
    marker = tmp_path / "committed"
    options = ["--batch-size", "500", "--linger-ms", "500"]
    command = [sys.executable, "manage.py", "run_warehouse_consumer", *options]
    pausing = [sys.executable, "-m", "tests.warehouse.pause_after_commit", str(marker), *options]
    first = subprocess.Popen(pausing, cwd=ROOT, env=_child_env(transport))
    try:
        _wait_for(marker.exists, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    assert _count(LedgerEntry) == 60, "the batch was committed before the kill"
    assert _count(DeadLetter) == poison
    assert _duplicates() == real_duplicates
    balances = sorted(Stock.objects.values_list("warehouse_id", "product_id", "balance"))
    with queue.connection_open(transport["url"]) as conn:
        declared = queue.movement_queue(transport["queue"])(conn.channel()).queue_declare(
            passive=True
        )
    assert declared.message_count == len(bodies), "unacked messages went back to the queue"

    port = _free_port()
    second = subprocess.Popen(command, cwd=ROOT, env=_child_env(transport, METRICS_PORT=str(port)))
    try:
        # Positive evidence that the redelivered batch went through the pipeline again.
        _wait_for(lambda: _scraped_redelivered(port) == len(bodies), 60)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert _count(LedgerEntry) == 60
    assert _count(DeadLetter) == poison
    assert _duplicates() == real_duplicates
    assert sorted(Stock.objects.values_list("warehouse_id", "product_id", "balance")) == balances
    verified = subprocess.run(
        [sys.executable, "manage.py", "warehouse_verify_stock"],
        cwd=ROOT,
        env=_child_env(transport),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0 and "stock == sum(ledger)" in verified.stdout


def test_readyz_fails_on_a_stale_consumer_heartbeat_and_health_stays_up(
    http: httpx.Client,
) -> None:
    now = timezone.now()
    ConsumerHeartbeat.objects.create(name="test-consumer", beat_at=now, started_at=now)
    staff = auth_header(StaffFactory())
    assert http.get("/readyz", headers=staff).json()["checks"]["warehouse_consumer"]["ok"] is True
    stale = now - timedelta(seconds=settings.WAREHOUSE_HEARTBEAT_STALE_SECONDS + 1)
    ConsumerHeartbeat.objects.filter(name="test-consumer").update(beat_at=stale)
    response = http.get("/readyz", headers=staff)
    assert response.status_code == 503
    assert "stale" in response.json()["checks"]["warehouse_consumer"]["error"]
    assert http.get("/health").status_code == 200


@pytest.mark.django_db(transaction=True)
@override_settings(METRICS_BEARER_TOKEN="ops-test-token")
def test_readyz_fails_when_the_database_is_unreachable() -> None:
    ops_bearer = {"Authorization": "Bearer ops-test-token"}
    original = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent/dir/warehouse.sqlite3"
    else:
        connection.settings_dict["PORT"] = "1"
    try:
        response = Client().get("/readyz", headers=ops_bearer)
        assert response.status_code == 503
        assert response.json()["checks"]["database"]["ok"] is False
        assert Client().get("/health").status_code == 200
    finally:
        connection.close()
        connection.settings_dict.update(original)
        connection.connect()


def test_readyz_fails_when_the_broker_is_unreachable(http: httpx.Client) -> None:
    with override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"):
        response = http.get("/readyz", headers=auth_header(StaffFactory()))
    assert response.status_code == 503
    assert response.json()["checks"]["broker"]["ok"] is False


@pytest.mark.django_db
def test_the_verify_command_passes_on_an_empty_ledger() -> None:
    call_command("warehouse_verify_stock")


# --- issue 10: bad input and redelivery at the queue door ------------------------------------


def _redelivered() -> float:
    return REGISTRY.get_sample_value("warehouse_messages_total", {"result": "redelivered"}) or 0.0


def _duplicates() -> int:
    close_old_connections()
    return sum(LedgerEntry.objects.values_list("duplicates", flat=True))


def _stop(thread: threading.Thread, halt: threading.Event) -> None:
    halt.set()
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_envelopes_that_can_never_be_stored_are_dead_lettered_as_malformed_on_the_queue(
    transport: dict[str, str],
) -> None:
    bodies = [json.dumps(mutated(path, value)).encode() for path, value, _ in UNSTORABLE]
    _consumer, thread, halt = _consumer_thread(batch_size=50, linger_ms=100)
    try:
        queue.envelopes_publish([*bodies, body(envelope())])
        _wait_for(lambda: _count(DeadLetter) == len(bodies) and _count(LedgerEntry) == 1)
        assert thread.is_alive()
    finally:
        _stop(thread, halt)
    letters = {letter.body: letter for letter in DeadLetter.objects.all()}
    for raw, (_, _, field) in zip(bodies, UNSTORABLE, strict=True):
        letter = letters[raw.decode()]
        assert letter.reason == "malformed", (field, letter.detail)
        assert letter.detail.startswith(f"{field}: "), letter.detail


def _failing_on(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Make the pipeline raise unexpectedly on envelopes from `source` (a bug's stand-in)."""
    parse = ingest._parse

    def failing(raw: Any) -> Any:
        parsed = parse(raw)
        if parsed.source == source:
            raise RuntimeError("a bug in the pipeline")
        return parsed

    monkeypatch.setattr(ingest, "_parse", failing)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_batch_that_fails_unexpectedly_on_the_queue_is_retried_message_by_message(
    transport: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_on(monkeypatch, "WH-BOOM")
    departure, arrival = example_pair()
    boom = {**envelope(), "source": "WH-BOOM"}
    queue.envelopes_publish([body(departure), body(boom), body(arrival), body(departure)])
    _consumer, thread, halt = _consumer_thread(batch_size=10, linger_ms=300)
    try:
        _wait_for(lambda: _count(LedgerEntry) == 2 and _duplicates() == 1)
        _wait_for(lambda: _count(DeadLetter) == 1)
        assert thread.is_alive()
    finally:
        _stop(thread, halt)
    assert DeadLetter.objects.get().reason == "error"
    assert selectors.stock_mismatches() == []


class _AckLostOnce(queue.MovementConsumer):
    """Loses its connection between the commit and the ack of its first batch, as a consumer
    killed there would: the broker (or kombu's virtual transport) redelivers the batch."""

    lost = 0

    def _ack(self, batch: list[Any]) -> None:
        if not self.lost:
            self.lost = len(batch)
            raise ConnectionResetError("connection lost between commit and ack")
        super()._ack(batch)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_redelivering_a_partly_failed_batch_adds_no_dead_letter_and_counts_no_duplicate_again(
    transport: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_on(monkeypatch, "WH-BOOM")
    departure, arrival = example_pair()
    valid = [body(departure), body(arrival), body(envelope()), body(envelope())]
    poison = [
        *POISON_BODIES,
        json.dumps(mutated("data.timestamp", "0001-01-01T00:00:00+01:00")).encode(),
        body({**envelope(), "source": "WH-BOOM"}),
    ]
    real_duplicates = [body(departure), body(arrival), body(departure)]
    # Three identical `not json` bodies too: each is its own message (its own message_id).
    messages = [*valid, *poison, *real_duplicates, POISON_BODIES[0], POISON_BODIES[0]]
    poison_count = len(poison) + 2
    queue.envelopes_publish(messages)
    before = _redelivered()
    consumer, thread, halt = _run_in_thread(_AckLostOnce(batch_size=100, linger_ms=300))
    try:
        _wait_for(lambda: consumer.lost > 0)
        _wait_for(lambda: _redelivered() - before == consumer.lost, 30)
        _wait_for(lambda: _count(LedgerEntry) + _duplicates() + _count(DeadLetter) == len(messages))
        assert thread.is_alive()
        assert _count(LedgerEntry) == len(valid)
        assert _count(DeadLetter) == poison_count
        assert _duplicates() == len(real_duplicates)
        reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
        assert reasons == ["error"] + ["malformed"] * (poison_count - 1)
        # A message published again after all that is a real duplicate, counted once.
        queue.envelopes_publish([body(departure)])
        _wait_for(lambda: _duplicates() == len(real_duplicates) + 1)
    finally:
        _stop(thread, halt)
    assert selectors.stock_mismatches() == []


def _publish_together(publishers: int, name: str) -> list[BaseException]:
    """`publishers` threads declare queue `name` and publish one message at the same moment."""
    errors: list[BaseException] = []
    start = threading.Barrier(publishers)

    def publish() -> None:
        start.wait()
        try:
            queue.envelopes_publish([b"{}"], url="filesystem://", queue_name=name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return errors


def test_concurrent_first_declarations_on_the_filesystem_transport_lose_nothing(
    tmp_path: Path,
) -> None:
    # kombu's filesystem transport truncates a new exchange table before locking it; a thread
    # reading it in that window failed with JSONDecodeError (the flaky poison test) or routed
    # the message nowhere. Four publishers declare the same fresh queue at once, 30 times.
    # (A new queue name each time: kombu keeps declared bindings per process.)
    for attempt in range(30):
        folder, name = tmp_path / str(attempt), f"race-{uuid.uuid4().hex[:8]}"
        with override_settings(WAREHOUSE_QUEUE_DIR=str(folder)):
            assert _publish_together(4, name) == []
        assert len(list(folder.glob(f"*.{name}.msg"))) == 4


def _drain_while_publishing(name: str, publishers: int, per_thread: int) -> list[bytes]:
    """Consume queue `name` while `publishers` threads publish `per_thread` messages each."""
    received: list[bytes] = []
    queue.envelopes_publish([b"first"], url="filesystem://", queue_name=name)
    threads = [
        threading.Thread(
            target=queue.envelopes_publish,
            args=([b"%d-%d" % (t, n) for n in range(per_thread)],),
            kwargs={"url": "filesystem://", "queue_name": name},
        )
        for t in range(publishers)
    ]

    def take(message: Any) -> None:
        received.append(message.body)
        message.ack()

    with queue.connection_open("filesystem://") as conn:
        movement = queue.movement_queue(name)
        with Consumer(conn.channel(), queues=[movement], on_message=take):
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(received) < 1 + per_thread * publishers:
                assert time.monotonic() < deadline, f"{len(received)} received"
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
    for thread in threads:
        thread.join(timeout=10)
    return received


def test_a_consumer_draining_while_others_publish_on_the_filesystem_transport_gets_everything(
    tmp_path: Path,
) -> None:
    # kombu wrote message files in place (open, then lock, then write) and read them without a
    # lock: a consumer could take a file still empty and lose its message with JSONDecodeError.
    for attempt in range(3):
        name = f"drain-{uuid.uuid4().hex[:8]}"
        with override_settings(WAREHOUSE_QUEUE_DIR=str(tmp_path / str(attempt))):
            received = _drain_while_publishing(name, publishers=3, per_thread=150)
        expected = [b"first", *[b"%d-%d" % (t, n) for t in range(3) for n in range(150)]]
        assert sorted(received) == sorted(expected)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_the_consumer_keys_every_message_and_reassembles_large_bodies(
    transport: dict[str, str],
) -> None:
    """Each message's key is the one `message_key` gives for its body and `message_id`
    (present or not, after any other property), and a body larger than one AMQP frame arrives
    whole (its key proves it; refused as too large)."""
    departure, arrival = example_pair()
    oversized = b'{"pad":"' + b"x" * 200_000 + b'"}'
    sent: list[tuple[bytes, dict[str, Any]]] = [
        (body(departure), {"message_id": "with-id", "headers": {"x-trace": "t" * 500}}),
        (body(arrival), {"correlation_id": "c", "priority": 1}),
        (oversized, {"message_id": "big"}),
        (b"not json", {}),
    ]
    name = transport["queue"]
    bound = queue.movement_queue(name)
    with queue.connection_open() as conn:
        channel = conn.channel()
        bound(channel).declare()
        producer = conn.Producer(channel, exchange=bound.exchange, routing_key=name)
        for raw, options in sent:
            producer.publish(raw, content_type="application/json", delivery_mode=2, **options)
    _consumer, thread, halt = _consumer_thread(batch_size=10, linger_ms=100)
    try:
        _wait_for(lambda: _count(LedgerEntry) == 2 and _count(DeadLetter) == 2)
    finally:
        halt.set()
        thread.join(timeout=15)
    expected = {queue.message_key(raw, options.get("message_id")) for raw, options in sent}
    stored = set(LedgerEntry.objects.values_list("message_key", flat=True))
    dead = {row.message_key: row for row in DeadLetter.objects.all()}
    assert stored | dead.keys() == expected
    big = dead[queue.message_key(oversized, "big")]
    assert "larger than" in big.detail
    assert big.body.startswith('{"pad":"xxx')
    assert dead[queue.message_key(b"not json", None)].reason == "malformed"
    with queue.connection_open() as conn:
        assert bound(conn.channel()).queue_declare(passive=True).message_count == 0
