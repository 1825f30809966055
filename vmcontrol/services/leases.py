"""The TCP servers' leases (which server process owns which live sessions) and the cleanup of
sessions whose server is gone: at a server's own restart (`server_sessions_recover`) and for
any server whose lease expired (`server_leases_reap`, from every server and the beat task).

A lease is held by one process, named by its row's (`host`, `pid`): a second live process
asking for the same server name is told who holds it (`server_lease_acquire`) and must not
serve under it, since both would close and reap each other's sessions (`LeaseHeld`)."""

import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from django.db import transaction
from django.db.models import BooleanField, DateTimeField, Exists, ExpressionWrapper, OuterRef, Q
from django.db.models.functions import Now
from django.utils import timezone

from common.exceptions import Conflict
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


class LeaseHeld(Conflict):
    """Another live process serves under this server name (it renewed the lease while this
    one waited for it to lapse): two copies must not share a name."""

    code = "lease_held"
    default_message = "Another live process holds this server name's lease."


@dataclass(frozen=True)
class LeaseHolder:
    """The process holding a lease that `server_lease_acquire` could not take."""

    host: str
    pid: int
    renewed_at: datetime
    """changes at each renewal: a holder seen renewing is alive"""
    expires_at: datetime


def _process_gone(*, host: str, pid: int, own_host: str, own_pid: int) -> bool:
    """The holder is provably not running: a process of this host that no longer exists, or
    this process's own pid (a restarted container gets its predecessor's pid). A holder on
    another host cannot be checked from here."""
    if host != own_host:
        return False
    if pid == own_pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@transaction.atomic
def server_lease_acquire(
    *, server_name: str, ttl: float, host: str, pid: int
) -> LeaseHolder | None:
    """Claim the lease `server_name` for `ttl` seconds of the database's clock for the process
    (`host`, `pid`). Returns None when claimed: the name was free, its lease had expired, or
    its holder is provably gone (a killed predecessor on this host). Otherwise nothing changes
    and the holder is returned: it may be alive (another copy under the same name) or a
    predecessor on another host; the caller waits for its lease to lapse or to be renewed
    (`ServerState.lease_acquire`). Locks the lease row; idempotent for its holder. Called at
    server start before `server_sessions_recover` and before accepting agents."""
    host = host[:255]
    current = None
    while current is None:
        # A reaper may delete the expired row while this waits for its lock: insert again.
        now = timezone.now()
        ServerLease.objects.bulk_create(
            [
                ServerLease(
                    name=server_name,
                    host=host,
                    pid=pid,
                    started_at=now,
                    renewed_at=now,
                    expires_at=now,
                )
            ],
            ignore_conflicts=True,
        )
        current = (
            ServerLease.objects.select_for_update()
            .filter(name=server_name)
            .annotate(
                expired=ExpressionWrapper(Q(expires_at__lte=Now()), output_field=BooleanField())
            )
            .first()
        )
    ours = (current.host, current.pid) == (host, pid)
    if not (
        ours
        or current.expired
        or _process_gone(host=current.host, pid=current.pid, own_host=host, own_pid=pid)
    ):
        return LeaseHolder(
            host=current.host,
            pid=current.pid,
            renewed_at=current.renewed_at,
            expires_at=current.expires_at,
        )
    ServerLease.objects.filter(name=server_name).update(
        host=host, pid=pid, started_at=Now(), renewed_at=Now(), expires_at=_lease_expiry(ttl)
    )
    return None


def server_lease_renew(*, server_name: str, ttl: float, host: str, pid: int) -> bool:
    """Extend the lease by `ttl` seconds from now, if the process (`host`, `pid`) still holds
    it. False when it does not: another process reaped the row after it expired (this server
    stalled or lost the database for longer than `ttl`), so the sessions it holds were closed,
    or another process took the name over since; the caller must drop its sessions. One
    conditional UPDATE; idempotent."""
    return bool(
        ServerLease.objects.filter(name=server_name, host=host[:255], pid=pid).update(
            renewed_at=Now(), expires_at=_lease_expiry(ttl)
        )
    )


def server_lease_release(*, server_name: str, host: str, pid: int) -> None:
    """Clean stop of the process (`host`, `pid`): the server ended every session, its lease
    goes. A lease under which sessions are still open (their end could not be written) stays,
    to expire and be reaped; a lease another process holds is not touched. Idempotent."""
    still_open = AgentSession.objects.filter(server_name=OuterRef("name"), ended_at__isnull=True)
    ServerLease.objects.filter(name=server_name, host=host[:255], pid=pid).exclude(
        Exists(still_open)
    ).delete()


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
