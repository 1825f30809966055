"""Issue 11 item 12 (vmcontrol): a VM's status is owned by its live session. A TCP server
renews a lease row; when the server process is SIGKILLed its VMs show offline on REST, the
console and the admin within VMCONTROL_SERVER_LEASE_TTL_SECONDS, commands to them are refused (409)
instead of timing out, and a reaper (any other server, or the beat task) closes the rows and
publishes the change. A live server's VMs never flicker offline, even with its event writer
stalled; a server whose lease was reaped drops its sessions and the agents come back."""

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import import_module
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.core.management import call_command
from django.db import transaction

from tests.conftest import LiveServer
from tests.factories import StaffFactory, auth_header
from tests.vmcontrol.conftest import (
    VmServer,
    authorized_wire,
    eventually,
    free_port,
    manage,
    test_database_url,
    wait_port,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol import selectors, server, services, tasks
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import AgentSession, ServerLease, VirtualMachine
from vmcontrol.sessions import ServerState

pytestmark = pytest.mark.timeout(120)

LEASE_TTL = 2.0
FIGURES: dict[str, float] = {}


@pytest.fixture
def server_states(monkeypatch: pytest.MonkeyPatch) -> list[ServerState]:
    states: list[ServerState] = []

    class Recorded(ServerState):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            states.append(self)

    monkeypatch.setattr(server, "ServerState", Recorded)
    return states


@pytest.fixture
def killable_server(asgi_server: LiveServer) -> Iterator[Callable[[], Any]]:
    """`run_vmcontrol_server` in its own process (lease TTL 2 s); yields a starter returning
    (process, port)."""
    children: list[Any] = []

    def start() -> tuple[Any, int]:
        port = free_port()
        child = manage(
            ["run_vmcontrol_server", "--host", "127.0.0.1", "--port", str(port)],
            {
                "DATABASE_URL": test_database_url(),
                "VMCONTROL_SERVER_NAME": "doomed-1",
                "VMCONTROL_SERVER_LEASE_TTL_SECONDS": str(LEASE_TTL),
            },
        )
        children.append(child)
        wait_port(port)
        return child, port

    yield start
    for child in children:
        child.kill()
        child.wait(10)


@pytest.fixture
async def staff_clients(asgi_server: LiveServer) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A REST client (staff token) and an admin client (an operator's session cookie)."""
    staff = await sync_to_async(StaffFactory.create)(is_superuser=True)
    headers = await sync_to_async(auth_header)(staff)

    def session_cookie() -> str:
        # A logged-in session made directly (as `Client.force_login` does, without its fake
        # request, which carries no client address).
        session = import_module(settings.SESSION_ENGINE).SessionStore()
        session[SESSION_KEY] = str(staff.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = staff.get_session_auth_hash()
        session.save()
        return str(session.session_key)

    cookie = await sync_to_async(session_cookie)()
    async with (
        httpx.AsyncClient(base_url=asgi_server.http_url, headers=headers, timeout=20) as api,
        httpx.AsyncClient(
            base_url=asgi_server.http_url, cookies={"sessionid": cookie}, timeout=20
        ) as admin,
    ):
        yield api, admin


def vmctl(api: httpx.AsyncClient, *args: str) -> str:
    """The console, as the REST client it is, with the REST client's server and token."""
    import io

    token = api.headers["Authorization"].split()[1]
    out = io.StringIO()
    call_command("vmctl", "--url", str(api.base_url), "--token", token, *args, stdout=out)
    return out.getvalue()


async def shown_everywhere(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, vm: VirtualMachine
) -> dict[str, Any]:
    """The VM's status as REST, the console and the admin show it."""
    detail = (await api.get(f"/api/vmcontrol/vms/{vm.pk}")).json()["status"]
    authorized = await api.get("/api/vmcontrol/vms", params={"filter": "authorized"})
    listing = await sync_to_async(vmctl)(api, "list")
    row = next(line for line in listing.splitlines() if f" {vm.name} " in line)
    changelist = await admin.get("/admin/vmcontrol/virtualmachine/")
    assert changelist.status_code == 200, changelist.text[:500]
    admin_status = next(
        (
            status
            for status in ("authorized", "connected", "offline")
            if f'<td class="field-live_status">{status}</td>' in changelist.text
        ),
        changelist.text,
    )
    return {
        "rest": detail,
        "rest_authorized_ids": [v["id"] for v in authorized.json()["results"]],
        "console": next(s for s in ("authorized", "connected", "offline") if f" {s} " in row),
        "console_authorized": vm.name in await sync_to_async(vmctl)(api, "list", "--authorized"),
        "admin": admin_status,
    }


@contextlib.asynccontextmanager
async def staff_topic(asgi_server: LiveServer) -> AsyncIterator[Any]:
    from websockets.asyncio.client import connect

    from tests.realtime.test_hub import ticket_for

    staff = await sync_to_async(StaffFactory.create)()
    ticket = await ticket_for(asgi_server, staff)
    async with connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topic": "vmcontrol.vms"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
        yield ws


async def status_event(ws: Any, vm_id: int, status: str, wait: float = 10) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            event = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        except TimeoutError:
            return False
        payload = event.get("payload") or {}
        if event["type"] == "event" and (payload.get("vm_id"), payload.get("status")) == (
            vm_id,
            status,
        ):
            return True
    return False


@pytest.mark.parametrize("reaper", ["another_server", "beat_task"])
async def test_a_sigkilled_servers_vms_go_offline_within_the_lease_ttl_everywhere(
    asgi_server: LiveServer,
    killable_server: Callable[[], Any],
    staff_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    start_vmserver: Callable[..., VmServer],
    reaper: str,
) -> None:
    api, admin = staff_clients
    vm, token = await sync_to_async(vm_with_token)("kill-me")
    child, port = await sync_to_async(killable_server)()
    wire = await authorized_wire(port, vm.pk, token)
    online = await shown_everywhere(api, admin, vm)
    assert online == {
        "rest": "authorized",
        "rest_authorized_ids": [vm.pk],
        "console": "authorized",
        "console_authorized": True,
        "admin": "authorized",
    }

    child.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.to_thread(child.wait, 10)

    async def offline_on_rest() -> bool:
        return (await api.get(f"/api/vmcontrol/vms/{vm.pk}")).json()["status"] == "offline"

    assert await eventually(offline_on_rest, wait=LEASE_TTL + 5, every=0.05)
    took = time.monotonic() - killed_at
    FIGURES["sigkill_to_offline_s"] = round(took, 2)
    print(f"\nSIGKILL -> offline on REST in {took:.2f} s (lease TTL {LEASE_TTL} s)")
    assert took <= LEASE_TTL + 1.0  # the TTL, plus polling and one REST round trip
    assert await shown_everywhere(api, admin, vm) == {
        "rest": "offline",
        "rest_authorized_ids": [],
        "console": "offline",
        "console_authorized": False,
        "admin": "offline",
    }
    # Operator actions meet the live status: refused at once, not a 504 after the timeout.
    patch = await api.patch(f"/api/vmcontrol/vms/{vm.pk}", json={"cpu_cores": 3})
    assert patch.status_code == 409 and patch.json()["error"]["code"] == "not_authorized"
    assert (await api.post(f"/api/vmcontrol/vms/{vm.pk}/logout")).status_code == 409

    # Before a reaper runs, the rows still say what the dead server last wrote ...
    session = await sync_to_async(AgentSession.objects.get)(vm=vm)
    assert session.ended_at is None
    async with staff_topic(asgi_server) as ws:
        # ... then a reaper closes them and publishes the VM going offline.
        if reaper == "another_server":
            start_vmserver(server_name="survivor-1", lease_ttl=LEASE_TTL)
        else:
            assert await sync_to_async(tasks.sessions_reap)() == 1
        assert await status_event(ws, vm.pk, "offline")
    await session.arefresh_from_db()
    await vm.arefresh_from_db()
    assert (session.end_reason, vm.status) == ("server_lost", "offline")
    assert session.ended_at is not None
    assert not await sync_to_async(ServerLease.objects.filter(name="doomed-1").exists)()
    await wire.close()


async def test_a_live_servers_vms_stay_authorized_while_its_event_writer_is_stalled(
    start_vmserver: Callable[..., VmServer], server_states: list[ServerState]
) -> None:
    """The lease is renewed off the event writer's thread: with the writer held for three
    lease periods, the VM never shows offline."""
    vmserver = start_vmserver(lease_ttl=1.0, heartbeat_interval=30.0)  # a quiet agent is fine
    state = server_states[-1]
    vm, token = await sync_to_async(vm_with_token)("steady")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(30)

    held = asyncio.run_coroutine_threadsafe(state.run_sync(hold), vmserver.loop)
    await asyncio.to_thread(started.wait, 10)
    seen: set[str] = set()
    try:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            seen.add(await sync_to_async(selectors.vm_live_status)(vm_id=vm.pk))
            await asyncio.sleep(0.05)
    finally:
        gate.set()
        await asyncio.wrap_future(held)
    assert seen == {"authorized"}
    assert (await wire.request({"type": "ping"}))["type"] == "pong"
    await wire.close()


async def test_a_server_whose_lease_was_reaped_drops_its_sessions_and_the_agent_comes_back(
    start_vmserver: Callable[..., VmServer],
) -> None:
    vmserver = start_vmserver(lease_ttl=0.6)
    vm, token = await sync_to_async(vm_with_token)("cut-off")
    agent = Agent(
        "127.0.0.1",
        vmserver.port,
        AgentIdentity(name="c", vm_id=vm.pk, token=token),
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.authorized.wait(), 10)
        first = await sync_to_async(AgentSession.objects.get)(vm=vm)

        @sync_to_async
        def lease_lapses_and_is_reaped() -> int:
            # What another process sees after this server stalled past its TTL.
            with transaction.atomic():
                ServerLease.objects.update(expires_at=first.started_at)
                closed, _ = services.server_leases_reap()
            return closed

        assert await lease_lapses_and_is_reaped() == 1

        async def back_with_a_new_session() -> bool:
            sessions = await sync_to_async(
                lambda: list(AgentSession.objects.filter(vm=vm).order_by("started_at"))
            )()
            return len(sessions) == 2 and sessions[1].ended_at is None

        assert await eventually(back_with_a_new_session, wait=10)
        assert await eventually(
            lambda: _equals(sync_to_async(selectors.vm_live_status)(vm_id=vm.pk), "authorized")
        )
        await first.arefresh_from_db()
        assert first.end_reason in ("server_lost", "lease_lost") and first.ended_at is not None
        assert await sync_to_async(ServerLease.objects.filter(name="test-vmcontrol").exists)()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
