"""vmcontrol reads.

A VM's status is owned by its live session: the stored `status` is what the TCP server that
holds the VM's current session last wrote, and it counts only while that server's lease is
alive (`ServerLease`, renewed every third of VMCONTROL_SERVER_LEASE_TTL_SECONDS). Every read here
exposes the *live* status (`live_status`), so a VM whose server was killed shows offline
within VMCONTROL_SERVER_LEASE_TTL_SECONDS even before a reaper has closed its rows.
"""

import uuid
from datetime import datetime
from typing import Any

from django.db.models import (
    Case,
    CharField,
    Count,
    Exists,
    F,
    OuterRef,
    Prefetch,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Now

from common.exceptions import NotFound, ValidationFailed
from vmcontrol.models import (
    AgentSession,
    Command,
    CommandStatus,
    Disk,
    ServerLease,
    VirtualMachine,
    VmStatus,
)

VM_FILTERS = ("connected", "authorized", "ever_connected")


def _held_by_a_live_server() -> Exists:
    live_servers = ServerLease.objects.filter(expires_at__gt=Now()).values("name")
    return Exists(
        AgentSession.objects.filter(
            pk=OuterRef("current_session_id"),
            ended_at__isnull=True,
            server_name__in=live_servers,
        )
    )


def with_live_status(vms: QuerySet[VirtualMachine]) -> QuerySet[Any]:
    """`vms` annotated with `live_status`: the stored status while the VM's current session is
    open on a server whose lease has not expired (database clock), else `offline`."""
    return vms.annotate(
        live_status=Case(
            When(_held_by_a_live_server(), then=F("status")),
            default=Value(VmStatus.OFFLINE),
            output_field=CharField(),
        )
    )


def vm_live_status(*, vm_id: int) -> str:
    """The live status of one VM, a `VmStatus` value (`offline` for an unknown id). One query,
    no locks; raises nothing."""
    status = (
        with_live_status(VirtualMachine.objects.filter(pk=vm_id))
        .values_list("live_status", flat=True)
        .first()
    )
    return str(status or VmStatus.OFFLINE)


def vm_list(*, filter: str | None = None) -> QuerySet[VirtualMachine]:
    """All VMs with `live_status`, or `connected` (a live connection that authorized, logged in
    now or logged out by an operator), `authorized`, or `ever_connected` (authorized at least
    once; survives restarts). Ordered by id, disks prefetched by name (`ram_mb` in MiB, disk
    sizes in GB). Raises ValidationFailed (`bad_filter`) for any other filter."""
    vms = with_live_status(
        VirtualMachine.objects.prefetch_related(
            Prefetch("disks", queryset=Disk.objects.order_by("name"))
        ).order_by("id")
    )
    if filter in (None, ""):
        return vms
    if filter == "connected":
        return vms.filter(live_status__in=[VmStatus.CONNECTED, VmStatus.AUTHORIZED])
    if filter == "authorized":
        return vms.filter(live_status=VmStatus.AUTHORIZED)
    if filter == "ever_connected":
        return vms.filter(first_connected_at__isnull=False)
    raise ValidationFailed(f"filter must be one of {', '.join(VM_FILTERS)}", code="bad_filter")


def vm_get(*, vm_id: int) -> VirtualMachine:
    """One VM as `vm_list` gives it (with `live_status` and its disks). Raises NotFound
    (`vm_not_found`)."""
    try:
        return vm_list().get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"VM {vm_id} does not exist.", code="vm_not_found") from None


def vm_sessions(*, vm_id: int, limit: int = 10) -> list[AgentSession]:
    """The VM's last `limit` session rows, newest first (an unknown VM has none)."""
    return list(AgentSession.objects.filter(vm_id=vm_id).order_by("-started_at")[:limit])


def vm_commands(*, vm_id: int) -> QuerySet[Command]:
    """The VM's commands, newest first (lazy: the caller paginates). Raises NotFound
    (`vm_not_found`)."""
    vm_get(vm_id=vm_id)
    return Command.objects.filter(vm_id=vm_id).order_by("-created_at")


