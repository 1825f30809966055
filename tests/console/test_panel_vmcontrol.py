"""vmcontrol's console panel: its sample against VMs made live by the real TCP server (raw agent
connections and a real `Agent`), and its two actions with their refusals. The actions run as the
console's action API runs them: sync code in a worker thread of the live server's loop, where
the TCP server and the agent bus live (in-memory channel layer embedded, Redis in CI)."""

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from common.console import ConsolePanel, PanelSample, console_panel
from common.exceptions import NotFound
from common.heartbeat import console_flush
from common.parsers import InvalidValue
from tests.conftest import LiveServer
from tests.factories import StaffFactory
from tests.vmcontrol.conftest import VmServer, Wire, authorized_wire, eventually
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import AuditEvent, Command, CommandStatus, VirtualMachine, VmStatus
from vmcontrol.services import CommandFailed, CommandNotRetryable, VmNotAuthorized
from vmcontrol.sessions import ServerConfig

pytestmark = pytest.mark.timeout(90)

INVENTORY = {"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]}


def panel() -> ConsolePanel:
    found = console_panel("vmcontrol")
    assert found is not None, "VmcontrolConfig.ready registers the panel"
    return found


def numbers(sample: PanelSample) -> dict[str, Any]:
    return {number["key"]: number["value"] for number in sample["numbers"]}


@pytest.fixture
def vm_tcp(asgi_server: LiveServer) -> Iterator[VmServer]:
    config = ServerConfig(
        heartbeat_interval=1.0,
        missed_heartbeats=3,
        auth_timeout=5.0,
        flush_interval=0.1,
        server_name="console-vmcontrol",
    )
    server = VmServer(loop=asgi_server.loop, config=config).start()
    yield server
    server.stop()


async def in_server(server: LiveServer, run: Callable[..., Any], **kwargs: Any) -> Any:
    """`run(**kwargs)` in a worker thread of the live server's loop, as a request runs it (and,
    as at a request's end, that thread's database connection is closed afterwards)."""

    def request() -> Any:
        try:
            return run(**kwargs)
        finally:
            connections.close_all()

    call = sync_to_async(request, thread_sensitive=False)()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, server.loop))


async def sample_now() -> PanelSample:
    await sync_to_async(console_flush)()
    return await sync_to_async(panel().sample)()


async def test_the_panel_counts_vms_by_live_status_and_names_the_one_that_went_offline(
    vm_tcp: VmServer,
) -> None:
    live, live_token = await sync_to_async(vm_with_token)("live")
    gone, gone_token = await sync_to_async(vm_with_token)("gone")
    await sync_to_async(vm_with_token)("never")
    live_wire = await authorized_wire(vm_tcp.port, live.pk, live_token)
    gone_wire = await authorized_wire(vm_tcp.port, gone.pk, gone_token)

    async def seen() -> bool:
        return await sync_to_async(
            VirtualMachine.objects.filter(pk=gone.pk, last_seen_at__isnull=False).exists
        )()

    assert await eventually(seen)
    await gone_wire.close()

    async def settled() -> PanelSample | None:
        sample = await sample_now()
        counts = numbers(sample)
        return sample if (counts["authorized"], counts["offline"]) == (1, 2) else None

    sample = await eventually(settled)
    assert sample is not None
    assert numbers(sample)["connected"] == 0
    [attention] = sample["attention"]
    assert attention["key"] == f"offline-{gone.pk}"
    assert f"VM gone (#{gone.pk}) offline" in attention["text"] and "(closed)" in attention["text"]
    assert attention["link"] == f"/admin/vmcontrol/virtualmachine/{gone.pk}/change/"
    [table] = sample["tables"]
    [row] = table["rows"]
    assert row["cells"][:2] == [f"live (#{live.pk})", VmStatus.AUTHORIZED]
    assert row["actions"] == [
        {"action": "logout", "label": "Log out", "params": {"vm_id": live.pk}}
    ]
    await live_wire.close()


async def test_heartbeats_are_counted_where_the_pings_arrive(vm_tcp: VmServer) -> None:
    vm, token = await sync_to_async(vm_with_token)("pinger")
    wire = await authorized_wire(vm_tcp.port, vm.pk, token)
    before = (await sample_now())["counters"]["vmcontrol.heartbeats"]["value"]
    for _ in range(3):
        assert (await wire.request({"type": "ping"}))["type"] == "pong"
    after = (await sample_now())["counters"]["vmcontrol.heartbeats"]["value"]
    assert after - before == 3
    await wire.close()


def _command(vm: VirtualMachine, status: str, minutes_ago: int, **fields: Any) -> Command:
    command = Command.objects.create(vm=vm, name="update_specs", args=INVENTORY, status=status)
    Command.objects.filter(pk=command.pk).update(
        created_at=timezone.now() - timedelta(minutes=minutes_ago), **fields
    )
    return command


