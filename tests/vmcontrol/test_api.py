"""Operator REST API over the real ASGI server; PATCH reaches a real agent over TCP through the
channel layer (here the TCP server shares the web server's process and loop, so this runs on
the in-memory layer in the embedded run and on Redis in CI)."""

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header
from tests.vmcontrol.conftest import VmServer, Wire, authorized_wire, eventually
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import AuditEvent, Command, Disk, VirtualMachine

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def api(asgi_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    async with httpx.AsyncClient(
        base_url=f"{asgi_server.http_url}/api/vmcontrol", headers=headers, timeout=20
    ) as client:
        yield client


async def running_agent(port: int, vm_id: int, token: str, **options: Any) -> tuple[Agent, Any]:
    identity = AgentIdentity(
        name="a",
        vm_id=vm_id,
        token=token,
        inventory={"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]},
    )
    agent = Agent("127.0.0.1", port, identity, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.authorized.wait(), 10)

    async def finish() -> None:
        stop.set()
        await asyncio.wait_for(task, 10)

    return agent, finish


async def test_registration_shows_the_token_once_and_stores_only_its_hash(
    api: httpx.AsyncClient,
) -> None:
    created = await api.post(
        "/vms",
        json={
            "name": "db-1",
            "cpu_cores": 4,
            "ram_mb": 8192,
            "disks": [{"name": "root", "size_gb": 50}],
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    token = body["token"]
    assert len(token) >= 43 and body["disks"][0]["name"] == "root"
    vm = await sync_to_async(VirtualMachine.objects.get)(pk=body["id"])
    assert vm.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(
        await sync_to_async(lambda: list(VirtualMachine.objects.values_list()))()
    )
    detail = await api.get(f"/vms/{vm.pk}")
    assert "token" not in detail.json() and token not in detail.text
    listing = await api.get("/vms")
    assert token not in listing.text


async def test_operator_api_is_staff_only(asgi_server: LiveServer) -> None:
    user = await sync_to_async(UserFactory.create)()
    headers = await sync_to_async(auth_header)(user)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as client:
        assert (await client.get("/api/vmcontrol/vms")).status_code == 401
        assert (await client.get("/api/vmcontrol/vms", headers=headers)).status_code == 403


async def test_lists_disks_and_detail_over_rest(api: httpx.AsyncClient, vmserver: VmServer) -> None:
    online, token = await sync_to_async(vm_with_token)("online")
    offline, _ = await sync_to_async(vm_with_token)("offline")
    wire = await authorized_wire(vmserver.port, online.pk, token)

    async def ids(query: str) -> set[int]:
        response = await api.get(f"/vms{query}")
        assert response.status_code == 200
        return {vm["id"] for vm in response.json()["results"]}

    assert await ids("") == {online.pk, offline.pk}
    assert await ids("?filter=connected") == {online.pk}
    assert await ids("?filter=authorized") == {online.pk}
    assert await ids("?filter=ever_connected") == {online.pk}
    assert (await api.get("/vms?filter=nonsense")).status_code == 400
    disks = (await api.get("/disks")).json()["results"]
    assert {(d["vm_id"], d["name"], d["size_gb"]) for d in disks} == {
        (online.pk, "root", 20),
        (offline.pk, "root", 10),
    }
    detail = (await api.get(f"/vms/{online.pk}")).json()
    assert detail["status"] == "authorized" and detail["sessions"][0]["ended_at"] is None
    assert (await api.get("/vms/999999")).status_code == 404
    await wire.close()


async def test_patch_reaches_the_agent_and_is_stored_after_it_acknowledges(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, token = await sync_to_async(vm_with_token)("grow")
    agent, finish = await running_agent(vmserver.port, vm.pk, token)
    try:
        response = await api.patch(
            f"/vms/{vm.pk}",
            json={
                "cpu_cores": 6,
                "ram_mb": 12288,
                "disks": [{"name": "root", "size_gb": 40}, {"name": "logs", "size_gb": 5}],
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["cpu_cores"], body["ram_mb"]) == (6, 12288)
        assert {d["name"]: d["size_gb"] for d in body["disks"]} == {"root": 40, "logs": 5}
        assert agent.identity.inventory["cpu_cores"] == 6  # the agent applied it
        command = await sync_to_async(Command.objects.get)(vm=vm)
        assert command.status == "succeeded" and command.sent_at and command.finished_at
        commands = (await api.get(f"/vms/{vm.pk}/commands")).json()["results"]
        assert [c["status"] for c in commands] == ["succeeded"]
    finally:
        await finish()


async def test_under_a_stress_loop_every_finished_command_was_sent_before_it_finished(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    """Issue 13 item 1: the agent answers as fast as it can, so its answer often lands before
    the operator's side has marked the command `sent`; every finished command must still say
    when it was sent, and not after it finished. Bounded in rounds and in time."""
    vm, token = await sync_to_async(vm_with_token)("stress")
    agent, finish = await running_agent(vmserver.port, vm.pk, token)
    rounds, deadline = 0, time.monotonic() + 25
    try:
        while rounds < 120 and time.monotonic() < deadline:
            cpu = 1 + rounds % 8
            response = await api.patch(f"/vms/{vm.pk}", json={"cpu_cores": cpu})
            assert response.status_code == 200, response.text
            assert agent.identity.inventory["cpu_cores"] == cpu
            rounds += 1
    finally:
        await finish()
    commands = await sync_to_async(
        lambda: list(Command.objects.filter(vm=vm).values_list("status", "sent_at", "finished_at"))
    )()
    assert rounds >= 20 and len(commands) == rounds, (rounds, len(commands))
    broken = [
        (status, sent_at, finished_at)
        for status, sent_at, finished_at in commands
        if status != "succeeded" or sent_at is None or finished_at is None or sent_at > finished_at
    ]
    assert broken == [], f"{len(broken)} of {rounds} commands: {broken[:5]}"


async def test_specs_pushed_to_an_agent_survive_an_operator_logout_and_its_reauth(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    """Found by the newcomer walk: after `vmctl update` then `vmctl logout`, the agent
    authorized again on its connection and the VM went back to the specs of its hello."""
    vm, token = await sync_to_async(vm_with_token)("keeps-specs")
    agent, finish = await running_agent(vmserver.port, vm.pk, token)
    try:
        response = await api.patch(f"/vms/{vm.pk}", json={"cpu_cores": 6, "ram_mb": 6144})
        assert response.status_code == 200, response.text
        assert (await api.post(f"/vms/{vm.pk}/logout")).status_code == 200
        deadline = time.monotonic() + 10
        while True:
            body = (await api.get(f"/vms/{vm.pk}")).json()
            if body["status"] == "authorized" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "authorized"
        assert (body["cpu_cores"], body["ram_mb"]) == (6, 6144)
        assert agent.identity.inventory["cpu_cores"] == 6
    finally:
        await finish()


async def test_patch_of_a_vm_that_is_not_authorized_is_409(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, _ = await sync_to_async(vm_with_token)("idle")
    response = await api.patch(f"/vms/{vm.pk}", json={"cpu_cores": 3})
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_authorized"
    wire = await Wire.open(vmserver.port)  # connected but not authorized: still 409
    await wire.request({"type": "hello", "protocol": 1, "vm_id": vm.pk})
    response = await api.patch(f"/vms/{vm.pk}", json={"cpu_cores": 3})
    assert response.status_code == 409
    await vm.arefresh_from_db()
    assert vm.cpu_cores == 1
    await wire.close()


async def test_patch_is_504_when_the_agent_does_not_answer_and_nothing_is_stored(
    api: httpx.AsyncClient, vmserver: VmServer, settings: Any
) -> None:
    settings.VMCONTROL_COMMAND_TIMEOUT_SECONDS = 1.0
    vm, token = await sync_to_async(vm_with_token)("mute")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    patch = asyncio.create_task(api.patch(f"/vms/{vm.pk}", json={"ram_mb": 999}))
    command = await wire.recv()  # it did reach the agent ...
    assert command["type"] == "command" and command["name"] == "update_specs"
    assert command["args"]["ram_mb"] == 999
    response = await patch  # ... which stays silent
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "agent_timeout"
    # The agent answers after the timeout: the late answer is acknowledged and changes nothing.
    await wire.send({"type": "result", "id": command["id"], "ok": True})
    assert (await wire.recv())["type"] in ("ack", "error")
    await vm.arefresh_from_db()
    assert vm.ram_mb == 2048  # what the agent reported at auth, not the unacknowledged 999
    row = await sync_to_async(Command.objects.get)(vm=vm)
    assert row.status == "timed_out"
    await wire.close()


async def test_agent_refusal_is_reported_and_not_stored(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, token = await sync_to_async(vm_with_token)("refuse")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    patch = asyncio.create_task(api.patch(f"/vms/{vm.pk}", json={"cpu_cores": 64}))
    command = await wire.recv()
    await wire.send(
        {
            "type": "result",
            "id": command["id"],
            "ok": False,
            "error": {"code": "no_capacity", "message": "host is full"},
        }
    )
    response = await patch
    assert response.status_code == 409 and response.json()["error"]["code"] == "command_failed"
    await vm.arefresh_from_db()
    assert vm.cpu_cores == 2  # as reported at auth, not the refused 64
    await wire.close()


async def test_logout_makes_the_agent_authorize_again(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, token = await sync_to_async(vm_with_token)("out")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    response = await api.post(f"/vms/{vm.pk}/logout")
    assert response.status_code == 200 and response.json()["status"] == "connected"
    assert await wire.recv() == {"type": "logout", "reason": "operator"}
    refused = await wire.request({"type": "ping"})
    assert refused["code"] == "not_authorized"
    assert (await api.post(f"/vms/{vm.pk}/logout")).status_code == 409
    again = await wire.request({"type": "auth", "vm_id": vm.pk, "token": token})
    assert again["type"] == "auth_ok"
    assert (await api.get(f"/vms/{vm.pk}")).json()["status"] == "authorized"
    actions = await sync_to_async(
        lambda: list(AuditEvent.objects.filter(vm_id=vm.pk).values_list("action", flat=True))
    )()
    assert "vm.logged_out" in actions
    await wire.close()


async def test_rotate_and_revoke_over_rest(api: httpx.AsyncClient, vmserver: VmServer) -> None:
    vm, old = await sync_to_async(vm_with_token)("keys")
    rotated = await api.post(f"/vms/{vm.pk}/rotate-token")
    assert rotated.status_code == 200
    new = rotated.json()["token"]
    wire = await Wire.open(vmserver.port)
    await wire.request({"type": "hello", "protocol": 1, "vm_id": vm.pk})
    assert (await wire.request({"type": "auth", "vm_id": vm.pk, "token": old}))["type"] == "error"
    assert (await wire.request({"type": "auth", "vm_id": vm.pk, "token": new}))["type"] == (
        "auth_ok"
    )
    revoked = await api.post(f"/vms/{vm.pk}/revoke-token")
    assert revoked.json()["token_revoked"] is True
    assert (await wire.recv())["reason"] == "token_revoked"
    assert (await wire.request({"type": "auth", "vm_id": vm.pk, "token": new}))["type"] == "error"
    await wire.close()


async def test_agent_reconnects_with_backoff_and_jitter_after_a_server_restart(
    start_vmserver: Any,
) -> None:
    server = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("phoenix")
    agent, finish = await running_agent(
        server.port, vm.pk, token, backoff_base=0.1, backoff_cap=0.8
    )
    try:
        port = server.port
        server.stop()
        await asyncio.sleep(1.5)  # several refused attempts while the server is down
        down_attempts = list(agent.attempts[1:])
        assert len(down_attempts) >= 3
        start_vmserver(port=port)
        await asyncio.wait_for(agent.authorized.wait(), 10)

        async def authorized() -> bool:
            await vm.arefresh_from_db()
            return vm.status == "authorized"

        assert await eventually(authorized)
        gaps = [b - a for a, b in itertools.pairwise(down_attempts)]
        assert all(gap <= 0.8 + 0.3 for gap in gaps)  # capped
        assert len({round(g, 3) for g in gaps}) == len(gaps)  # jittered, not a fixed step
    finally:
        await finish()


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    from vmcontrol.agent import backoff_delay

    for attempt in range(8):
        samples = [backoff_delay(attempt, base=0.5, cap=10) for _ in range(300)]
        ceiling = min(10, 0.5 * 2**attempt)
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8 and min(samples) < ceiling * 0.2


async def test_disk_ids_survive_a_patch_that_keeps_the_disk(
    api: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, token = await sync_to_async(vm_with_token)("keep")
    root = await sync_to_async(Disk.objects.get)(vm=vm)
    _, finish = await running_agent(vmserver.port, vm.pk, token)
    try:
        response = await api.patch(
            f"/vms/{vm.pk}", json={"disks": [{"name": "root", "size_gb": 99}]}
        )
        assert response.status_code == 200
        assert response.json()["disks"] == [{"id": root.pk, "name": "root", "size_gb": 99}]
    finally:
        await finish()


def _named(details: Any, field: str) -> bool:
    """Whether a DRF error `details` mapping names `field` (dotted, `disks[0].name`)."""
    node = details
    for part in field.replace("]", "").replace("[", ".").split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "vm\x1b[2J"}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "n" * 65}, "name"),
        ({"name": "ok", "cpu_cores": "\u0663"}, "cpu_cores"),  # Arabic-Indic three
        ({"name": "ok", "cpu_cores": "1_0"}, "cpu_cores"),
        ({"name": "ok", "cpu_cores": "+2"}, "cpu_cores"),
        ({"name": "ok", "cpu_cores": 2.5}, "cpu_cores"),
        ({"name": "ok", "cpu_cores": True}, "cpu_cores"),
        ({"name": "ok", "cpu_cores": 0}, "cpu_cores"),
        ({"name": "ok", "ram_mb": "\uff11\uff10\uff12\uff14"}, "ram_mb"),  # fullwidth 1024
        ({"name": "ok", "ram_mb": 2**63}, "ram_mb"),
        ({"name": "ok", "disks": [{"name": "bell\x07", "size_gb": 1}]}, "disks[0].name"),
        ({"name": "ok", "disks": [{"name": "d", "size_gb": "\u0661\u0660"}]}, "disks[0].size_gb"),
        ({"name": "ok", "disks": [{"name": "d", "size_gb": -1}]}, "disks[0].size_gb"),
        ({"name": "ok", "disks": [{"name": "d", "size_gb": 2**64}]}, "disks[0].size_gb"),
    ],
)
async def test_registration_refuses_what_the_shared_parsers_refuse_naming_the_field(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/vms", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and _named(error["details"], field), error
    assert await sync_to_async(VirtualMachine.objects.count)() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cpu_cores": "\u0663"}, "cpu_cores"),
        ({"ram_mb": "2_048"}, "ram_mb"),
        ({"ram_mb": 2**26 + 1}, "ram_mb"),
        ({"disks": [{"name": "unit\x1fsep", "size_gb": 1}]}, "disks[0].name"),
        ({"disks": [{"name": "d", "size_gb": "1e3"}]}, "disks[0].size_gb"),
    ],
)
async def test_patch_refuses_what_the_shared_parsers_refuse_before_reaching_the_agent(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    vm, _ = await sync_to_async(vm_with_token)("strict")
    response = await api.patch(f"/vms/{vm.pk}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and _named(error["details"], field), error
    assert await sync_to_async(Command.objects.count)() == 0


async def test_issued_tokens_never_start_with_a_dash(api: httpx.AsyncClient) -> None:
    from vmcontrol import services

    created = await api.post("/vms", json={"name": "dash"})
    tokens = [created.json()["token"]]
    for _ in range(20):
        rotated = await api.post(f"/vms/{created.json()['id']}/rotate-token")
        tokens.append(rotated.json()["token"])
    tokens += [services.token_generate()[0] for _ in range(500)]
    assert all(token.startswith("vmc_") for token in tokens)
    assert len(set(tokens)) == len(tokens)