def disk_list() -> QuerySet[Disk]:
    """Every disk with its VM, ordered by VM id then disk name (lazy: the caller paginates)."""
    return Disk.objects.select_related("vm").order_by("vm_id", "name")


# --- the operator console (`vmcontrol.console`) ---------------------------------------------

#: Command statuses the console counts (succeeded ones are history, not work).
CONSOLE_COMMAND_STATUSES = (
    CommandStatus.QUEUED,
    CommandStatus.SENT,
    CommandStatus.FAILED,
    CommandStatus.TIMED_OUT,
)


def console_vm_counts() -> dict[str, int]:
    """VMs by live status: `{"connected": n, "authorized": n, "offline": n}` (disjoint; a VM
    whose server's lease expired is offline). Two queries, no lock: a count of all VMs, and the
    live status of those whose stored status is not offline (`status` index)."""
    total = VirtualMachine.objects.count()
    counts = {VmStatus.CONNECTED.value: 0, VmStatus.AUTHORIZED.value: 0}
    rows = (
        with_live_status(VirtualMachine.objects.exclude(status=VmStatus.OFFLINE))
        .values_list("live_status")
        .annotate(n=Count("id"))
        .order_by()
    )
    for status, n in rows:
        if status in counts:
            counts[status] = n
    return {**counts, VmStatus.OFFLINE.value: total - sum(counts.values())}


def console_command_counts() -> dict[str, int]:
    """Commands in each of `CONSOLE_COMMAND_STATUSES` (all time), `{status: n}` with every
    status present. One GROUP BY over the command table (no status index: commands are
    operator actions, a small table), no lock."""
    counts = dict.fromkeys((str(status) for status in CONSOLE_COMMAND_STATUSES), 0)
    rows = (
        Command.objects.filter(status__in=CONSOLE_COMMAND_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
    )
    for status, n in rows:
        counts[str(status)] = n
    return counts


def console_vms_live(*, limit: int = 20) -> list[VirtualMachine]:
    """Up to `limit` VMs live now (connected or authorized), by id, each with `live_status`
    and `last_seen_at`. One query, no lock."""
    return list(
        with_live_status(VirtualMachine.objects.exclude(status=VmStatus.OFFLINE))
        .filter(live_status__in=[VmStatus.CONNECTED, VmStatus.AUTHORIZED])
        .order_by("id")[:limit]
    )


def console_vms_gone_offline(*, since: datetime, limit: int = 20) -> list[VirtualMachine]:
    """Up to `limit` VMs offline now that were last seen at or after `since` (aware), most
    recently seen first, each annotated with `last_end_reason` (its newest session's
    `end_reason`, "" while that session is open: its server died). One query, no lock."""
    newest_session = AgentSession.objects.filter(vm_id=OuterRef("pk")).order_by("-started_at")
    return list(
        with_live_status(VirtualMachine.objects.filter(last_seen_at__gte=since))
        .filter(live_status=VmStatus.OFFLINE)
        .annotate(last_end_reason=Subquery(newest_session.values("end_reason")[:1]))
        .order_by("-last_seen_at", "-id")[:limit]
    )


def console_commands_failed(*, limit: int = 20) -> list[Command]:
    """Up to `limit` failed or timed-out commands, newest first, with their VM. One query, no
    lock."""
    return list(
        Command.objects.filter(status__in=[CommandStatus.FAILED, CommandStatus.TIMED_OUT])
        .select_related("vm")
        .order_by("-created_at")[:limit]
    )


def command_get(*, command_id: uuid.UUID) -> Command:
    """One command. Raises NotFound (`command_not_found`)."""
    command = Command.objects.filter(pk=command_id).first()
    if command is None:
        raise NotFound(f"Command {command_id} does not exist.", code="command_not_found")
    return command
