"""The agent server over real TCP on 127.0.0.1:0, against the real database."""

import asyncio
import hashlib
import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from tests.vmcontrol.conftest import (
    INVENTORY,
    VmServer,
    Wire,
    authorized_wire,
    eventually,
    free_port,
    manage,
    test_database_url,
    wait_port,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol import selectors
from vmcontrol.models import AgentSession, Disk, VirtualMachine

pytestmark = pytest.mark.timeout(90)


@sync_to_async
def listed() -> dict[str, set[int]]:
    return {
        name: {vm.pk for vm in selectors.vm_list(filter=name)}
        for name in ("connected", "authorized", "ever_connected")
    }


async def lists_become(expected: dict[str, set[int]], wait: float = 10) -> dict[str, set[int]]:
    async def check() -> bool:
        return await listed() == expected

    await eventually(check, wait)
    return await listed()


async def test_lists_are_right_at_every_step_of_the_lifecycle(
    start_vmserver: Callable[..., VmServer],
) -> None:
    server = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("web-1")
    other, _ = await sync_to_async(vm_with_token)("never")
    none: dict[str, set[int]] = {"connected": set(), "authorized": set(), "ever_connected": set()}
    assert await listed() == none

    wire = await Wire.open(server.port)
    assert await lists_become(none) == none  # a bare socket names no VM yet

    welcome = await wire.request(
        {"type": "hello", "protocol": 1, "vm_id": vm.pk, "inventory": INVENTORY}
    )
    assert welcome["type"] == "welcome" and welcome["heartbeat_interval"] == 1.0
    assert await listed() == none  # `hello` names a VM but proves nothing (issue 11 item 5)

    assert (await wire.request({"type": "auth", "vm_id": vm.pk, "token": token}))["type"] == (
        "auth_ok"
    )
    authorized = {"connected": {vm.pk}, "authorized": {vm.pk}, "ever_connected": {vm.pk}}
    assert await listed() == authorized

    assert (await wire.request({"type": "logout"}))["type"] == "logged_out"
    logged_out = {"connected": {vm.pk}, "authorized": set(), "ever_connected": {vm.pk}}
    assert await listed() == logged_out

    assert (await wire.request({"type": "auth", "vm_id": vm.pk, "token": token}))["type"] == (
        "auth_ok"
    )
    assert await listed() == authorized

    await wire.close()
    gone = {"connected": set(), "authorized": set(), "ever_connected": {vm.pk}}
    assert await lists_become(gone) == gone

    wire = await authorized_wire(server.port, vm.pk, token)
    assert await listed() == authorized
    server.stop()  # a clean stop ends every session
    assert await lists_become(gone) == gone
    start_vmserver()
    assert await listed() == gone  # history survives the restart
    await wire.close()

    sessions = await sync_to_async(
        lambda: list(AgentSession.objects.filter(vm=vm).order_by("started_at"))
    )()
    assert [s.end_reason for s in sessions] == ["closed", "server_shutdown"]
    assert other.pk not in (await listed())["ever_connected"]


@pytest.mark.timeout(120)
def test_sessions_left_open_by_a_killed_server_are_closed_at_its_next_start(
    transactional_db: None,
) -> None:
    vm, token = vm_with_token("crash")
    port = free_port()
    env = {"DATABASE_URL": test_database_url(), "VMCONTROL_SERVER_NAME": "killed-1"}
    args = ["run_vmcontrol_server", "--host", "127.0.0.1", "--port", str(port)]
    first = manage(args, env)
    try:
        wait_port(port)

        async def connect_and_get_killed() -> None:
            wire = await authorized_wire(port, vm.pk, token)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            await wire.close()

        asyncio.run(connect_and_get_killed())
    finally:
        first.kill()
        first.wait()
    vm.refresh_from_db()
    assert vm.status == "authorized"  # the killed server could not record anything
    assert AgentSession.objects.get(vm=vm).ended_at is None

    second = manage(args, env)
    try:
        wait_port(port)
        session = AgentSession.objects.get(vm=vm)
        assert session.ended_at is not None and session.end_reason == "server_crashed"
        vm.refresh_from_db()
        assert vm.status == "offline" and vm.first_connected_at is not None
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)


