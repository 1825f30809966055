"""Operator console: the same operations as the REST API, as readable tables."""

from typing import IO, Any, cast

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.management.base import CommandError, CommandParser
from rich.console import Console
from rich.table import Table

from common.exceptions import ApplicationError
from common.parsers import INT64_MAX
from vmcontrol import selectors, services
from vmcontrol.management.options import (
    OptionValuesCommand,
    disk_option,
    integer_option,
    seconds_option,
    text_option,
)
from vmcontrol.protocol import MAX_CPU_CORES, MAX_NAME_LENGTH, MAX_RAM_MB

VM_ID = integer_option(min_value=1, max_value=INT64_MAX)
CPU = integer_option(min_value=1, max_value=MAX_CPU_CORES)
RAM = integer_option(min_value=1, max_value=MAX_RAM_MB)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


class Command(OptionValuesCommand):
    help = "VM control console: list, disks, register, update, logout, rotate-token, revoke."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="list VMs")
        which = listing.add_mutually_exclusive_group()
        which.add_argument("--connected", action="store_true")
        which.add_argument("--authorized", action="store_true")
        which.add_argument("--ever-connected", action="store_true")
        sub.add_parser("disks", help="every disk with its VM")
        register = sub.add_parser("register", help="add a VM and print its token once")
        register.add_argument("--name", required=True, type=text_option(max_length=MAX_NAME_LENGTH))
        register.add_argument("--cpu", type=CPU, default=1)
        register.add_argument("--ram", type=RAM, default=512, help="MB")
        register.add_argument("--disk", action="append", type=disk_option, help="NAME:SIZE_GB")
        update = sub.add_parser("update", help="push new specs to an authorized VM")
        update.add_argument("vm_id", type=VM_ID)
        update.add_argument("--cpu", type=CPU)
        update.add_argument("--ram", type=RAM, help="MB")
        update.add_argument("--disk", action="append", type=disk_option, help="NAME:SIZE_GB (all)")
        update.add_argument("--timeout", type=seconds_option())
        for name in ("logout", "rotate-token", "revoke-token"):
            sub.add_parser(name).add_argument("vm_id", type=VM_ID)

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        self.console = Console(file=cast(IO[str], self.stdout), width=140)
        try:
            getattr(self, "do_" + action.replace("-", "_"))(**options)
        except ApplicationError as error:
            raise CommandError(f"{error.code}: {error.message}") from error

    def _vms(self, vms: Any, title: str) -> None:
        table = Table(title=title)
        for column in ("ID", "Name", "Status", "CPU", "RAM MB", "Disks", "First seen", "Last"):
            table.add_column(column)
        for vm in vms:
            disks = ", ".join(f"{d.name} {d.size_gb} GB" for d in vm.disks.all()) or "—"
            table.add_row(
                str(vm.pk),
                vm.name,
                vm.live_status,
                str(vm.cpu_cores),
                str(vm.ram_mb),
                disks,
                _when(vm.first_connected_at),
                _when(vm.last_seen_at),
            )
        self.console.print(table)

    def do_list(self, **options: Any) -> None:
        which = next(
            (k for k in ("connected", "authorized", "ever_connected") if options.get(k)), None
        )
        self._vms(selectors.vm_list(filter=which), f"VMs ({which or 'all'})")

    def do_disks(self, **options: Any) -> None:
        table = Table(title="Disks")
        for column in ("Disk ID", "Name", "Size GB", "VM ID", "VM"):
            table.add_column(column)
        for disk in selectors.disk_list():
            table.add_row(str(disk.pk), disk.name, str(disk.size_gb), str(disk.vm_id), disk.vm.name)
        self.console.print(table)

    def do_register(self, *, name: str, cpu: int, ram: int, disk: Any, **options: Any) -> None:
        vm, token = services.vm_register(name=name, cpu_cores=cpu, ram_mb=ram, disks=disk or [])
        self._vms([selectors.vm_get(vm_id=vm.pk)], "Registered")
        self.console.print(f"VM id: {vm.pk}\nToken (shown once): {token}")

    def do_update(self, *, vm_id: int, cpu: Any, ram: Any, disk: Any, **options: Any) -> None:
        if isinstance(get_channel_layer(), InMemoryChannelLayer):
            raise CommandError(
                "update needs a channel layer shared between processes (set REDIS_URL); "
                "in the embedded run use PATCH /api/vmcontrol/vms/<id> on `manage.py runall`."
            )
        services.vm_update_specs(
            vm_id=vm_id, cpu_cores=cpu, ram_mb=ram, disks=disk, timeout=options.get("timeout")
        )
        self._vms([selectors.vm_get(vm_id=vm_id)], "Updated (acknowledged by the agent)")

    def do_logout(self, *, vm_id: int, **options: Any) -> None:
        services.vm_logout(vm_id=vm_id)
        self._vms([selectors.vm_get(vm_id=vm_id)], "Logged out")

    def do_rotate_token(self, *, vm_id: int, **options: Any) -> None:
        token = services.vm_token_rotate(vm_id=vm_id)
        self.console.print(f"VM {vm_id} new token (shown once): {token}")

    def do_revoke_token(self, *, vm_id: int, **options: Any) -> None:
        services.vm_token_revoke(vm_id=vm_id)
        self.console.print(f"VM {vm_id}: token revoked")
