"""Bad input at the VM agents' TCP door (issue 10 items 2 and 3, `input-policy.md`), over a real
TCP server and the real database: every frame field goes through the shared parsers and a
refusal names the field; frames wrong for the session state are refused by state; a poison
event in the writer's batch hurts only itself; the catch-all answers `internal`, logs once with
the session id and keeps the connection; cleanup runs on every exit path."""

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from prometheus_client import REGISTRY

from tests.vmcontrol.conftest import INVENTORY, VmServer, Wire, authorized_wire, eventually
from tests.vmcontrol.factories import vm_with_token
from vmcontrol import consumers, server
from vmcontrol.bus import vm_group
from vmcontrol.models import AgentSession, Disk, VirtualMachine
from vmcontrol.services import AgentEvent
from vmcontrol.sessions import ServerState

pytestmark = pytest.mark.timeout(90)

ROOT = {"name": "root", "size_gb": 20}


def inventory(**changes: Any) -> dict[str, Any]:
    return {**INVENTORY, **changes}


def one_disk(**changes: Any) -> dict[str, Any]:
    return inventory(disks=[{**ROOT, **changes}])


def payload(frame: dict[str, Any] | bytes) -> bytes:
    # json.dumps escapes lone surrogates as `\udc00`, the form a hostile agent sends.
    return frame if isinstance(frame, bytes) else json.dumps(frame).encode() + b"\n"


