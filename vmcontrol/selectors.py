"""vmcontrol reads."""

from django.db.models import Prefetch, QuerySet

from common.exceptions import NotFound, ValidationFailed
from vmcontrol.models import AgentSession, AuditEvent, Command, Disk, VirtualMachine, VmStatus

VM_FILTERS = ("connected", "authorized", "ever_connected")


def vm_list(*, filter: str | None = None) -> QuerySet[VirtualMachine]:
    """All VMs, or `connected` (a live connection, authorized or not), `authorized`, or
    `ever_connected` (connected at least once; survives restarts)."""
    vms = VirtualMachine.objects.prefetch_related(
        Prefetch("disks", queryset=Disk.objects.order_by("name"))
    ).order_by("id")
    if filter in (None, ""):
        return vms
    if filter == "connected":
        return vms.filter(status__in=[VmStatus.CONNECTED, VmStatus.AUTHORIZED])
    if filter == "authorized":
        return vms.filter(status=VmStatus.AUTHORIZED)
    if filter == "ever_connected":
        return vms.filter(first_connected_at__isnull=False)
    raise ValidationFailed(f"filter must be one of {', '.join(VM_FILTERS)}", code="bad_filter")


def vm_get(*, vm_id: int) -> VirtualMachine:
    try:
        return vm_list().get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"VM {vm_id} does not exist.", code="vm_not_found") from None


def vm_sessions(*, vm_id: int, limit: int = 10) -> list[AgentSession]:
    return list(AgentSession.objects.filter(vm_id=vm_id).order_by("-started_at")[:limit])


def vm_commands(*, vm_id: int) -> QuerySet[Command]:
    vm_get(vm_id=vm_id)
    return Command.objects.filter(vm_id=vm_id).order_by("-created_at")


def disk_list() -> QuerySet[Disk]:
    return Disk.objects.select_related("vm").order_by("vm_id", "name")


def audit_for_vm(*, vm_id: int, limit: int = 50) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(vm_id=vm_id)[:limit])
