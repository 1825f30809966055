"""`manage.py vmctl`: the operations from a console, as a client of the running system's REST
API (issue 13 item 4); here against the live test server. `test_runall.py` runs it against
`manage.py runall` in the embedded mode."""

import asyncio
import io
import subprocess
import sys
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from knox.models import AuthToken

from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, token_for
from tests.vmcontrol.conftest import (
    ROOT,
    VmServer,
    authorized_wire,
    free_port,
    manage,
    test_database_url,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import VirtualMachine

pytestmark = pytest.mark.timeout(60)
UPDATE = ("--cpu", "7", "--ram", "3000")


def vmctl(server: LiveServer, *args: str, user: str = "operator") -> str:
    out = io.StringIO()
    call_command("vmctl", "--url", server.http_url, "--user", user, *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def operator(asgi_server: LiveServer) -> None:
    StaffFactory.create(username="operator")


def test_register_prints_the_token_once_and_lists_show_the_vm(
    asgi_server: LiveServer, operator: None
) -> None:
    output = vmctl(
        asgi_server, "register", "--name", "console-1", "--cpu", "2", "--disk", "root:30"
    )
    vm = VirtualMachine.objects.get(name="console-1")
    assert f"VM id: {vm.pk}" in output and "Token (shown once):" in output
    assert f"run_vm_agent --vm-id {vm.pk}" in output
    listing = vmctl(asgi_server, "list")
    assert "console-1" in listing and "root 30 GB" in listing and "Token" not in listing
    assert "console-1" not in vmctl(asgi_server, "list", "--connected")
    assert "console-1" not in vmctl(asgi_server, "list", "--ever-connected")
    disks = vmctl(asgi_server, "disks")
    assert "console-1" in disks and "30" in disks
    # The token vmctl issued itself is gone once it is done.
    assert not AuthToken.objects.exists()


def test_logout_of_a_vm_that_is_not_authorized_is_an_error(
    asgi_server: LiveServer, operator: None
) -> None:
    vm, _ = vm_with_token("x")
    with pytest.raises(CommandError, match="not_authorized"):
        vmctl(asgi_server, "logout", str(vm.pk))


def test_a_token_given_is_used_and_kept_and_options_may_follow_the_subcommand(
    asgi_server: LiveServer,
) -> None:
    token = token_for(StaffFactory.create(username="someone"))
    out = io.StringIO()
    call_command("vmctl", "list", "--url", asgi_server.http_url, "--token", token, stdout=out)
    assert "VMs (all)" in out.getvalue()
    assert AuthToken.objects.count() == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("nobody", "No active staff user 'operator'"),
        ("not_staff", "No active staff user 'operator'"),
        ("bad_token", "authentication_failed: Invalid token."),
    ],
)
def test_who_may_act_is_checked_with_a_clear_message(
    asgi_server: LiveServer, setup: str, message: str
) -> None:
    args = ["--url", asgi_server.http_url]
    if setup == "not_staff":
        UserFactory.create(username="operator")
    if setup == "bad_token":
        args += ["--token", "vmc_not-an-api-token"]
    with pytest.raises(CommandError, match=message):
        call_command("vmctl", *args, "list", stdout=io.StringIO())


def test_an_unreachable_server_is_one_line_naming_the_url_and_status_1(
    transactional_db: None,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "manage.py", "vmctl", "--url", url, "--token", "t0ken", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and "Cannot reach" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


async def test_console_lists_and_logs_out_a_live_vm(
    vmserver: VmServer, asgi_server: LiveServer, operator: None
) -> None:
    vm, token = await sync_to_async(vm_with_token)("live")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    connected = await sync_to_async(vmctl)(asgi_server, "list", "--authorized")
    assert "live" in connected and "authorized" in connected
    await sync_to_async(vmctl)(asgi_server, "logout", str(vm.pk))
    assert (await wire.recv())["type"] == "logout"
    assert "live" not in await sync_to_async(vmctl)(asgi_server, "list", "--authorized")
    assert "live" in await sync_to_async(vmctl)(asgi_server, "list", "--connected")
    await wire.close()


async def test_console_update_reaches_the_agent(
    start_vmserver: Callable[..., VmServer], asgi_server: LiveServer, operator: None
) -> None:
    server = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("upd")
    agent = Agent("127.0.0.1", server.port, AgentIdentity(name="u", vm_id=vm.pk, token=token))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.authorized.wait(), 10)
    try:
        # The console is its own process, as in production: it asks the web server, which
        # reaches the TCP server's consumer through the channel layer.
        child = manage(
            ["vmctl", "--url", asgi_server.http_url, "update", str(vm.pk), *UPDATE],
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
