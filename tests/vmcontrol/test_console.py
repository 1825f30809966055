"""`manage.py vmctl`: the operations from the server's console."""

import asyncio
import io
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from tests.vmcontrol.conftest import VmServer, authorized_wire, manage, test_database_url
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import VirtualMachine

pytestmark = pytest.mark.timeout(60)


def vmctl(*args: str) -> str:
    out = io.StringIO()
    call_command("vmctl", *args, stdout=out)
    return out.getvalue()


def test_register_prints_the_token_once_and_lists_show_the_vm(db: None) -> None:
    output = vmctl("register", "--name", "console-1", "--cpu", "2", "--disk", "root:30")
    vm = VirtualMachine.objects.get(name="console-1")
    assert f"VM id: {vm.pk}" in output and "Token (shown once):" in output
    listing = vmctl("list")
    assert "console-1" in listing and "root 30 GB" in listing and "Token" not in listing
    assert "console-1" not in vmctl("list", "--connected")
    assert "console-1" not in vmctl("list", "--ever-connected")
    disks = vmctl("disks")
    assert "console-1" in disks and "30" in disks


def test_logout_of_a_vm_that_is_not_authorized_is_an_error(db: None) -> None:
    vm, _ = vm_with_token("x")
    with pytest.raises(CommandError, match="not_authorized"):
        vmctl("logout", str(vm.pk))


async def test_console_lists_and_logs_out_a_live_vm(vmserver: VmServer) -> None:
    vm, token = await sync_to_async(vm_with_token)("live")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    connected = await sync_to_async(vmctl)("list", "--authorized")
    assert "live" in connected and "authorized" in connected
    await sync_to_async(vmctl)("logout", str(vm.pk))
    assert (await wire.recv())["type"] == "logout"
    assert "live" not in await sync_to_async(vmctl)("list", "--authorized")
    assert "live" in await sync_to_async(vmctl)("list", "--connected")
    await wire.close()


@pytest.mark.needs_redis
async def test_console_update_reaches_the_agent(start_vmserver: Callable[..., VmServer]) -> None:
    server = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("upd")
    agent = Agent("127.0.0.1", server.port, AgentIdentity(name="u", vm_id=vm.pk, token=token))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.authorized.wait(), 10)
    try:
        # The console is its own process, as in production: it reaches the TCP server's
        # consumer through the Redis channel layer.
        child = manage(
            ["vmctl", "update", str(vm.pk), "--cpu", "7", "--ram", "3000"],
            {"DATABASE_URL": await sync_to_async(test_database_url)()},
        )
        output, _ = await asyncio.to_thread(child.communicate, timeout=60)
        assert child.returncode == 0, output
        assert b"acknowledged" in output
        await vm.arefresh_from_db()
        assert (vm.cpu_cores, vm.ram_mb) == (7, 3000)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
