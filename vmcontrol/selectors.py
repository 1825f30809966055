"""vmcontrol reads.

A VM's status is owned by its live session: the stored `status` is what the TCP server that
holds the VM's current session last wrote, and it counts only while that server's lease is
alive (`ServerLease`, renewed every third of VMCONTROL_SERVER_LEASE_TTL_SECONDS). Every read here
exposes the *live* status (`live_status`), so a VM whose server was killed shows offline
within VMCONTROL_SERVER_LEASE_TTL_SECONDS even before a reaper has closed its rows.
"""

from typing import Any

from django.db.models import (
    Case,
    CharField,
    Exists,
    F,
    OuterRef,
    Prefetch,
    QuerySet,
    Value,
    When,
)
from django.db.models.functions import Now

from common.exceptions import NotFound, ValidationFailed
from vmcontrol.models import (
    AgentSession,
    Command,
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
