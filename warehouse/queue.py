"""The movement queue: kombu on the Celery broker's RabbitMQ, or kombu's `filesystem://`
transport under var/ in embedded mode (so a producer in another terminal reaches `make run`
without any service, through the same code path).

The consumer takes up to `batch_size` messages (waiting at most `linger` for a batch to fill),
runs them through `movements_ingest_isolated` in one transaction (message by message if the
batch fails) and acks them only after the commit (one multiple-ack per batch on AMQP). The
commit runs in a worker thread while the consumer thread receives and validates the next batch
(`services.movements_parse`; at most one batch in flight, batches committed in order), so the
broker's socket, the validation and the database are busy at the same time. AMQP is kombu's and
py-amqp's: receiving costs about a fifth of the consumer's CPU per message, and a hand-written
frame parser measured faster but is protocol code a maintained library should own. A crash
between commit and ack redelivers the batch; each message's key (`schemas.message_key`: its
`message_id` and body) finds the ledger row, duplicate record or dead letter it already
produced, so the redelivery changes nothing.

Any number of consumers (`run_warehouse_consumer` processes, on one host or many) can drain one
queue: the broker spreads the messages and each unacked batch goes back to the others when its
consumer dies. They share only the database and the cache: copies of one event reaching two of
them at once are settled by the ingest (`services.ingest`, one stored row, the rest counted as
repeats) and the read cache keeps the newest committed value whatever order their after-commit
writes land in (`read_cache`). Each consumer commits its own batches in order; there is no
order between consumers, and none is needed.
"""

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.utils import timezone
from kombu import Connection, Consumer, Exchange, Message, Queue
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

from common.db import orm_call
from warehouse import read_cache, services
from warehouse.schemas import message_key

logger = structlog.get_logger(__name__)


def broker_url() -> str:
    return str(settings.WAREHOUSE_BROKER_URL)


_BINDING = threading.Lock()


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel with files that are never seen half-written and bindings
    that are on disk before anyone in the process relies on them.

    kombu creates a message file, and a missing exchange table, by opening it (the table with
    truncation) and only then locking and writing it, while readers take no lock (messages) or
    lock only after opening (tables). A consumer in another thread or process that gets there
    in that window reads an empty file: JSONDecodeError, and the message is lost or routed
    nowhere. Here both are written aside and moved into place in one step.

    kombu also records a binding in process-wide state before writing it to the table; a second
    thread that finds the record skips its own bind and may publish while the table is not
    written yet (the message goes nowhere). Bindings are therefore declared one at a time."""

    def queue_bind(self, *args: Any, **kwargs: Any) -> Any:
        with _BINDING:
            return super().queue_bind(*args, **kwargs)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        table = self._exchange_file(exchange)
        if not table.exists():
            self.control_folder.mkdir(exist_ok=True)
            binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
            # A table created meanwhile by someone else wins; kombu then adds our binding to it
            # under its lock.
            with contextlib.suppress(FileExistsError):
                _write_atomically(table, dumps([binding]).encode(), replace=False)
        super()._queue_bind(exchange, routing_key, pattern, queue)

    # kombu's two base classes disagree on this signature; this is the filesystem channel's.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's file name (FIFO by the millisecond stamp); the aside name does not end in
        # `.<queue>.msg`, so no reader picks it up before it is complete.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        try:
            _write_atomically(
                Path(self.data_folder_out) / name, dumps(payload).encode(), replace=True
            )
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


def _write_atomically(path: Path, content: bytes, *, replace: bool) -> None:
    """Write `content` to `path` in one step: into a hidden file beside it, then renamed over
    it (`replace`) or hard-linked to it only if absent (FileExistsError otherwise)."""
    descriptor, aside = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
        if replace:
            os.replace(aside, path)
        else:
            os.link(aside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)


class AtomicFilesystemTransport(filesystem.Transport):
    """The `filesystem://` transport of the embedded mode (see `_AtomicFilesystemChannel`)."""

    Channel = _AtomicFilesystemChannel


class Delivery(NamedTuple):
    """One received message: its raw body, the broker's `message_id` property (None when
    absent) and the kombu message (acked after commit)."""

    body: bytes
    message_id: str | None
    message: Message


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
    transport: Any = None
    if url.startswith("filesystem"):
        transport = AtomicFilesystemTransport
    return Connection(
        url, transport=transport, transport_options=_transport_options(url), connect_timeout=5
    )


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
    returns how many were sent. Each message gets its own `message_id` (the consumer's
    redelivery key), so publishing the same body twice makes two messages: a real duplicate."""
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
                message_id=uuid.uuid4().hex,
                retry=True,
            )
            sent += 1
    return sent


