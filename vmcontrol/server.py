"""The thin asyncio TCP server: each connection becomes an instance of the project's ASGI
application with a `tcp` scope (Channels' ProtocolTypeRouter sends it to the agent consumer).

Messages in (to the application): `tcp.connect`, `tcp.receive {bytes}`, `tcp.disconnect
{reason}`. Messages out: `tcp.send {bytes}`, `tcp.close`. Framing and the protocol itself live in
the consumer; this module also owns the per-process state consumers share: the batched event
writer, the in-memory last-seen map, the liveness watchdog, the failed-attempt limiter and the
server's lease (the row that says this process is alive and owns its sessions).
"""

import asyncio
import contextlib
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from prometheus_client import Counter, Gauge, Histogram

from realtime.services import apublish
from vmcontrol import services
from vmcontrol.limits import FailureLimiter, Lockout
from vmcontrol.protocol import INTERNAL, encode_frame, error_frame
from vmcontrol.services import VMS_TOPIC, AgentEvent, AgentEventResult

logger = structlog.get_logger(__name__)

CONNECTIONS = Gauge("vmcontrol_connections", "Open agent TCP connections")
AUTHORIZED = Gauge("vmcontrol_authorized_connections", "Authorized agent connections")
FRAMES = Counter("vmcontrol_frames_total", "Agent frames received", ["type"])
BATCH_SIZE = Histogram(
    "vmcontrol_event_batch_size", "Agent events per database batch", buckets=(1, 5, 20, 100, 500)
)
UNAUTHENTICATED = Counter(
    "vmcontrol_unauthenticated_sessions_total",
    "Connections that ended without ever authorizing (not stored as session rows)",
    ["reason"],
)
AUTH_REFUSED = Counter(
    "vmcontrol_auth_refused_total",
    "Refused auth/enroll attempts: `failed` credentials, `rate_limited` peers",
    ["kind", "outcome"],
)
LOCKOUTS = Counter("vmcontrol_auth_lockouts_total", "Peers locked out after failed attempts")
LIMITER_PRUNE_INTERVAL = 60.0
MAX_QUEUED_MESSAGES = 64
CRASHED_FRAME = encode_frame(error_frame(INTERNAL, "the server could not serve this connection"))


class Expirable(Protocol):
    last_frame_at: float
    authorized: bool
    auth_deadline: float
    """monotonic time by which an unauthorized connection must authorize (from accept, or
    from losing its authorization)"""
    persisted: bool
    """whether the connection has a session row (it authorized at least once)"""

    async def expire(self, reason: str) -> None: ...

    async def drop(self, reason: str) -> None: ...


@dataclass
class ServerConfig:
    heartbeat_interval: float = field(default_factory=lambda: settings.VMCONTROL_HEARTBEAT_INTERVAL)
    missed_heartbeats: int = field(default_factory=lambda: settings.VMCONTROL_MISSED_HEARTBEATS)
    auth_timeout: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_TIMEOUT)
    flush_interval: float = field(
        default_factory=lambda: settings.VMCONTROL_LAST_SEEN_FLUSH_INTERVAL
    )
    server_name: str = field(default_factory=lambda: settings.VMCONTROL_SERVER_NAME)
    auth_attempts: int = field(default_factory=lambda: settings.VMCONTROL_AUTH_ATTEMPTS)
    failure_burst: int = field(default_factory=lambda: settings.VMCONTROL_AUTH_FAILURE_BURST)
    failures_per_minute: float = field(
        default_factory=lambda: settings.VMCONTROL_AUTH_FAILURES_PER_MINUTE
    )
    lockout: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_LOCKOUT)
    lockout_max: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_LOCKOUT_MAX)
    lease_ttl: float = field(default_factory=lambda: settings.VMCONTROL_SERVER_LEASE_TTL)
    tls_cert: str = field(default_factory=lambda: settings.VMCONTROL_TLS_CERT)
    tls_key: str = field(default_factory=lambda: settings.VMCONTROL_TLS_KEY)