async def test_enrollment_gives_a_token_once_that_then_authorizes(
    vmserver: VmServer, settings: Any
) -> None:
    settings.VMCONTROL_ENROLL_SECRET = "s3cret"
    wire = await Wire.open(vmserver.port)
    await wire.request({"type": "hello", "protocol": 1})
    refused = await wire.request({"type": "enroll", "secret": "nope", "inventory": INVENTORY})
    assert refused["type"] == "error" and refused["code"] == "auth_failed"
    enrolled = await wire.request(
        {"type": "enroll", "secret": "s3cret", "name": "self", "inventory": INVENTORY}
    )
    assert enrolled["type"] == "enrolled"
    vm = await sync_to_async(VirtualMachine.objects.get)(pk=enrolled["vm_id"])
    assert vm.token_hash == hashlib.sha256(enrolled["token"].encode()).hexdigest()
    reply = await wire.request({"type": "auth", "vm_id": vm.pk, "token": enrolled["token"]})
    assert reply["type"] == "auth_ok"
    await wire.close()


@pytest.mark.parametrize("case", ["wrong", "revoked", "rotated_away", "unknown_vm"])
async def test_bad_tokens_are_refused(vmserver: VmServer, case: str) -> None:
    from vmcontrol import services

    vm, token = await sync_to_async(vm_with_token)("t")
    vm_id = vm.pk
    if case == "wrong":
        token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    elif case == "revoked":
        await sync_to_async(services.vm_token_revoke)(vm_id=vm.pk)
    elif case == "rotated_away":
        new = await sync_to_async(services.vm_token_rotate)(vm_id=vm.pk)
        assert new != token
    else:
        vm_id = vm.pk + 1000
    wire = await Wire.open(vmserver.port)
    await wire.request({"type": "hello", "protocol": 1, "vm_id": vm_id})
    reply = await wire.request({"type": "auth", "vm_id": vm_id, "token": token})
    assert reply["type"] == "error" and reply["code"] == "auth_failed"
    assert (await listed())["authorized"] == set()
    await wire.close()


async def test_rotated_token_authorizes_and_kicks_the_live_session(vmserver: VmServer) -> None:
    from vmcontrol import services

    vm, token = await sync_to_async(vm_with_token)("rot")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    new = await sync_to_async(services.vm_token_rotate)(vm_id=vm.pk)
    frame = await wire.recv()
    assert frame == {"type": "logout", "reason": "token_rotated"}
    assert (await listed())["authorized"] == set()
    again = await wire.request({"type": "auth", "vm_id": vm.pk, "token": new})
    assert again["type"] == "auth_ok"
    await wire.close()


async def test_reported_inventory_replaces_stale_facts_and_disk_ids_are_the_servers(
    vmserver: VmServer,
) -> None:
    vm, token = await sync_to_async(vm_with_token)(
        "inv",
        cpu_cores=1,
        ram_mb=256,
        disks=[],  # stale: what the operator typed
    )
    from vmcontrol import services
    from vmcontrol.protocol import Disk as WireDisk
    from vmcontrol.protocol import Inventory

    await sync_to_async(services.disks_replace)(
        {vm.pk: Inventory(1, 256, (WireDisk("old", 5), WireDisk("root", 1)))}
    )
    root_id = await sync_to_async(lambda: Disk.objects.get(vm=vm, name="root").pk)()
    reported = {
        "cpu_cores": 8,
        "ram_mb": 16384,
        "disks": [
            {"name": "root", "size_gb": 40, "id": 999999},  # an agent's id is ignored
            {"name": "data", "size_gb": 500},
        ],
    }
    wire = await authorized_wire(vmserver.port, vm.pk, token, inventory=reported)
    await vm.arefresh_from_db()
    assert (vm.cpu_cores, vm.ram_mb) == (8, 16384)
    disks = await sync_to_async(lambda: {d.name: d for d in Disk.objects.filter(vm=vm)})()
    assert {n: d.size_gb for n, d in disks.items()} == {"root": 40, "data": 500}
    assert disks["root"].pk == root_id and 999999 not in {d.pk for d in disks.values()}

    changed = {"cpu_cores": 4, "ram_mb": 8192, "disks": [{"name": "data", "size_gb": 600}]}
    assert (await wire.request({"type": "inventory", "inventory": changed}))["type"] == "ack"
    await vm.arefresh_from_db()
    assert (vm.cpu_cores, vm.ram_mb) == (4, 8192)
    assert await sync_to_async(
        lambda: list(Disk.objects.filter(vm=vm).values_list("name", "size_gb"))
    )() == [("data", 600)]
    await wire.close()


