"""What the agent connections of one TCP server process share (`ServerState`): the batched
event writer, the in-memory last-seen map, the liveness watchdog, the failed-attempt limiter
and the server's lease (the row that says this process is alive and owns its sessions).

The server (`vmcontrol.server`) makes one per process and hands it to every connection in
its scope; the consumers only read and call it. Nothing here knows sockets or frames.
"""

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from django.conf import settings
from django.utils import timezone

from common.db import orm_async, orm_call
from realtime.services import apublish
from vmcontrol import services
from vmcontrol.limits import FailureLimiter, Lockout
from vmcontrol.metrics import BATCH_SIZE, LOCKOUTS
from vmcontrol.protocol import RATE_LIMITED
from vmcontrol.services import VMS_TOPIC, AgentEvent, AgentEventResult, StatusChange

logger = structlog.get_logger(__name__)

LIMITER_PRUNE_INTERVAL_SECONDS = 60.0


class Expirable(Protocol):
    """A connection as the watchdog and the lease keeper see it."""

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
    """One server's settings (times in seconds); the defaults come from VMCONTROL_* settings."""

    heartbeat_interval: float = field(
        default_factory=lambda: settings.VMCONTROL_HEARTBEAT_INTERVAL_SECONDS
    )
    missed_heartbeats: int = field(default_factory=lambda: settings.VMCONTROL_MISSED_HEARTBEATS)
    auth_timeout: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_TIMEOUT_SECONDS)
    flush_interval: float = field(
        default_factory=lambda: settings.VMCONTROL_LAST_SEEN_FLUSH_INTERVAL_SECONDS
    )
    server_name: str = field(default_factory=lambda: settings.VMCONTROL_SERVER_NAME)
    """names the sessions and the lease of this process; `{host}` and `{port}` are filled in
    by `server.serve` once the port is bound (empty: `{host}:{port}`, unique among copies and
    stable across restarts)"""
    auth_attempts: int = field(default_factory=lambda: settings.VMCONTROL_AUTH_ATTEMPTS)
    failure_burst: int = field(default_factory=lambda: settings.VMCONTROL_AUTH_FAILURE_BURST)
    failures_per_minute: float = field(
        default_factory=lambda: settings.VMCONTROL_AUTH_FAILURES_PER_MINUTE
    )
    lockout: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_LOCKOUT_SECONDS)
    lockout_max: float = field(default_factory=lambda: settings.VMCONTROL_AUTH_LOCKOUT_MAX_SECONDS)
    lease_ttl: float = field(default_factory=lambda: settings.VMCONTROL_SERVER_LEASE_TTL_SECONDS)
    tls_cert: str = field(default_factory=lambda: settings.VMCONTROL_TLS_CERT)
    tls_key: str = field(default_factory=lambda: settings.VMCONTROL_TLS_KEY)


