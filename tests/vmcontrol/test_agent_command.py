"""`manage.py run_vm_agent` run as an operator runs it, in its own process (issue 10 item 12):
an option value may start with `-` (one token in 64 did), and values are read by the shared
parsers."""

import asyncio
import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from tests.vmcontrol.conftest import ROOT, VmServer, free_port, manage, test_database_url
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


# Issue 13 item 5: levelled logs for people, JSON lines for machines, refused credentials end
# the agent with status 3 instead of a retry loop, network failures are retried.

HUMAN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) +\S")
FAST_RETRY = ("--backoff-base", "0.1", "--backoff-cap", "0.3")


@pytest.mark.parametrize("credentials", ["wrong", "revoked"])
async def test_refused_credentials_end_the_agent_with_status_3_within_a_bound(
    vmserver: VmServer, credentials: str
) -> None:
    vm, token = await sync_to_async(vm_with_token)("refused")
    if credentials == "wrong":
        token = "vmc_" + secrets.token_urlsafe(32)
    else:
        await sync_to_async(services.vm_token_revoke)(vm_id=vm.pk)
    started = time.monotonic()
    code, output = await run_agent(
        *("--port", str(vmserver.port), "--vm-id", str(vm.pk), "--token", token, *FAST_RETRY)
    )
    assert code == 3, output
    assert time.monotonic() - started < 30
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(HUMAN_LINE.match(line) for line in lines), output
    refusals = [line for line in lines if "[vmcontrol_agent_auth_failed]" in line]
    assert len(refusals) == 3 and all(" ERROR " in line for line in refusals), output
    assert "ERROR" in lines[-2] and "giving up after 3 refusals" in lines[-2], output
    assert " WARNING " in next(line for line in lines if "reconnecting in" in line)


async def test_json_lines_parse_one_by_one_and_summarize_heartbeats(vmserver: VmServer) -> None:
    vm, token = await sync_to_async(vm_with_token)("machine")
    code, output = await run_agent(
        *("--port", str(vmserver.port), "--vm-id", str(vm.pk), "--token", token),
        *("--json", "--duration", "3.5", "--summary-every", "1"),
    )
    assert code == 0, output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"event", "level", "timestamp"} <= record.keys() for record in records), output
    events = [record["event"] for record in records]
    assert "vmcontrol_agent_authorized" in events and events[-1] == "vmcontrol_agent_stopped"
    summaries = [r for r in records if r["event"] == "vmcontrol_agent_summary"]
    assert summaries and summaries[-1]["level"] == "info", output
    assert summaries[-1]["authorized"] == 1 and sum(s["pongs"] for s in summaries) >= 1, output


async def test_human_lines_carry_levels_and_network_failures_are_retried(
    vmserver: VmServer,
) -> None:
    vm, token = await sync_to_async(vm_with_token)("person")
    code, output = await run_agent(
        *("--port", str(vmserver.port), "--vm-id", str(vm.pk), "--token", token),
        *("--duration", "3.5", "--summary-every", "1"),
    )
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(HUMAN_LINE.match(line) for line in lines), output
    assert any(" INFO " in line and f"authorized as VM {vm.pk}" in line for line in lines)
    assert any(" INFO " in line and "heartbeats answered" in line for line in lines), output

    # Nothing listens: a transient failure, retried (WARNING) until --duration, status 0.
    code, output = await run_agent(
        *("--port", str(free_port()), "--vm-id", str(vm.pk), "--token", token),
        *(*FAST_RETRY, "--duration", "2"),
    )
    assert code == 0, output
    retries = [line for line in output.splitlines() if "[vmcontrol_agent_reconnecting]" in line]
    assert len(retries) >= 3 and all(" WARNING " in line for line in retries), output


def test_help_documents_the_exit_statuses() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "run_vm_agent", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "exit status:" in result.stdout and "3  the server refused" in result.stdout
    assert "--auth-attempts" in result.stdout and "--json" in result.stdout