async def test_silent_agent_goes_offline_after_missed_heartbeats(
    start_vmserver: Callable[..., VmServer],
) -> None:
    server = start_vmserver(heartbeat_interval=0.3)
    vm, token = await sync_to_async(vm_with_token)("quiet")
    pinging_vm, pinging_token = await sync_to_async(vm_with_token)("alive")
    silent = await authorized_wire(server.port, vm.pk, token)
    alive = await authorized_wire(server.port, pinging_vm.pk, pinging_token)

    async def keep_pinging() -> None:
        while True:
            await alive.send({"type": "ping"})
            await asyncio.sleep(0.1)

    pinger = asyncio.create_task(keep_pinging())
    try:
        await asyncio.sleep(0.5)  # well inside the 0.9 s window: still authorized
        assert vm.pk in (await listed())["authorized"]
        assert await silent.closed_by_server(wait=10)
        state = await lists_become(
            {
                "connected": {pinging_vm.pk},
                "authorized": {pinging_vm.pk},
                "ever_connected": {vm.pk, pinging_vm.pk},
            }
        )
        assert vm.pk not in state["connected"]
        assert pinging_vm.pk in state["authorized"]
        session = await sync_to_async(AgentSession.objects.get)(vm=vm)
        assert session.end_reason == "heartbeat_timeout"
        assert any(f.get("code") == "timeout" for f in silent.unsolicited)
    finally:
        pinger.cancel()
        await alive.close()


async def test_closed_socket_goes_offline_at_once(start_vmserver: Callable[..., VmServer]) -> None:
    server = start_vmserver(heartbeat_interval=30)  # a heartbeat timeout cannot be the cause
    vm, token = await sync_to_async(vm_with_token)("gone")
    wire = await authorized_wire(server.port, vm.pk, token)
    await wire.close()
    state = await lists_become(
        {"connected": set(), "authorized": set(), "ever_connected": {vm.pk}}, wait=5
    )
    assert state["connected"] == set()


async def test_silent_unauthenticated_socket_is_dropped_and_counted_not_stored(
    start_vmserver: Callable[..., VmServer],
) -> None:
    from prometheus_client import REGISTRY

    def timed_out() -> float:
        return (
            REGISTRY.get_sample_value(
                "vmcontrol_unauthenticated_sessions_total", {"reason": "auth_timeout"}
            )
            or 0.0
        )

    before = timed_out()
    server = start_vmserver(auth_timeout=0.4)
    silent = await Wire.open(server.port)
    assert await silent.closed_by_server(wait=10)
    assert any(f.get("code") == "timeout" for f in silent.unsolicited)
    assert await eventually(lambda: _async(timed_out() == before + 1))
    assert await sync_to_async(AgentSession.objects.count)() == 0


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"this is not json\n", "bad_frame"),
        (b"\xff\xfe\n", "bad_frame"),
        (b"[1, 2]\n", "bad_frame"),
        (b'{"no": "type"}\n', "bad_frame"),
        (b'{"type": "teleport"}\n', "unknown_type"),
        (b'{"type": "hello", "protocol": "one"}\n', "bad_frame"),
        (b'{"type": "auth", "vm_id": "1", "token": 5}\n', "bad_frame"),
        (b'{"type": "ping"}\n', "not_authorized"),
        (b'{"type": "result", "id": "x", "ok": true}\n', "not_authorized"),
        (b'{"type": "inventory", "inventory": {}}\n', "not_authorized"),
    ],
)
async def test_bad_frames_get_an_error_and_the_server_keeps_serving(
    vmserver: VmServer, payload: bytes, code: str
) -> None:
    wire = await Wire.open(vmserver.port)
    await wire.send_raw(payload)
    reply = await wire.recv()
    assert reply["type"] == "error" and reply["code"] == code
    assert (await wire.request({"type": "hello", "protocol": 1}))["type"] == "welcome"
    await wire.close()


