from typing import Any

from vmcontrol import services
from vmcontrol.models import VirtualMachine
from vmcontrol.protocol import Disk


def vm_with_token(name: str = "vm", **fields: Any) -> tuple[VirtualMachine, str]:
    """A registered VM and its raw token (as an operator would get it)."""
    disks = fields.pop("disks", [Disk(name="root", size_gb=10)])
    return services.vm_register(name=name, disks=disks, **fields)
