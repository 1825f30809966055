"""`manage.py run_vm_agent` run as an operator runs it, in its own process (issue 10 item 12):
an option value may start with `-` (one token in 64 did), and values are read by the shared
parsers."""

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from tests.vmcontrol.conftest import VmServer, manage, test_database_url
from tests.vmcontrol.factories import vm_with_token
from vmcontrol import services
from vmcontrol.models import AgentSession, Disk, VirtualMachine

pytestmark = pytest.mark.timeout(120)


async def run_agent(*args: str) -> tuple[int, str]:
    child = manage(
        ["run_vm_agent", "--host", "127.0.0.1", *args],
        {"DATABASE_URL": await sync_to_async(test_database_url)()},
    )
    output, _ = await asyncio.to_thread(child.communicate, timeout=90)
    return child.returncode, output.decode(errors="replace")


@sync_to_async
def vm_whose_token_starts_with_a_dash() -> tuple[VirtualMachine, str]:
    vm, _ = vm_with_token("dash")
    token = "-" + secrets.token_urlsafe(32)  # what token_urlsafe gave one VM in 64
    VirtualMachine.objects.filter(pk=vm.pk).update(token_hash=services.token_hash(token))
    return vm, token


async def test_an_agent_authorizes_with_option_values_that_start_with_a_dash(
    vmserver: VmServer,
) -> None:
    vm, token = await vm_whose_token_starts_with_a_dash()
    code, output = await run_agent(
        *("--port", str(vmserver.port), "--vm-id", str(vm.pk)),
        *("--token", token, "--name", "-agent", "--disk", "-scratch:5", "--duration", "3"),
    )
    assert code == 0, output
    session = await sync_to_async(AgentSession.objects.get)(vm=vm)
    assert session.authorized_at is not None and session.end_reason == "bye"
    disks = await sync_to_async(lambda: list(Disk.objects.filter(vm=vm).values_list("name")))()
    assert disks == [("-scratch",)]


async def test_an_agent_enrolls_with_a_secret_that_starts_with_a_dash(
    vmserver: VmServer, settings: Any, tmp_path: Path
) -> None:
    settings.VMCONTROL_ENROLL_SECRET = "-s3cret"
    state = tmp_path / "agents.json"
    code, output = await run_agent(
        *("--port", str(vmserver.port), "--enroll-secret", "-s3cret"),
        *("--state-file", str(state), "--duration", "3"),
    )
    assert code == 0, output
    vm = await sync_to_async(VirtualMachine.objects.get)()
    session = await sync_to_async(AgentSession.objects.get)(vm=vm)
    assert session.authorized_at is not None
    assert f'"vm_id": {vm.pk}' in state.read_text()


async def test_a_bad_option_value_is_refused_before_dialing(transactional_db: None) -> None:
    code, output = await run_agent("--port", "9", "--cpu", "\u0663")  # Arabic-Indic three
    assert code == 2 and "argument --cpu: must be ASCII digits" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ram", "2_048"], "argument --ram: must be ASCII digits"),
        (["--vm-id", "\u00b2"], "argument --vm-id: must be ASCII digits"),  # superscript two
        (["--port", "70000"], "argument --port: must be between 1 and 65535"),
        (["--token", "tok en"], "argument --token: contains characters outside its charset"),
        (["--name", "a\x1b[2J"], "argument --name: contains NUL or another control character"),
        (["--disk", "root"], "argument --disk: wants NAME:SIZE_GB"),
        (["--disk", "root:-1"], "argument --disk: must not be negative"),
        (["--backoff-cap", "nan"], "argument --backoff-cap: must be digits"),
        (["--duration", "-1"], "argument --duration: must be digits"),
    ],
)
def test_option_values_are_read_by_the_shared_parsers(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("run_vm_agent", *args)
