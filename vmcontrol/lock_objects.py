"""Row locks for vmcontrol writes (`SELECT ... FOR UPDATE`); call inside a transaction."""

from common.exceptions import NotFound
from vmcontrol.models import VirtualMachine


def vm_lock(vm_id: int) -> VirtualMachine:
    """The VM row, locked until the caller's transaction ends (one row: no ordering to keep).
    Raises NotFound (`vm_not_found`)."""
    try:
        return VirtualMachine.objects.select_for_update().get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"VM {vm_id} does not exist.", code="vm_not_found") from None