class ServerState:
    """What the consumers of one server process share. Database writes from connections go
    through one queue and are applied in batches by one thread, so a storm of reconnecting
    agents costs a few statements per batch instead of a thread hop and a transaction each.

    Lifecycle (driven by `server.serve`): `open()` before listening, `start(stop)` once
    listening, `shutdown()` after every connection was told to end."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.host = socket.gethostname()
        self.pid = os.getpid()
        """the lease holder's identity (`services.server_lease_acquire`)"""
        self.connections: dict[uuid.UUID, Expirable] = {}
        self.last_seen: dict[int, datetime] = {}
        self._queue: list[tuple[AgentEvent, asyncio.Future[AgentEventResult] | None]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmcontrol-db")
        self._last_publish: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_stop = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._lease_keeper: asyncio.Task[None] | None = None
        self._lease_stop = asyncio.Event()
        self._server_stop: asyncio.Event | None = None
        self.fatal: Exception | None = None
        """why the server stopped itself (another live process took its name), if it did"""
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

    # Lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Before accepting agents: take this server's lease (waiting for a predecessor's to
        lapse; raises `services.LeaseHeld` when a live process holds the name), then close the
        sessions a killed predecessor of the same name left open and publish their VMs going
        offline. The lease comes first: a second copy started under a name in use must not
        close the live copy's sessions."""
        await self.lease_acquire()
        closed, changes = await self.run_sync(
            services.server_sessions_recover, server_name=self.config.server_name
        )
        if closed:
            logger.info("vmcontrol_sessions_recovered", sessions=closed)
        await self._publish(changes, after=None)

    def start(self, stop: asyncio.Event) -> None:
        """Start the event writer, the lease keeper and the watchdog (which ends with `stop`:
        closing connections are not expired). The lease keeper sets `stop` if another live
        process turns out to hold this server's name."""
        self._server_stop = stop
        self._writer = asyncio.create_task(self.writer(self._writer_stop), name="vmcontrol-writer")
        self._watchdog = asyncio.create_task(self.watchdog(stop), name="vmcontrol-watchdog")
        self._lease_keeper = asyncio.create_task(
            self.lease_keeper(self._lease_stop), name="vmcontrol-lease"
        )

    async def shutdown(self) -> None:
        """After the connections ended: drain the queued writes (the connections' `end` events
        included), stop renewing and release the lease, close the database thread."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._writer_stop.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer, timeout=15)
        self._lease_stop.set()
        if self._lease_keeper is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lease_keeper, timeout=15)
        try:
            await self.lease_release()
        except Exception:
            logger.exception("vmcontrol_lease_release_failed")
        self.close()

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

    async def attempt(self, event: AgentEvent) -> AgentEventResult:
        """Judge an `auth`/`enroll`: refused at once (`rate_limited`, with `retry_after`) while
        its peer is locked out, else applied by the event writer (which checks the limit
        again, in order with every other attempt)."""
        wait = self.limiter.retry_after(event.peer_key)
        if wait > 0:
            return AgentEventResult(ok=False, error=RATE_LIMITED, retry_after=wait)
        return await self.apply(event)

    async def run_sync(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """`fn(**kwargs)` on the event writer's database thread (`common.db.orm_async`)."""
        return await orm_async(fn, executor=self._executor)(**kwargs)

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
        self, changes: list[StatusChange], *, after: "asyncio.Task[None] | None"
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

    def mark_seen(self, vm_id: int) -> None:
        """Note a heartbeat in memory; written with the next last-seen flush."""
        self.last_seen[vm_id] = timezone.now()

    # Liveness -------------------------------------------------------------------------------

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Close authorized connections silent for `missed_heartbeats` intervals and
        unauthorized ones past their deadline (`auth_timeout` after accept or after losing
        their authorization), whatever they send: one loop for all, no timer per socket. A
        deadline is enforced within a quarter of the shorter of the two intervals."""
        heartbeat_window = self.config.heartbeat_interval * self.config.missed_heartbeats
        tick = max(0.02, min(self.config.heartbeat_interval, self.config.auth_timeout) / 4)
        next_prune = time.monotonic() + LIMITER_PRUNE_INTERVAL_SECONDS
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
                next_prune = now + LIMITER_PRUNE_INTERVAL_SECONDS
                self.limiter.prune()

    # Lease ----------------------------------------------------------------------------------

    async def _lease_call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        # Off the event writer's thread: a long batch (a reconnect storm) must not delay the
        # renewal that keeps this server's VMs online.
        return await asyncio.to_thread(orm_call, fn, **kwargs)

    async def lease_acquire(self) -> None:
        """Take this server's lease (`services.server_lease_acquire`). While another process
        holds it, wait (polling every sixth of the TTL, at most a second) until its lease
        lapses; a holder seen renewing it is alive: raises `services.LeaseHeld`."""
        poll = max(0.05, min(1.0, self.config.lease_ttl / 6))
        first_seen: services.LeaseHolder | None = None
        while True:
            holder: services.LeaseHolder | None = await self._lease_call(
                services.server_lease_acquire,
                server_name=self.config.server_name,
                ttl=self.config.lease_ttl,
                host=self.host,
                pid=self.pid,
            )
            if holder is None:
                return
            if first_seen is None:
                first_seen = holder
                logger.warning(
                    "vmcontrol_lease_waiting",
                    server=self.config.server_name,
                    holder=f"{holder.host}:{holder.pid}",
                    expires_at=holder.expires_at.isoformat(),
                )
            elif holder.renewed_at != first_seen.renewed_at or holder.pid != first_seen.pid:
                raise services.LeaseHeld(
                    f"server name {self.config.server_name!r} is in use by the live process "
                    f"{holder.pid} on {holder.host}: give each copy its own "
                    "VMCONTROL_SERVER_NAME (such as {host}:{port})",
                    details={"holder": f"{holder.host}:{holder.pid}"},
                )
            await asyncio.sleep(poll)

    async def lease_release(self) -> None:
        """Give the lease back at a clean stop (`services.server_lease_release`)."""
        await self._lease_call(
            services.server_lease_release,
            server_name=self.config.server_name,
            host=self.host,
            pid=self.pid,
        )

    async def lease_keeper(self, stop: asyncio.Event) -> None:
        """Every third of the lease TTL: renew this server's lease, reap the sessions of
        servers whose lease expired, and time out commands whose waiting process died
        (`services.commands_expire`). A lease found gone (reaped while this process stalled or
        was cut off from the database) means the database already closed this server's
        sessions: the lease is taken again, then the connections are dropped (the agents
        reconnect; retaking first leaves no moment in which a new session could be reaped as
        orphaned). A lease another live process took over stops this server."""
        every = max(0.05, self.config.lease_ttl / 3)
        while not stop.is_set():
            try:
                renewed = await self._lease_call(
                    services.server_lease_renew,
                    server_name=self.config.server_name,
                    ttl=self.config.lease_ttl,
                    host=self.host,
                    pid=self.pid,
                )
                if not renewed:
                    logger.error("vmcontrol_lease_lost", server=self.config.server_name)
                    try:
                        await self.lease_acquire()
                    finally:
                        for connection in list(self.connections.values()):
                            if connection.persisted:
                                await connection.drop("lease_lost")
                _, changes = await self._lease_call(
                    services.server_leases_reap, keep=self.config.server_name
                )
                for change in changes:
                    await apublish(VMS_TOPIC, change)
                await self._lease_call(services.commands_expire)
            except services.LeaseHeld as held:
                logger.critical(
                    "vmcontrol_lease_held_elsewhere",
                    server=self.config.server_name,
                    error=held.message,
                )
                self.fatal = held
                if self._server_stop is not None:
                    self._server_stop.set()
                return
            except Exception:
                logger.exception("vmcontrol_lease_failed", server=self.config.server_name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    def close(self) -> None:
        """Let the database thread go (its queued call, if any, still runs)."""
        self._executor.shutdown(wait=False)