@pytest.fixture
def server_states(monkeypatch: pytest.MonkeyPatch) -> list[ServerState]:
    """The state of every server the test starts (to count its sessions and hold its writer)."""
    states: list[ServerState] = []

    class Recorded(ServerState):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            states.append(self)

    monkeypatch.setattr(server, "ServerState", Recorded)
    return states


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@contextlib.asynccontextmanager
async def one_batch(vm: VmServer, state: ServerState) -> AsyncIterator[Callable[..., Any]]:
    """Inside the block the event writer's database thread is held, so every event the agents
    cause is queued; on exit they are applied as one batch. Yields `queued(n)`, which waits
    until n events are waiting."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(30)

    held = asyncio.run_coroutine_threadsafe(state.run_sync(hold), vm.loop)
    await asyncio.to_thread(started.wait, 10)

    async def occupy_the_writer() -> None:
        # The writer takes whatever is queued when it wakes; a no-op event (a logout of no VM)
        # is taken alone and waits behind `hold`, so everything after it forms one batch.
        state.submit(AgentEvent(kind="deauth", session_id=uuid.uuid4()))

        async def taken() -> bool:
            return state.queued_events == 0

        assert await eventually(taken, wait=10, every=0.001)

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(occupy_the_writer(), vm.loop))

    async def queued(count: int) -> None:
        async def enough() -> bool:
            return state.queued_events >= count

        assert await eventually(enough, wait=10, every=0.01), state.queued_events

    try:
        yield queued
    finally:
        gate.set()
        await asyncio.wrap_future(held)


@sync_to_async
def execute(statements: list[str]) -> None:
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


@contextlib.asynccontextmanager
async def disk_named_poison_is_refused_by_the_database() -> AsyncIterator[None]:
    """A trigger that makes the database refuse one disk row: a failure no parser can foresee."""
    if connection.vendor == "postgresql":
        create = [
            """CREATE FUNCTION vmcontrol_test_poison() RETURNS trigger AS $$
               BEGIN IF NEW.name = 'poison' THEN RAISE EXCEPTION 'poison disk'; END IF;
               RETURN NEW; END $$ LANGUAGE plpgsql""",
            """CREATE TRIGGER vmcontrol_test_poison BEFORE INSERT OR UPDATE ON vmcontrol_disk
               FOR EACH ROW EXECUTE FUNCTION vmcontrol_test_poison()""",
        ]
        drop = [
            "DROP TRIGGER IF EXISTS vmcontrol_test_poison ON vmcontrol_disk",
            "DROP FUNCTION IF EXISTS vmcontrol_test_poison()",
        ]
    else:
        create = [
            """CREATE TRIGGER vmcontrol_test_poison BEFORE INSERT ON vmcontrol_disk
               WHEN NEW.name = 'poison' BEGIN SELECT RAISE(ABORT, 'poison disk'); END"""
        ]
        drop = ["DROP TRIGGER IF EXISTS vmcontrol_test_poison"]
    await execute(create)
    try:
        yield
    finally:
        await execute(drop)


# --- every field through the shared parsers ------------------------------------------------

BAD_VALUES = [
    # hello
    pytest.param("pre", {"type": "hello", "protocol": "1"}, "protocol", "type", id="protocol-str"),
    pytest.param(
        "pre", {"type": "hello", "protocol": 1.0}, "protocol", "type", id="protocol-float"
    ),
    pytest.param(
        "pre", {"type": "hello", "protocol": True}, "protocol", "type", id="protocol-bool"
    ),
    pytest.param(
        "pre", {"type": "hello", "protocol": 2**31}, "protocol", "range", id="protocol-big"
    ),
    pytest.param(
        "pre", {"type": "hello", "protocol": 1, "vm_id": 2**63}, "vm_id", "range", id="vm_id-int64"
    ),
    pytest.param(
        "pre", {"type": "hello", "protocol": 1, "vm_id": -1}, "vm_id", "range", id="vm_id-negative"
    ),
    pytest.param(
        "pre", {"type": "hello", "protocol": 1, "vm_id": "٣"}, "vm_id", "type", id="vm_id-arabic"
    ),
    pytest.param(
        "pre",
        {"type": "hello", "protocol": 1, "inventory": []},
        "inventory",
        "type",
        id="inventory-list",
    ),
    pytest.param(
        "pre",
        {"type": "hello", "protocol": 1, "inventory": inventory(cpu_cores=0)},
        "inventory.cpu_cores",
        "range",
        id="hello-cpu-zero",
    ),
    # enroll
    pytest.param(
        "pre",
        {"type": "enroll", "secret": "s\ud800", "inventory": INVENTORY},
        "secret",
        "encoding",
        id="secret-surrogate",
    ),
    pytest.param(
        "pre",
        {"type": "enroll", "secret": "s\x00", "inventory": INVENTORY},
        "secret",
        "control",
        id="secret-nul",
    ),
    pytest.param(
        "pre",
        {"type": "enroll", "secret": "s" * 257, "inventory": INVENTORY},
        "secret",
        "too_long",
        id="secret-long",
    ),
    pytest.param(
        "pre", {"type": "enroll", "inventory": INVENTORY}, "secret", "required", id="secret-missing"
    ),
    pytest.param(
        "pre",
        {"type": "enroll", "secret": "s", "name": "vm\x1b[31m", "inventory": INVENTORY},
        "name",
        "control",
        id="name-escape",
    ),
    pytest.param(
        "pre",
        {"type": "enroll", "secret": "s", "name": "n" * 65, "inventory": INVENTORY},
        "name",
        "too_long",
        id="name-long",
    ),
    pytest.param(
        "pre", {"type": "enroll", "secret": "s"}, "inventory", "required", id="enroll-no-inventory"
    ),
    # auth
    pytest.param("pre", {"type": "auth", "token": "t"}, "vm_id", "required", id="auth-no-vm"),
    pytest.param("pre", {"type": "auth", "vm_id": 1}, "token", "required", id="auth-no-token"),
    pytest.param("pre", {"type": "auth", "vm_id": 1.5, "token": "t"}, "vm_id", "type", id="vm-1.5"),
    pytest.param(
        "pre", {"type": "auth", "vm_id": 1, "token": "tok en"}, "token", "format", id="token-space"
    ),
    pytest.param(
        "pre",
        {"type": "auth", "vm_id": 1, "token": "\udfff"},
        "token",
        "encoding",
        id="token-surrogate",
    ),
    pytest.param("pre", {"type": "auth", "vm_id": 1, "token": 5}, "token", "type", id="token-int"),
    # inventory (the issue's disk name first)
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="\udc00")},
        "inventory.disks[0].name",
        "encoding",
        id="disk-name-lone-low-surrogate",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="x\ud800")},
        "inventory.disks[0].name",
        "encoding",
        id="disk-name-lone-high-surrogate",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="a\x00b")},
        "inventory.disks[0].name",
        "control",
        id="disk-name-nul",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="bell\x07")},
        "inventory.disks[0].name",
        "control",
        id="disk-name-control",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="")},
        "inventory.disks[0].name",
        "blank",
        id="disk-name-empty",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name="d" * 65)},
        "inventory.disks[0].name",
        "too_long",
        id="disk-name-long",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(name=5)},
        "inventory.disks[0].name",
        "type",
        id="disk-name-int",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(size_gb=-1)},
        "inventory.disks[0].size_gb",
        "range",
        id="size-negative",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(size_gb=2**64)},
        "inventory.disks[0].size_gb",
        "range",
        id="size-huge",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(size_gb="10")},
        "inventory.disks[0].size_gb",
        "type",
        id="size-string",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": one_disk(size_gb=1.5)},
        "inventory.disks[0].size_gb",
        "type",
        id="size-float",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": inventory(ram_mb=2**26 + 1)},
        "inventory.ram_mb",
        "range",
        id="ram-over-column-cap",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": inventory(cpu_cores="\u0661")},
        "inventory.cpu_cores",
        "type",
        id="cpu-arabic-indic",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": inventory(disks="root")},
        "inventory.disks",
        "type",
        id="disks-string",
    ),
    pytest.param(
        "post",
        {
            "type": "inventory",
            "inventory": inventory(disks=[{"name": f"d{i}", "size_gb": 1} for i in range(65)]),
        },
        "inventory.disks",
        "too_long",
        id="disks-too-many",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": inventory(disks=[1])},
        "inventory.disks[0]",
        "type",
        id="disk-not-object",
    ),
    pytest.param(
        "post",
        {"type": "inventory", "inventory": inventory(disks=[ROOT, ROOT])},
        "inventory.disks",
        "format",
        id="disk-names-repeat",
    ),
    pytest.param("post", {"type": "inventory"}, "inventory", "required", id="inventory-missing"),
    # result
    pytest.param(
        "post",
        {"type": "result", "id": "c1", "ok": "yes"},
        "ok",
        "type",
        id="ok-string",
    ),
    pytest.param(
        "post",
        {"type": "result", "id": "c1", "ok": True, "data": []},
        "data",
        "type",
        id="data-list",
    ),
    pytest.param(
        "post",
        {"type": "result", "id": "c1", "ok": False, "error": {"message": "m\x00"}},
        "error.message",
        "control",
        id="error-message-nul",
    ),
    pytest.param(
        "post",
        {"type": "result", "id": "c1", "ok": False, "error": {"code": 5}},
        "error.code",
        "type",
        id="error-code-int",
    ),
    pytest.param(
        "post", {"type": "result", "id": None, "ok": True}, "id", "required", id="result-no-id"
    ),
    # the frame itself, its type and its id
    pytest.param(
        "pre",
        b'{"type":"ping","x":' + b"[" * 200 + b"]" * 200 + b"}\n",
        "frame",
        "too_deep",
        id="deep-nesting",
    ),
    pytest.param("pre", b'{"type":"hello","protocol":NaN}\n', "frame", "format", id="nan"),
    pytest.param("pre", b'{"type":"hello","\\u0000":1}\n', "frame", "control", id="nul-key"),
    pytest.param("pre", b'\xff\xfe{"type":"ping"}\n', "frame", "encoding", id="not-utf8"),
    pytest.param("pre", b'"hello"\n', "frame", "type", id="not-an-object"),
    pytest.param("pre", b'{"type":"hel', "frame", "format", id="truncated"),
    pytest.param("pre", {"type": 5}, "type", "type", id="type-int"),
    pytest.param("pre", {"protocol": 1}, "type", "required", id="type-missing"),
    pytest.param("pre", {"type": "hel\ud800lo"}, "type", "encoding", id="type-surrogate"),
    pytest.param("pre", {"type": "ping", "id": "\ud800"}, "id", "encoding", id="id-surrogate"),
    pytest.param("pre", {"type": "ping", "id": "r\x00"}, "id", "control", id="id-nul"),
    pytest.param("pre", {"type": "ping", "id": "x" * 65}, "id", "too_long", id="id-long"),
    pytest.param("pre", {"type": "ping", "id": "a b"}, "id", "format", id="id-space"),
    pytest.param("pre", {"type": "ping", "id": 1.5}, "id", "type", id="id-float"),
    pytest.param("pre", {"type": "ping", "id": True}, "id", "type", id="id-bool"),
    pytest.param("pre", {"type": "ping", "id": {}}, "id", "type", id="id-object"),
    pytest.param("pre", {"type": "ping", "id": -1}, "id", "range", id="id-negative"),
    pytest.param("pre", {"type": "ping", "id": 2**63}, "id", "range", id="id-beyond-int64"),
]


@pytest.mark.parametrize(("stage", "frame", "field", "reason"), BAD_VALUES)
async def test_a_bad_value_in_any_field_is_refused_naming_it_and_the_connection_stays_open(
    vmserver: VmServer,
    stage: str,
    frame: dict[str, Any] | bytes,
    field: str,
    reason: str,
) -> None:
    if stage == "post":
        vm, token = await sync_to_async(vm_with_token)("bad-input")
        wire = await authorized_wire(vmserver.port, vm.pk, token)
    else:
        wire = await Wire.open(vmserver.port)
    # A request with a valid id gets it back; an invalid or missing id is not echoed.
    echo = None
    if isinstance(frame, dict):
        frame = {"id": "r1", **frame}
        echo = None if field == "id" else frame["id"]
    if isinstance(frame, bytes):
        frame = frame if frame.endswith(b"\n") else frame + b"\n"
    await wire.send_raw(payload(frame))
    reply = await wire.recv()
    assert reply["type"] == "error" and reply["code"] == "bad_frame", reply
    assert (reply["field"], reply["reason"]) == (field, reason), reply
    assert reply["message"].startswith(f"{field}: ")
    assert reply.get("id") == echo
    after: dict[str, Any] = (
        {"type": "ping"} if stage == "post" else {"type": "hello", "protocol": 1}
    )
    assert (await wire.request(after))["type"] in ("pong", "welcome")
    await wire.close()


async def test_the_issue_disk_name_is_refused_with_the_requests_id_and_stores_nothing(
    vmserver: VmServer,
) -> None:
    vm, token = await sync_to_async(vm_with_token)("issue-10-2")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    await wire.send_raw(
        b'{"type":"inventory","id":"inv-1","inventory":{"cpu_cores":2,"ram_mb":2048,'
        b'"disks":[{"name":"\\udc00","size_gb":1}]}}\n'
    )
    reply = await wire.recv()
    assert reply == {
        "type": "error",
        "code": "bad_frame",
        "id": "inv-1",
        "field": "inventory.disks[0].name",
        "reason": "encoding",
        "message": "inventory.disks[0].name: contains a lone UTF-16 surrogate (not valid Unicode)",
    }
    assert await sync_to_async(
        lambda: list(Disk.objects.filter(vm=vm).values_list("name", flat=True))
    )() == ["root"]
    assert (await wire.request({"type": "ping"}))["type"] == "pong"
    await wire.close()


# --- frames wrong for the session state ----------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "frame", "code"),
    [
        # the issue's case: a second auth, without id, after auth_ok
        ("post", {"type": "auth", "vm_id": "$vm", "token": "$token"}, "already_authorized"),
        (
            "post",
            {"type": "auth", "id": "a2", "vm_id": "$vm", "token": "$token"},
            "already_authorized",
        ),
        ("post", {"type": "auth", "vm_id": "$vm", "token": "wrong"}, "already_authorized"),
        (
            "post",
            {"type": "enroll", "id": "e1", "secret": "s", "inventory": INVENTORY},
            "already_authorized",
        ),
        ("post", {"type": "result", "id": "no-such-command", "ok": True}, "unknown_command"),
        ("post", {"type": "result", "id": 7, "ok": False}, "unknown_command"),
        ("pre", {"type": "ping"}, "not_authorized"),
        ("pre", {"type": "logout"}, "not_authorized"),
        ("pre", {"type": "inventory", "inventory": INVENTORY}, "not_authorized"),
        ("pre", {"type": "result", "id": "c", "ok": True}, "not_authorized"),
        ("logged_out", {"type": "inventory", "id": "i1", "inventory": INVENTORY}, "not_authorized"),
        ("logged_out", {"type": "logout"}, "not_authorized"),
    ],
)
async def test_a_frame_wrong_for_the_session_state_is_refused_by_state_never_by_a_crash(
    vmserver: VmServer, stage: str, frame: dict[str, Any], code: str
) -> None:
    vm, token = await sync_to_async(vm_with_token)("state")
    if stage == "pre":
        wire = await Wire.open(vmserver.port)
    else:
        wire = await authorized_wire(vmserver.port, vm.pk, token)
        if stage == "logged_out":
            assert (await wire.request({"type": "logout"}))["type"] == "logged_out"
    placeholders = {"$vm": vm.pk, "$token": token}
    frame = {
        key: placeholders[value] if isinstance(value, str) and value in placeholders else value
        for key, value in frame.items()
    }
    await wire.send(frame)
    reply = await wire.recv()
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply.get("id") == frame.get("id")
    assert (await sync_to_async(VirtualMachine.objects.count)()) == 1  # nothing enrolled
    if stage == "post":
        assert (await wire.request({"type": "ping"}))["type"] == "pong"
        await vm.arefresh_from_db()
        assert vm.status == "authorized"
    else:
        assert (await wire.request({"type": "hello", "protocol": 1}))["type"] == "welcome"
    await wire.close()


# --- a poison input hurts only itself -------------------------------------------------------


@pytest.mark.parametrize("name", ["\udc00", "\ud800", "a\x00b"], ids=["low", "high", "nul"])
async def test_a_poison_inventory_leaves_another_agents_auth_and_its_batch_intact(
    start_vmserver: Callable[..., VmServer], server_states: list[ServerState], name: str
) -> None:
    """Issue 10 item 2: the poison inventory and a good auth reach the server together, while
    another agent connects and a third disconnects (their session open and end events)."""
    vmserver = start_vmserver()
    state = server_states[-1]
    good, good_token = await sync_to_async(vm_with_token)("good")
    bad, bad_token = await sync_to_async(vm_with_token)("bad")
    leaving, leaving_token = await sync_to_async(vm_with_token)("leaving")
    poisoner = await authorized_wire(vmserver.port, bad.pk, bad_token)
    leaver = await authorized_wire(vmserver.port, leaving.pk, leaving_token)
    good_wire = await Wire.open(vmserver.port)
    await good_wire.request({"type": "hello", "protocol": 1, "vm_id": good.pk})

    async with one_batch(vmserver, state) as queued:
        await poisoner.send({"type": "inventory", "id": "p1", "inventory": one_disk(name=name)})
        await good_wire.send({"type": "auth", "id": "g1", "vm_id": good.pk, "token": good_token})
        newcomer = await Wire.open(vmserver.port)
        await leaver.close()
        # auth, end (the poison never becomes an event; the newcomer, not authorized, none)
        await queued(2)

    refused = await poisoner.recv()
    assert refused["code"] == "bad_frame" and refused["id"] == "p1"
    assert refused["field"] == "inventory.disks[0].name"
    assert (await good_wire.recv()) == {"type": "auth_ok", "id": "g1", "vm_id": good.pk}

    async def sessions() -> tuple[int, str]:
        return await sync_to_async(
            lambda: (
                AgentSession.objects.count(),
                AgentSession.objects.get(vm=leaving).end_reason,
            )
        )()

    assert await eventually(lambda: _equals(sessions, (3, "closed")))
    await leaving.arefresh_from_db()
    assert leaving.status == "offline"
    assert (await poisoner.request({"type": "ping"}))["type"] == "pong"
    for wire in (poisoner, good_wire, newcomer):
        await wire.close()


async def _equals(check: Callable[[], Any], expected: Any) -> bool:
    return bool(await check() == expected)


async def test_an_event_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_applied(
    start_vmserver: Callable[..., VmServer], server_states: list[ServerState]
) -> None:
    vmserver = start_vmserver()
    state = server_states[-1]
    good, good_token = await sync_to_async(vm_with_token)("good")
    bad, bad_token = await sync_to_async(vm_with_token)("bad")
    leaving, leaving_token = await sync_to_async(vm_with_token)("leaving")
    poisoner = await authorized_wire(vmserver.port, bad.pk, bad_token)
    leaver = await authorized_wire(vmserver.port, leaving.pk, leaving_token)
    good_wire = await Wire.open(vmserver.port)
    await good_wire.request({"type": "hello", "protocol": 1, "vm_id": good.pk})

    async with disk_named_poison_is_refused_by_the_database():
        async with one_batch(vmserver, state) as queued:
            await poisoner.send(
                {"type": "inventory", "id": "p1", "inventory": one_disk(name="poison")}
            )
            await good_wire.send(
                {"type": "auth", "id": "g1", "vm_id": good.pk, "token": good_token}
            )
            newcomer = await Wire.open(vmserver.port)
            await leaver.close()
            await queued(3)  # inventory, auth, end

        failed = await poisoner.recv()
        assert failed["type"] == "error" and failed["code"] == "internal" and failed["id"] == "p1"
        assert "poison" not in failed["message"]  # no internals reach the agent
        assert (await good_wire.recv()) == {"type": "auth_ok", "id": "g1", "vm_id": good.pk}

    async def sessions() -> tuple[int, str]:
        return await sync_to_async(
            lambda: (
                AgentSession.objects.count(),
                AgentSession.objects.get(vm=leaving).end_reason,
            )
        )()

    assert await eventually(lambda: _equals(sessions, (3, "closed")))
    await good.arefresh_from_db()
    await leaving.arefresh_from_db()
    assert (good.status, leaving.status) == ("authorized", "offline")
    assert await sync_to_async(
        lambda: list(Disk.objects.filter(vm=bad).values_list("name", flat=True))
    )() == ["root"]
    assert (await poisoner.request({"type": "ping"}))["type"] == "pong"
    for wire in (poisoner, good_wire, newcomer):
        await wire.close()


async def test_last_seen_times_of_other_vms_are_written_when_one_vms_row_is_refused(
    start_vmserver: Callable[..., VmServer],
) -> None:
    vmserver = start_vmserver(flush_interval=1.0)
    stuck, stuck_token = await sync_to_async(vm_with_token)("stuck")
    fine, fine_token = await sync_to_async(vm_with_token)("fine")
    wires = [
        await authorized_wire(vmserver.port, stuck.pk, stuck_token),
        await authorized_wire(vmserver.port, fine.pk, fine_token),
    ]
    await stuck.arefresh_from_db()
    await fine.arefresh_from_db()
    stuck_before, fine_before = stuck.last_seen_at, fine.last_seen_at
    assert stuck_before is not None and fine_before is not None
    async with last_seen_of_vm_is_refused_by_the_database(stuck.pk):
        await asyncio.sleep(1.1)  # the next pings fall in a later second than the auths
        # Back to back, so both land in one flush and one statement, which the trigger fails.
        for wire in wires:
            await wire.send({"type": "ping"})
        for wire in wires:
            assert (await wire.recv())["type"] == "pong"

        async def fine_seen() -> bool:
            await fine.arefresh_from_db()
            return bool(fine.last_seen_at and fine.last_seen_at > fine_before)

        assert await eventually(fine_seen)
        await stuck.arefresh_from_db()
        assert stuck.last_seen_at == stuck_before
    for wire in wires:
        await wire.close()


@contextlib.asynccontextmanager
async def last_seen_of_vm_is_refused_by_the_database(vm_id: int) -> AsyncIterator[None]:
    if connection.vendor == "postgresql":
        create = [
            f"""CREATE FUNCTION vmcontrol_test_stuck() RETURNS trigger AS $$
               BEGIN IF NEW.id = {int(vm_id)} AND NEW.last_seen_at IS DISTINCT FROM
               OLD.last_seen_at THEN RAISE EXCEPTION 'stuck'; END IF; RETURN NEW; END $$
               LANGUAGE plpgsql""",
            """CREATE TRIGGER vmcontrol_test_stuck BEFORE UPDATE ON vmcontrol_virtualmachine
               FOR EACH ROW EXECUTE FUNCTION vmcontrol_test_stuck()""",
        ]
        drop = [
            "DROP TRIGGER IF EXISTS vmcontrol_test_stuck ON vmcontrol_virtualmachine",
            "DROP FUNCTION IF EXISTS vmcontrol_test_stuck()",
        ]
    else:
        create = [
            f"""CREATE TRIGGER vmcontrol_test_stuck BEFORE UPDATE OF last_seen_at
               ON vmcontrol_virtualmachine WHEN NEW.id = {int(vm_id)}
               BEGIN SELECT RAISE(ABORT, 'stuck'); END"""
        ]
        drop = ["DROP TRIGGER IF EXISTS vmcontrol_test_stuck"]
    await execute(create)
    try:
        yield
    finally:
        await execute(drop)


# --- the catch-all, cleanup on every exit path, failed writes -------------------------------


def failure_logs(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == event
    ]


async def test_an_unexpected_exception_is_answered_internal_logged_once_and_the_session_goes_on(
    vmserver: VmServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vm, token = await sync_to_async(vm_with_token)("boom")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    welcome_session = await sync_to_async(lambda: str(AgentSession.objects.get(vm=vm).pk))()
    original = consumers.AgentConsumer.on_ping
    calls = 0

    async def explode_once(self: consumers.AgentConsumer, frame: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("secret internals")
        await original(self, frame)

    monkeypatch.setattr(consumers.AgentConsumer, "on_ping", explode_once)
    reply = await wire.request({"type": "ping"})
    assert reply["type"] == "error" and reply["code"] == "internal"
    assert "secret" not in reply["message"] and "RuntimeError" not in reply["message"]
    assert (await wire.request({"type": "ping"}))["type"] == "pong"  # the session goes on
    logged = failure_logs(caplog, "vmcontrol_frame_failed")
    assert len(logged) == 1
    assert logged[0]["session_id"] == welcome_session == logged[0]["request_id"]
    assert logged[0]["vm_id"] == vm.pk
    await wire.close()

    async def ended() -> bool:
        return await sync_to_async(
            lambda: AgentSession.objects.filter(pk=welcome_session, ended_at__isnull=False).exists()
        )()

    assert await eventually(ended)


async def test_cleanup_runs_when_a_step_of_it_fails(
    start_vmserver: Callable[..., VmServer],
    server_states: list[ServerState],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The channel layer failing at disconnect (Redis gone) still ends the session, takes the
    VM offline and restores the gauges."""
    connections, authorized = (
        gauge("vmcontrol_connections"),
        gauge("vmcontrol_authorized_connections"),
    )
    vmserver = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("cleanup")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    layer = get_channel_layer()

    async def unavailable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("channel layer down")

    monkeypatch.setattr(layer, "group_discard", unavailable)
    await wire.close()

    async def offline() -> bool:
        await vm.arefresh_from_db()
        return vm.status == "offline"

    assert await eventually(offline)
    session = await sync_to_async(AgentSession.objects.get)(vm=vm)
    assert session.ended_at is not None and session.end_reason == "closed"
    assert server_states[-1].connections == {}
    assert gauge("vmcontrol_connections") == connections
    assert gauge("vmcontrol_authorized_connections") == authorized
    assert len(failure_logs(caplog, "vmcontrol_cleanup_failed")) == 1


