"""The TCP servers' leases (which server process owns which live sessions) and the cleanup of
sessions whose server is gone: at a server's own restart (`server_sessions_recover`) and for
any server whose lease expired (`server_leases_reap`, from every server and the beat task)."""

import uuid
from datetime import timedelta

import structlog
from django.db import transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, OuterRef, Q
from django.db.models.functions import Now
from django.utils import timezone

from vmcontrol.models import (
    AgentSession,
    AuditEvent,
    ServerLease,
    SessionEndReason,
    VirtualMachine,
    VmStatus,
)
from vmcontrol.services.vms import StatusChange, status_changes_publish

logger = structlog.get_logger(__name__)


def _sessions_close(open_ids: list[uuid.UUID], reason: str) -> tuple[int, list[int]]:
    """End the given open sessions with `reason` and take the VMs they held offline; returns
    how many were closed and the ids of those VMs."""
    if not open_ids:
        return 0, []
    closed = AgentSession.objects.filter(pk__in=open_ids, ended_at__isnull=True).update(
        ended_at=timezone.now(), end_reason=reason
    )
    stale = Q(current_session_id__in=open_ids) & ~Q(status=VmStatus.OFFLINE)
    vm_ids = list(VirtualMachine.objects.filter(stale).values_list("pk", flat=True))
    VirtualMachine.objects.filter(pk__in=vm_ids, current_session_id__in=open_ids).update(
        status=VmStatus.OFFLINE, current_session_id=None
    )
    return closed, vm_ids


@transaction.atomic
def server_sessions_recover(*, server_name: str) -> tuple[int, list[StatusChange]]:
    """At server start: close sessions a killed predecessor of the same `server_name` left
    open (`server_crashed`) and take its VMs offline, with an audit row. Returns how many
    sessions were closed and the status changes (for the caller to publish). Idempotent:
    a second call finds nothing open. Call before `server_lease_acquire`."""
    open_ids = list(
        AgentSession.objects.filter(server_name=server_name, ended_at__isnull=True).values_list(
            "pk", flat=True
        )
    )
    closed, vm_ids = _sessions_close(open_ids, SessionEndReason.SERVER_CRASHED)
    if not closed:
        return 0, []
    AuditEvent.objects.create(
        action="server.sessions_recovered", details={"server": server_name, "sessions": closed}
    )
    return closed, [{"vm_id": vm_id, "status": VmStatus.OFFLINE} for vm_id in vm_ids]


def _lease_expiry(ttl: float) -> ExpressionWrapper:
    # The database's clock on both sides (here and in selectors), so hosts' clocks never matter.
    return ExpressionWrapper(Now() + timedelta(seconds=ttl), output_field=DateTimeField())


@transaction.atomic
def server_lease_acquire(*, server_name: str, ttl: float, host: str = "", pid: int = 0) -> None:
    """Claim the lease `server_name` for `ttl` seconds of the database's clock (taking over a
    predecessor's row; `host`, `pid` are for operators). Idempotent (an upsert). Called at
    server start, after `server_sessions_recover` and before accepting agents."""
    now = timezone.now()
    ServerLease.objects.bulk_create(
        [
            ServerLease(
                name=server_name,
                host=host[:255],
                pid=pid,
                started_at=now,
                renewed_at=now,
                expires_at=now,
            )
        ],
        ignore_conflicts=True,
    )
    ServerLease.objects.filter(name=server_name).update(
        host=host[:255], pid=pid, started_at=Now(), renewed_at=Now(), expires_at=_lease_expiry(ttl)
    )


def server_lease_renew(*, server_name: str, ttl: float) -> bool:
    """Extend the lease by `ttl` seconds from now. False when the row is gone: another process
    reaped it after it expired (this server stalled or lost the database for longer than
    `ttl`), so the sessions it holds were closed and the caller must drop them. One
    conditional UPDATE; idempotent."""
    return bool(
        ServerLease.objects.filter(name=server_name).update(
            renewed_at=Now(), expires_at=_lease_expiry(ttl)
        )
    )


def server_lease_release(*, server_name: str) -> None:
    """Clean stop: the server ended every session, its lease goes. A lease under which
    sessions are still open (their end could not be written, or another process runs under
    the same name) stays, to expire and be reaped. Idempotent."""
    still_open = AgentSession.objects.filter(server_name=OuterRef("name"), ended_at__isnull=True)
    ServerLease.objects.filter(name=server_name).exclude(Exists(still_open)).delete()


@transaction.atomic
def server_leases_reap(
    *, keep: str = "", publish_changes: bool = False
) -> tuple[int, list[StatusChange]]:
    """Close the open sessions of every server whose lease expired (killed, frozen or cut off
    from the database) or that holds no lease at all, take their VMs offline and delete the
    expired leases. `keep` is the caller's own server name, never reaped. Safe to run from
    many processes at once (expired leases are claimed with SKIP LOCKED). Returns how many
    sessions were closed and the status changes (published after commit when
    `publish_changes`). Idempotent: what is reaped is gone for the next caller."""
    dead = list(
        ServerLease.objects.select_for_update(skip_locked=True)
        .filter(expires_at__lte=Now())
        .exclude(name=keep)
        .values_list("name", flat=True)
    )
    orphaned = ~Q(server_name__in=ServerLease.objects.values("name"))
    open_sessions = (
        AgentSession.objects.filter(ended_at__isnull=True)
        .filter(Q(server_name__in=dead) | orphaned)
        .exclude(server_name=keep)
    )
    servers = sorted(set(open_sessions.values_list("server_name", flat=True)))
    open_ids = list(open_sessions.values_list("pk", flat=True))
    if dead:
        ServerLease.objects.filter(name__in=dead, expires_at__lte=Now()).delete()
    closed, vm_ids = _sessions_close(open_ids, SessionEndReason.SERVER_LOST)
    if not closed:
        return 0, []
    AuditEvent.objects.create(
        action="server.sessions_reaped", details={"servers": servers, "sessions": closed}
    )
    logger.warning("vmcontrol_sessions_reaped", servers=servers, sessions=closed, vms=len(vm_ids))
    changes: list[StatusChange] = [{"vm_id": vm_id, "status": VmStatus.OFFLINE} for vm_id in vm_ids]
    if publish_changes:
        transaction.on_commit(lambda: status_changes_publish(changes))
    return closed, changes