async def test_oversize_frame_gets_an_error_then_close(vmserver: VmServer) -> None:
    wire = await Wire.open(vmserver.port)
    await wire.send_raw(b'{"type": "hello", "pad": "' + b"x" * 70_000)
    reply = await wire.recv()
    assert reply["code"] == "frame_too_large"
    assert await wire.closed_by_server()
    other = await Wire.open(vmserver.port)
    assert (await other.request({"type": "hello", "protocol": 1}))["type"] == "welcome"
    await other.close()


async def test_wrong_protocol_version_is_refused(vmserver: VmServer) -> None:
    wire = await Wire.open(vmserver.port)
    reply = await wire.request({"type": "hello", "protocol": 99})
    assert reply["code"] == "unsupported_version"
    assert await wire.closed_by_server()


async def test_many_vms_connect_at_once(vmserver: VmServer) -> None:
    pairs = [await sync_to_async(vm_with_token)(f"m{i}") for i in range(40)]
    wires = await asyncio.gather(
        *(authorized_wire(vmserver.port, vm.pk, token) for vm, token in pairs)
    )
    assert (await listed())["authorized"] == {vm.pk for vm, _ in pairs}
    await asyncio.gather(*(w.close() for w in wires))


async def test_status_changes_are_published_to_the_staff_topic(
    vmserver: VmServer, asgi_server: Any
) -> None:
    from websockets.asyncio.client import connect

    from tests.factories import StaffFactory
    from tests.realtime.test_hub import ticket_for

    staff = await sync_to_async(StaffFactory.create)()
    ticket = await ticket_for(asgi_server, staff)
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topic": "vmcontrol.vms"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
        vm, token = await sync_to_async(vm_with_token)("pub")
        wire = await authorized_wire(vmserver.port, vm.pk, token)
        await wire.close()
        seen: list[str] = []
        while len(seen) < 2:
            event = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if event["type"] == "event" and event["payload"]["vm_id"] == vm.pk:
                seen.append(event["payload"]["status"])
        assert seen == ["authorized", "offline"]


async def test_a_new_authorized_connection_replaces_the_old_one_and_the_vm_stays_authorized(
    vmserver: VmServer,
) -> None:
    vm, token = await sync_to_async(vm_with_token)("twice")
    old = await authorized_wire(vmserver.port, vm.pk, token)
    new = await authorized_wire(vmserver.port, vm.pk, token)
    assert await old.closed_by_server()
    sessions = await eventually(
        sync_to_async(lambda: list(AgentSession.objects.filter(vm=vm, end_reason="replaced")))
    )
    assert len(sessions) == 1
    await asyncio.sleep(0.3)
    assert (await listed())["authorized"] == {vm.pk}
    assert (await new.request({"type": "ping"}))["type"] == "pong"
    await new.close()


async def test_pings_are_answered_while_the_shared_sync_thread_is_blocked(
    vmserver: VmServer,
) -> None:
    """The heartbeat path makes no thread hop: with the process-wide thread-sensitive
    executor (where sync_to_async and Channels' DB cleanup run) busy for 3 s, pings still
    get their pongs within 2 s."""
    import time

    vm, token = await sync_to_async(vm_with_token)("hb")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    blocker = asyncio.ensure_future(sync_to_async(time.sleep)(3))
    await asyncio.sleep(0.1)
    try:
        for _ in range(3):
            assert (await wire.request({"type": "ping"}, wait=2))["type"] == "pong"
        assert not blocker.done()
    finally:
        await blocker
        await wire.close()