async def test_a_malformed_channel_layer_message_is_logged_and_the_session_goes_on(
    vmserver: VmServer, caplog: pytest.LogCaptureFixture
) -> None:
    vm, token = await sync_to_async(vm_with_token)("layer")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    layer = get_channel_layer()
    assert layer is not None
    await layer.group_send(vm_group(vm.pk), {"type": "vm.command"})  # no command id

    async def logged() -> bool:
        return bool(failure_logs(caplog, "vmcontrol_message_failed"))

    assert await eventually(logged)
    assert (await wire.request({"type": "ping"}))["type"] == "pong"
    await vm.arefresh_from_db()
    assert vm.status == "authorized"
    await wire.close()


async def test_a_failed_write_closes_the_connection_and_ends_the_session(
    vmserver: VmServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vm, token = await sync_to_async(vm_with_token)("mute")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    encode = consumers.encode_frame

    def refuse_pongs(frame: dict[str, Any]) -> bytes:
        if frame["type"] == "pong":
            raise ValueError("cannot encode")
        return encode(frame)

    monkeypatch.setattr(consumers, "encode_frame", refuse_pongs)
    await wire.send({"type": "ping", "id": "p1"})
    assert await wire.closed_by_server()
    assert wire.unsolicited == []

    async def ended() -> str:
        return await sync_to_async(lambda: AgentSession.objects.get(vm=vm).end_reason)()

    assert await eventually(lambda: _equals(ended, "server_error"))
    await vm.arefresh_from_db()
    assert vm.status == "offline"
    assert len(failure_logs(caplog, "vmcontrol_write_failed")) == 1
    other = await authorized_wire(vmserver.port, vm.pk, token)  # the agent reconnects
    await other.close()