class ServerState:
    """What the consumers of one server process share. Database writes from connections go
    through one queue and are applied in batches by one thread, so a storm of reconnecting
    agents costs a few statements per batch instead of a thread hop and a transaction each."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.connections: dict[uuid.UUID, Expirable] = {}
        self.last_seen: dict[int, datetime] = {}
        self._queue: list[tuple[AgentEvent, asyncio.Future[AgentEventResult] | None]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmcontrol-db")
        self._last_publish: asyncio.Task[None] | None = None
        self.limiter = FailureLimiter(
            burst=config.failure_burst,
            per_minute=config.failures_per_minute,
            lockout=config.lockout,
            lockout_max=config.lockout_max,
            on_lockout=self._locked_out,
        )

    @staticmethod
    def _locked_out(lockout: Lockout) -> None:
        LOCKOUTS.inc()
        logger.warning(
            "vmcontrol_auth_locked_out",
            peer=lockout.key,
            seconds=round(lockout.seconds, 1),
            lockouts_in_a_row=lockout.strikes,
        )

    # Event writer ---------------------------------------------------------------------------

    @property
    def queued_events(self) -> int:
        """Events waiting for the next batch (not counting the batch being committed)."""
        return len(self._queue)

    def submit(self, event: AgentEvent) -> None:
        """Queue an event whose outcome nobody waits for (end)."""
        self._queue.append((event, None))
        self._wakeup.set()

    async def apply(self, event: AgentEvent) -> AgentEventResult:
        """Queue an event and wait until its batch is committed."""
        future: asyncio.Future[AgentEventResult] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        self._wakeup.set()
        return await future

    async def run_sync(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        def call() -> Any:
            close_old_connections()
            try:
                return fn(**kwargs)
            finally:
                close_old_connections()

        return await sync_to_async(call, thread_sensitive=False, executor=self._executor)()

    async def _flush_events(self) -> None:
        """Apply the queued events as one batch; a poison event fails alone (its waiter gets
        its exception, a fire-and-forget one is logged) and the rest are applied and answered
        (`services.agent_events_apply_isolated`)."""
        batch, self._queue = self._queue, []
        if not batch:
            return
        BATCH_SIZE.observe(len(batch))
        try:
            outcomes, changes = await self.run_sync(
                services.agent_events_apply_isolated,
                server_name=self.config.server_name,
                events=[event for event, _ in batch],
                limiter=self.limiter,
            )
        except Exception as error:
            # Not a database answer (those are per event): the worker thread itself failed.
            logger.exception("vmcontrol_event_batch_failed", size=len(batch))
            outcomes, changes = [error] * len(batch), []
        for (event, future), outcome in zip(batch, outcomes, strict=True):
            if future is not None:
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            elif isinstance(outcome, Exception):
                logger.error(
                    "vmcontrol_event_failed",
                    kind=event.kind,
                    session_id=str(event.session_id),
                    vm_id=event.vm_id,
                    exc_info=outcome,
                )
        if changes:
            # Notifications must not hold up the next batch (a storm makes thousands); each
            # batch's publisher waits for the previous one so a VM's changes stay in order.
            self._last_publish = asyncio.create_task(
                self._publish(changes, after=self._last_publish)
            )

    async def _publish(
        self, changes: list[dict[str, Any]], *, after: "asyncio.Task[None] | None"
    ) -> None:
        if after is not None:
            await asyncio.wait([after])
        for change in changes:
            await apublish(VMS_TOPIC, change)

    async def _flush_last_seen(self) -> None:
        seen, self.last_seen = self.last_seen, {}
        if seen:
            try:
                await self.run_sync(services.last_seen_flush, seen=seen)
            except Exception:
                logger.exception("vmcontrol_last_seen_flush_failed", size=len(seen))

    async def writer(self, stop: asyncio.Event) -> None:
        """Apply queued events as they come (batches form while the previous one commits) and
        last-seen times every flush interval; drains everything after `stop`."""
        next_seen_flush = time.monotonic() + self.config.flush_interval
        while not stop.is_set() or self._queue:
            if not self._queue:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=0.5)
            await self._flush_events()
            if time.monotonic() >= next_seen_flush:
                next_seen_flush = time.monotonic() + self.config.flush_interval
                await self._flush_last_seen()
        await self._flush_last_seen()
        if self._last_publish is not None:
            await asyncio.wait([self._last_publish], timeout=10)

    # Liveness -------------------------------------------------------------------------------

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Close authorized connections silent for `missed_heartbeats` intervals and
        unauthorized ones past their deadline (`auth_timeout` after accept or after losing
        their authorization), whatever they send: one loop for all, no timer per socket. A
        deadline is enforced within a quarter of the shorter of the two intervals."""
        heartbeat_window = self.config.heartbeat_interval * self.config.missed_heartbeats
        tick = max(0.02, min(self.config.heartbeat_interval, self.config.auth_timeout) / 4)
        next_prune = time.monotonic() + LIMITER_PRUNE_INTERVAL
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick)
                return
            now = time.monotonic()
            for connection in list(self.connections.values()):
                try:
                    if connection.authorized:
                        if now - connection.last_frame_at > heartbeat_window:
                            await connection.expire("heartbeat_timeout")
                    elif now > connection.auth_deadline:
                        await connection.expire("auth_timeout")
                except Exception:
                    # One connection failing to expire must not stop liveness for the rest.
                    logger.exception("vmcontrol_expire_failed")
            if now >= next_prune:
                next_prune = now + LIMITER_PRUNE_INTERVAL
                self.limiter.prune()

    # Lease ----------------------------------------------------------------------------------

    async def _lease_call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        # Off the event writer's thread: a long batch (a reconnect storm) must not delay the
        # renewal that keeps this server's VMs online.
        def call() -> Any:
            close_old_connections()
            try:
                return fn(**kwargs)
            finally:
                close_old_connections()

        return await asyncio.to_thread(call)

    async def lease_acquire(self) -> None:
        await self._lease_call(
            services.server_lease_acquire,
            server_name=self.config.server_name,
            ttl=self.config.lease_ttl,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    async def lease_release(self) -> None:
        await self._lease_call(services.server_lease_release, server_name=self.config.server_name)

    async def lease_keeper(self, stop: asyncio.Event) -> None:
        """Every third of the lease TTL: renew this server's lease and reap the sessions of
        servers whose lease expired. A lease found gone (reaped while this process stalled or
        was cut off from the database) means the database already closed this server's
        sessions: their connections are dropped (the agents reconnect) and the lease is taken
        again."""
        every = max(0.05, self.config.lease_ttl / 3)
        while not stop.is_set():
            try:
                renewed = await self._lease_call(
                    services.server_lease_renew,
                    server_name=self.config.server_name,
                    ttl=self.config.lease_ttl,
                )
                if not renewed:
                    logger.error("vmcontrol_lease_lost", server=self.config.server_name)
                    for connection in list(self.connections.values()):
                        if connection.persisted:
                            await connection.drop("lease_lost")
                    await self.lease_acquire()
                _, changes = await self._lease_call(
                    services.server_leases_reap, keep=self.config.server_name
                )
                for change in changes:
                    await apublish(VMS_TOPIC, change)
            except Exception:
                logger.exception("vmcontrol_lease_failed", server=self.config.server_name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    def mark_seen(self, vm_id: int) -> None:
        self.last_seen[vm_id] = timezone.now()

    def close(self) -> None:
        self._executor.shutdown(wait=False)


ASGIApp = Callable[..., Any]


class _TcpConnection(asyncio.Protocol):
    """Bridges one socket to one application instance (the agent consumer)."""

    def __init__(self, app: ASGIApp, state: ServerState, instances: set["_TcpConnection"]):
        # Made by the server at accept, before a TLS handshake: the authorization deadline
        # counts from here.
        self.accepted_at = time.monotonic()
        self.accepted_wall = timezone.now()
        self.app = app
        self.state = state
        self.instances = instances
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        sockname = transport.get_extra_info("sockname") or ("", 0)
        scope = {
            "type": "tcp",
            "client": [str(peer[0]), int(peer[1])],
            "server": [str(sockname[0]), int(sockname[1])],
            "vmcontrol.state": self.state,
            "vmcontrol.accepted_at": self.accepted_at,
            "vmcontrol.accepted_wall": self.accepted_wall,
        }
        self.queue.put_nowait({"type": "tcp.connect"})
        self.instances.add(self)
        CONNECTIONS.inc()
        self.task = asyncio.get_running_loop().create_task(
            self._run(scope), name="vmcontrol-connection"
        )

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:
            # The consumer answers and logs what happens inside a frame; this is the application
            # itself failing (no channel layer at connect): tell the agent, then close.
            logger.exception("vmcontrol_consumer_crashed", client=scope["client"])
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(CRASHED_FRAME)
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            self.instances.discard(self)

    async def _receive(self) -> dict[str, Any]:
        message = await self.queue.get()
        if self.paused and self.queue.qsize() < MAX_QUEUED_MESSAGES // 2 and self.transport:
            self.paused = False
            self.transport.resume_reading()
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if message["type"] == "tcp.send":
            self.transport.write(message["bytes"])
        elif message["type"] == "tcp.close":
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait({"type": "tcp.receive", "bytes": data})
        if self.queue.qsize() >= MAX_QUEUED_MESSAGES and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnect("closed")

    def disconnect(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        CONNECTIONS.dec()
        self.queue.put_nowait({"type": "tcp.disconnect", "reason": reason})
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context when a certificate is configured (TLS 1.2 or later), else
    None (plaintext). A missing or unreadable certificate or key fails the start loudly."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key or None)
    return context


async def serve(
    stop: asyncio.Event,
    *,
    host: str | None = None,
    port: int | None = None,
    config: ServerConfig | None = None,
    started: Callable[[int], None] | None = None,
    app: ASGIApp | None = None,
) -> None:
    """Run the agent server until `stop` is set; `started(port)` is called once listening.

    At start, sessions a killed predecessor (same VMCONTROL_SERVER_NAME) left open are closed
    and the server's lease is taken (then renewed every third of its TTL; see
    `ServerState.lease_keeper`). On stop every connection ends with reason `server_shutdown`,
    queued writes are drained and the lease is released. With a TLS certificate the handshake
    counts against the authorization deadline (`ssl_handshake_timeout` = `auth_timeout`).
    """
    if app is None:
        from config.asgi import application

        app = application
    state = ServerState(config or ServerConfig())
    tls = tls_context(state.config)
    closed, changes = await state.run_sync(
        services.server_sessions_recover, server_name=state.config.server_name
    )
    if closed:
        logger.info("vmcontrol_sessions_recovered", sessions=closed)
    for change in changes:
        await apublish(VMS_TOPIC, change)
    await state.lease_acquire()
    instances: set[_TcpConnection] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _TcpConnection(app, state, instances),
        host=settings.BIND_HOST if host is None else host,
        port=settings.VMCONTROL_PORT if port is None else port,
        ssl=tls,
        ssl_handshake_timeout=state.config.auth_timeout if tls is not None else None,
        backlog=4096,
        reuse_address=True,
    )
    bound_port = int(server.sockets[0].getsockname()[1])
    logger.info("vmcontrol_server_listening", port=bound_port, tls=tls is not None)
    writer_stop = asyncio.Event()
    writer = asyncio.create_task(state.writer(writer_stop), name="vmcontrol-writer")
    watchdog = asyncio.create_task(state.watchdog(stop), name="vmcontrol-watchdog")
    lease_stop = asyncio.Event()
    lease = asyncio.create_task(state.lease_keeper(lease_stop), name="vmcontrol-lease")
    if started is not None:
        started(bound_port)
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(instances):
            connection.disconnect("server_shutdown")
        tasks = [c.task for c in instances if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        watchdog.cancel()
        writer_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, timeout=15)
        lease_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(lease, timeout=15)
        try:
            await state.lease_release()
        except Exception:
            logger.exception("vmcontrol_lease_release_failed")
        state.close()
        logger.info("vmcontrol_server_stopped")