def consumer_name_prefix() -> str:
    """What the default names of this host's consumers of the configured queue start with."""
    return f"{socket.gethostname()}:{settings.WAREHOUSE_QUEUE}:"


def consumer_name() -> str:
    """The default heartbeat name, `host:queue:pid`: one per copy, so copies on one host do not
    share (and clear) one heartbeat."""
    return f"{consumer_name_prefix()}{os.getpid()}"


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
        # Only default names carry a pid to check; a given name is the operator's to manage.
        self._siblings = consumer_name_prefix() if name is None else None
        self.pending: list[Delivery] = []
        self.batches = 0
        self.started_at: datetime = timezone.now()
        self._last_beat = 0.0

    def _on_message(self, message: Message) -> None:
        # Raw: decoding is the pipeline's job, so a non-JSON body is dead-lettered, not raised.
        self.pending.append(Delivery(message.body, message.properties.get("message_id"), message))

    def _beat(self) -> None:
        if time.monotonic() - self._last_beat < settings.WAREHOUSE_HEARTBEAT_SECONDS:
            return
        orm_call(services.consumer_heartbeat_beat, name=self.name, started_at=self.started_at)
        if self._siblings is not None:
            # A copy killed on this host left its heartbeat behind; its restart has a new pid.
            orm_call(services.consumer_heartbeats_prune, prefix=self._siblings)
        # Entries an outage kept stale are invalidated once the cache is back, even when no
        # batch arrives to do it.
        read_cache.write_through_resync()
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

    @staticmethod
    def _prepare(batch: list[Delivery]) -> dict[str, Any]:
        """The batch's bodies, message keys and validation (pure, no database), done in the
        receiving thread while the previous batch commits."""
        bodies = [delivery.body for delivery in batch]
        return {
            "bodies": bodies,
            "keys": [message_key(delivery.body, delivery.message_id) for delivery in batch],
            "parsed": services.movements_parse(bodies),
        }

    @staticmethod
    def _ingest(prepared: dict[str, Any]) -> None:
        orm_call(services.movements_ingest_isolated, **prepared)

    def _settle(self, in_flight: tuple["Future[None]", list[Delivery]] | None) -> None:
        """Wait for the batch in flight to commit (its failure is raised here), then ack it."""
        if in_flight is None:
            return
        future, batch = in_flight
        future.result()
        self._ack(batch)
        self.batches += 1

    def _ack(self, batch: list[Delivery]) -> None:
        """Ack the batch: one multiple-ack of its last tag on AMQP (the batches are acked in
        delivery order), each message on the filesystem transport."""
        if self._multi_ack:
            batch[-1].message.ack(multiple=True)
        else:
            for delivery in batch:
                delivery.message.ack()

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
            try:
                orm_call(services.consumer_heartbeat_clear, name=self.name)
            except Exception:
                logger.warning("warehouse_heartbeat_clear_failed")
            logger.info("warehouse_consumer_stopped", batches=self.batches)

    def _session(self, stop: threading.Event) -> None:
        with (
            connection_open(self.url) as conn,
            ThreadPoolExecutor(1, thread_name_prefix="warehouse-commit") as committer,
        ):
            channel = conn.channel()
            consumer = Consumer(channel, queues=[self.queue], on_message=self._on_message)
            consumer.qos(prefetch_count=self.prefetch)
            in_flight: tuple[Future[None], list[Delivery]] | None = None
            try:
                with consumer:
                    while True:
                        self._beat()
                        self._fill(conn, stop)
                        if not self.pending:  # idle: the batch in flight is acked now
                            self._settle(in_flight)
                            in_flight = None
                        while self.pending:
                            batch = self.pending[: self.batch_size]
                            del self.pending[: self.batch_size]
                            prepared = self._prepare(batch)
                            self._settle(in_flight)
                            in_flight = None
                            in_flight = (committer.submit(self._ingest, prepared), batch)
                        if stop.is_set():
                            self._settle(in_flight)
                            return
            finally:
                # A failure leaves the batch in flight unacked: it comes back on reconnect. The
                # worker thread's database connection goes with the thread.
                with contextlib.suppress(Exception):
                    committer.submit(connections.close_all).result()


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