@pytest.mark.django_db
def test_the_panel_counts_open_and_failed_commands_and_offers_a_retry_newest_first() -> None:
    vm, _ = vm_with_token("db-1")
    for status in ["queued", "sent", "sent", "succeeded", "succeeded"]:
        _command(vm, status, 1)
    older = _command(vm, "failed", 30, error={"code": "disk_full", "message": "no space"})
    newer = _command(vm, "timed_out", 5)
    sample = panel().sample()
    counts = numbers(sample)
    assert (counts["queued"], counts["sent"], counts["failed"], counts["timed_out"]) == (1, 2, 1, 1)
    failed = [a for a in sample["attention"] if a["key"].startswith("command-")]
    assert [a["key"] for a in failed] == [f"command-{newer.pk}", f"command-{older.pk}"]
    assert "timed out" in failed[0]["text"] and "no space" in failed[1]["text"]
    assert failed[1]["link"] == f"/admin/vmcontrol/command/{older.pk}/change/"
    assert failed[1]["actions"] == [
        {"action": "retry", "label": "Retry", "params": {"command_id": str(older.pk)}}
    ]


async def test_log_out_action_logs_the_vm_out_and_refuses_one_that_is_not_authorized(
    vm_tcp: VmServer, asgi_server: LiveServer
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    vm, token = await sync_to_async(vm_with_token)("web-1")
    wire: Wire = await authorized_wire(vm_tcp.port, vm.pk, token)
    logout = panel().actions["logout"].run

    line = await in_server(asgi_server, logout, params={"vm_id": vm.pk}, user=staff)

    assert line == f"VM web-1 (#{vm.pk}) logged out: it must authorize again."
    stored = await sync_to_async(VirtualMachine.objects.get)(pk=vm.pk)
    assert stored.status == VmStatus.CONNECTED
    told = await wire.recv()
    assert told["type"] == "logout", told
    audit = await sync_to_async(AuditEvent.objects.get)(vm_id=vm.pk, action="vm.logged_out")
    assert audit.actor_id == staff.pk
    with pytest.raises(VmNotAuthorized):
        await in_server(asgi_server, logout, params={"vm_id": vm.pk}, user=staff)
    with pytest.raises(NotFound):
        await in_server(asgi_server, logout, params={"vm_id": 999_999}, user=staff)
    with pytest.raises(InvalidValue) as refused:
        await in_server(asgi_server, logout, params={"vm_id": "1; drop"}, user=staff)
    assert refused.value.field == "vm_id"
    await wire.close()


async def test_retry_action_sends_the_failed_command_to_the_agent_again(
    vm_tcp: VmServer, asgi_server: LiveServer
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    vm, token = await sync_to_async(vm_with_token)("grow")
    identity = AgentIdentity(name="grow", vm_id=vm.pk, token=token, inventory=dict(INVENTORY))
    agent = Agent("127.0.0.1", vm_tcp.port, identity)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.authorized.wait(), 10)
        wanted = {**INVENTORY, "cpu_cores": 6}
        failed = await sync_to_async(_command)(vm, "timed_out", 2)
        await sync_to_async(Command.objects.filter(pk=failed.pk).update)(args=wanted)
        retry = panel().actions["retry"].run

        line = await in_server(
            asgi_server, retry, params={"command_id": str(failed.pk)}, user=staff
        )

        assert line == f"update_specs sent again to VM #{vm.pk}: succeeded."
        assert agent.identity.inventory["cpu_cores"] == 6  # the agent applied it
        commands = await sync_to_async(
            lambda: list(Command.objects.filter(vm=vm).values_list("pk", "status"))
        )()
        assert (failed.pk, CommandStatus.TIMED_OUT) in commands
        assert [s for pk, s in commands if pk != failed.pk] == [CommandStatus.SUCCEEDED]
        assert (await sync_to_async(VirtualMachine.objects.get)(pk=vm.pk)).cpu_cores == 6
        assert await sync_to_async(
            AuditEvent.objects.filter(
                vm_id=vm.pk, action="command.retry", details__command_id=str(failed.pk)
            ).exists
        )()

        unknown_to_agent = await sync_to_async(Command.objects.create)(
            vm=vm, name="reboot", args={}, status=CommandStatus.FAILED
        )
        with pytest.raises(CommandFailed):
            await in_server(
                asgi_server, retry, params={"command_id": str(unknown_to_agent.pk)}, user=staff
            )
        assert (
            await sync_to_async(
                Command.objects.filter(vm=vm, name="reboot", status=CommandStatus.FAILED).count
            )()
            == 2
        )
        succeeded = next(pk for pk, s in commands if pk != failed.pk)
        with pytest.raises(CommandNotRetryable):
            await in_server(asgi_server, retry, params={"command_id": str(succeeded)}, user=staff)
        with pytest.raises(NotFound):
            await in_server(
                asgi_server, retry, params={"command_id": str(uuid.uuid4())}, user=staff
            )
        with pytest.raises(InvalidValue):
            await in_server(asgi_server, retry, params={"command_id": "{not-a-uuid}"}, user=staff)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
