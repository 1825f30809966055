"""The movement queue: kombu on the Celery broker's RabbitMQ, or kombu's `filesystem://`
transport under var/ in embedded mode (so a producer in another terminal reaches `make run`
without any service, through the same code path).

The consumer takes up to `batch_size` messages (waiting at most `linger` for a batch to fill),
runs them through `movements_ingest` in one transaction and acks them only after the commit.
A crash between commit and ack redelivers the batch, which the ledger's idempotency key turns
into duplicates with no effect.
"""

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from kombu import Connection, Consumer, Exchange, Message, Queue

from warehouse import services

logger = structlog.get_logger(__name__)


def broker_url() -> str:
    return str(settings.WAREHOUSE_BROKER_URL)


def _transport_options(url: str) -> dict[str, Any]:
    if not url.startswith("filesystem"):
        return {}
    folder = Path(settings.WAREHOUSE_QUEUE_DIR)
    (folder / "processed").mkdir(parents=True, exist_ok=True)
    (folder / "control").mkdir(parents=True, exist_ok=True)
    return {
        "control_folder": str(folder / "control"),
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "store_processed": False,
        "polling_interval": 0.05,
    }


def connection_open(url: str | None = None) -> Connection:
    url = url or broker_url()
    return Connection(url, transport_options=_transport_options(url), connect_timeout=5)


def movement_queue(name: str | None = None) -> Queue:
    name = name or settings.WAREHOUSE_QUEUE
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def envelopes_publish(
    bodies: Iterable[bytes],
    *,
    url: str | None = None,
    queue_name: str | None = None,
    rate: float = 0.0,
) -> int:
    """Publish raw bodies as persistent messages, at most `rate` per second when given;
    returns how many were sent."""
    queue = movement_queue(queue_name)
    sent = 0
    began = time.perf_counter()
    with connection_open(url) as conn:
        channel = conn.channel()
        queue(channel).declare()
        producer = conn.Producer(channel, exchange=queue.exchange, routing_key=queue.routing_key)
        for body in bodies:
            if rate > 0 and (delay := began + sent / rate - time.perf_counter()) > 0:
                time.sleep(delay)
            producer.publish(
                body,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                retry=True,
            )
            sent += 1
    return sent


def consumer_name() -> str:
    return f"{socket.gethostname()}:{settings.WAREHOUSE_QUEUE}"


class MovementConsumer:
    """One batch-committing consumer; `run` returns after `stop` is set and the batch in hand
    has been committed and acked."""

    def __init__(
        self,
        *,
        url: str | None = None,
        queue_name: str | None = None,
        batch_size: int | None = None,
        prefetch: int | None = None,
        linger_ms: int | None = None,
        name: str | None = None,
    ) -> None:
        self.url = url or broker_url()
        self.queue = movement_queue(queue_name)
        self.batch_size = batch_size or settings.WAREHOUSE_BATCH_SIZE
        self.prefetch = max(prefetch or settings.WAREHOUSE_PREFETCH, self.batch_size)
        self.linger = (linger_ms if linger_ms is not None else settings.WAREHOUSE_LINGER_MS) / 1000
        self.name = name or consumer_name()
        self.pending: list[Message] = []
        self.batches = 0
        self.started_at: datetime = timezone.now()
        self._last_beat = 0.0

    def _on_message(self, message: Message) -> None:
        # Raw: decoding is the pipeline's job, so a non-JSON body is dead-lettered, not raised.
        self.pending.append(message)

    def _beat(self) -> None:
        if time.monotonic() - self._last_beat < settings.WAREHOUSE_HEARTBEAT_SECONDS:
            return
        close_old_connections()
        services.consumer_heartbeat_beat(name=self.name, started_at=self.started_at)
        self._last_beat = time.monotonic()

    def _fill(self, conn: Connection, stop: threading.Event) -> None:
        """Wait for messages; once one is here, linger until the batch is full or time is up."""
        deadline: float | None = None
        while len(self.pending) < self.batch_size and not stop.is_set():
            if deadline is None and self.pending:
                deadline = time.monotonic() + self.linger
            if deadline is None:
                timeout = 0.5
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return
            try:
                conn.drain_events(timeout=timeout)
            except TimeoutError:
                if deadline is None:
                    return

    def _commit(self, batch: list[Message]) -> None:
        bodies = [message.body for message in batch]
        close_old_connections()
        try:
            services.movements_ingest(bodies=bodies)
        except Exception as exc:
            if services._database_unavailable(exc):
                raise
            logger.exception("warehouse_batch_failed_retrying_singly", size=len(batch))
            services.movements_ingest_each(bodies=bodies)
        pause_marker = settings.WAREHOUSE_TEST_PAUSE_AFTER_COMMIT
        if pause_marker:
            Path(pause_marker).write_text(str(os.getpid()))
            time.sleep(60)
        if self._multi_ack:
            batch[-1].ack(multiple=True)
        else:
            for message in batch:
                message.ack()
        self.batches += 1

    @property
    def _multi_ack(self) -> bool:
        return self.url.startswith(("amqp", "pyamqp"))

    def run_blocking(self, stop: threading.Event) -> None:
        logger.info("warehouse_consumer_started", queue=self.queue.name, name=self.name)
        try:
            while not stop.is_set():
                try:
                    self._session(stop)
                except Exception as exc:
                    if stop.is_set():
                        break
                    logger.warning("warehouse_consumer_reconnecting", error=repr(exc))
                    self.pending.clear()
                    stop.wait(1.0)
        finally:
            close_old_connections()
            try:
                services.consumer_heartbeat_clear(name=self.name)
            except Exception:
                logger.warning("warehouse_heartbeat_clear_failed")
            close_old_connections()
            logger.info("warehouse_consumer_stopped", batches=self.batches)

    def _session(self, stop: threading.Event) -> None:
        with connection_open(self.url) as conn:
            channel = conn.channel()
            consumer = Consumer(channel, queues=[self.queue], on_message=self._on_message)
            consumer.qos(prefetch_count=self.prefetch)
            with consumer:
                while True:
                    self._beat()
                    self._fill(conn, stop)
                    while self.pending:
                        batch = self.pending[: self.batch_size]
                        del self.pending[: self.batch_size]
                        self._commit(batch)
                    if stop.is_set():
                        return


async def consumer_run(stop: asyncio.Event, consumer: MovementConsumer | None = None) -> None:
    """The coroutine both `run_warehouse_consumer` and `runall` run: the blocking kombu loop in
    a worker thread, stopped through a thread event when `stop` is set."""
    consumer = consumer or MovementConsumer()
    halt = threading.Event()

    async def relay() -> None:
        await stop.wait()
        halt.set()

    relay_task = asyncio.create_task(relay())
    try:
        await sync_to_async(consumer.run_blocking, thread_sensitive=False)(halt)
    finally:
        halt.set()
        relay_task.cancel()
