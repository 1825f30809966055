"""Issue 15 (vmcontrol): the VM control server runs as N copies side by side on the real
services (PostgreSQL + Redis). Each `run_vmcontrol_server` here is its own process named by
VMCONTROL_SERVER_NAME=`{host}:{port}` (its sessions and lease say `<hostname>:<port>`);
commands from a web process reach an agent on any copy through the Redis channel layer; an
agent of a SIGKILLed copy comes back on another one and its status stays with its live
session, whatever the dead copy's lease or its restart do; a killed copy's sessions go offline
within the lease TTL; a command ends answered or timed out whichever process dies; and a second
copy started under a name in use refuses to start instead of closing the first one's sessions."""

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from tests.conftest import LiveServer
from tests.factories import StaffFactory, auth_header
from tests.vmcontrol.conftest import (
    ROOT,
    Wire,
    authorized_wire,
    eventually,
    free_port,
    test_database_url,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol import selectors
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import AgentSession, Command, ServerLease, VirtualMachine

pytestmark = pytest.mark.timeout(180)

LEASE_TTL = 2.0
HOSTNAME = socket.gethostname()


@dataclass
class Copy:
    """One `run_vmcontrol_server` process."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def name(self) -> str:
        """The name `{host}:{port}` becomes."""
        return f"{HOSTNAME[:120]}:{self.port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    import os

    # A file, not a pipe nobody reads: a server blocked on a full pipe would stop renewing.
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def copies(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., Copy]]:
    """Starts `run_vmcontrol_server` copies on the test database (lease TTL 2 s, named
    `{host}:{port}` unless given): `start(port=None, **env)` returns once it accepts agents."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int | None = None, **env: str) -> Copy:
        port = port or free_port()
        log = tmp_path / f"vmcontrol-{port}-{len(started)}.log"
        process = _spawn(
            ["manage.py", "run_vmcontrol_server", "--host", "127.0.0.1", "--port", str(port)],
            {
                "DATABASE_URL": test_database_url(),
                "VMCONTROL_SERVER_NAME": "{host}:{port}",
                "VMCONTROL_SERVER_LEASE_TTL_SECONDS": str(LEASE_TTL),
                **env,
            },
            log,
        )
        started.append(process)
        _wait_listening(port, process, log)
        return Copy(port=port, process=process, log=log)

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
async def api(asgi_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """The REST API of a web server in the test process (its own channel-layer client)."""
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    async with httpx.AsyncClient(
        base_url=f"{asgi_server.http_url}/api/vmcontrol", headers=headers, timeout=30
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.authorized.wait(), 20)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _agent(vm: VirtualMachine, token: str, port: int, **options: Any) -> Agent:
    return Agent(
        "127.0.0.1",
        port,
        AgentIdentity(name=vm.name, vm_id=vm.pk, token=token),
        backoff_base=0.05,
        backoff_cap=0.2,
        **options,
    )


@sync_to_async
def open_session(vm_id: int) -> AgentSession | None:
    return AgentSession.objects.filter(vm_id=vm_id, ended_at__isnull=True).first()


@sync_to_async
def live_status(vm_id: int) -> str:
    return selectors.vm_live_status(vm_id=vm_id)


@sync_to_async
def lease_names() -> set[str]:
    return set(ServerLease.objects.values_list("name", flat=True))


@pytest.mark.needs_postgres
@pytest.mark.needs_redis
@pytest.mark.parametrize("copy", ["a", "b"])
async def test_a_command_sent_through_the_web_reaches_an_agent_on_either_server_copy(
    api: httpx.AsyncClient, copies: Callable[..., Copy], copy: str
) -> None:
    a, b = await asyncio.gather(asyncio.to_thread(copies), asyncio.to_thread(copies))
    target = {"a": a, "b": b}[copy]
    vm, token = await sync_to_async(vm_with_token)(f"on-{copy}")
    async with running(_agent(vm, token, target.port)) as agent:
        session = await open_session(vm.pk)
        assert session is not None and session.server_name == target.name
        assert {a.name, b.name} <= await lease_names()

        response = await api.patch(
            f"/vms/{vm.pk}", json={"cpu_cores": 6, "disks": [{"name": "root", "size_gb": 60}]}
        )
        assert response.status_code == 200, response.text
        assert agent.identity.inventory["cpu_cores"] == 6
    command = await sync_to_async(Command.objects.get)(vm=vm)
    assert command.status == "succeeded" and (command.result or {}).get("cpu_cores") == 6
    await vm.arefresh_from_db()
    assert vm.cpu_cores == 6


@pytest.mark.needs_postgres
@pytest.mark.needs_redis
async def test_an_agent_of_a_sigkilled_copy_moves_over_and_the_dead_copy_never_takes_it_offline(
    api: httpx.AsyncClient, copies: Callable[..., Copy]
) -> None:
    a, b = await asyncio.gather(asyncio.to_thread(copies), asyncio.to_thread(copies))
    vm, token = await sync_to_async(vm_with_token)("mover")
    agent = _agent(vm, token, b.port, more_servers=[("127.0.0.1", a.port)])
    async with running(agent):
        first = await open_session(vm.pk)
        assert first is not None and first.server_name == b.name
        first_id = first.pk

        await asyncio.to_thread(b.kill)

        async def authorized_on_a() -> bool:
            session = await open_session(vm.pk)
            return (
                session is not None
                and session.server_name == a.name
                and agent.authorized.is_set()
                and await live_status(vm.pk) == "authorized"
            )

        assert await eventually(authorized_on_a, wait=20)
        assert (agent.host, agent.port) == ("127.0.0.1", a.port)

        # From here on the VM belongs to its session on A: B's stale session, B's lapsing
        # lease, B restarted under the same name (it closes what it left open) and A's reaper
        # must none of them take it offline.
        seen: list[str] = []
        sampling = True

        async def sample() -> None:
            while sampling:
                seen.append(await live_status(vm.pk))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            restarted = await asyncio.to_thread(copies, b.port)
            assert restarted.name == b.name

            @sync_to_async
            def b_session_end() -> str:
                return AgentSession.objects.get(pk=first_id).end_reason

            assert await eventually(b_session_end, wait=LEASE_TTL + 15)
            assert await b_session_end() in ("server_crashed", "server_lost")

            # Both copies' lease keepers go round twice more (each round renews, then reaps).
            @sync_to_async
            def renewals() -> tuple[Any, ...]:
                leases = ServerLease.objects.filter(name__in=[a.name, b.name])
                return tuple(leases.order_by("name").values_list("renewed_at", flat=True))

            for _ in range(2):
                before = await renewals()

                async def renewed_since(before: tuple[Any, ...] = before) -> bool:
                    now = await renewals()
                    return len(now) == 2 and all(x > y for x, y in zip(now, before, strict=True))

                assert await eventually(renewed_since, wait=LEASE_TTL * 3)

            response = await api.patch(f"/vms/{vm.pk}", json={"ram_mb": 4096})
            assert response.status_code == 200, response.text
            assert agent.identity.inventory["ram_mb"] == 4096
        finally:
            sampling = False
            await sampler
        assert seen and set(seen) == {"authorized"}, sorted(set(seen))
        await vm.arefresh_from_db()
        current = await open_session(vm.pk)
        assert current is not None and current.server_name == a.name
        assert (vm.status, vm.current_session_id) == ("authorized", current.pk)


@pytest.mark.needs_postgres
@pytest.mark.needs_redis
async def test_a_sigkilled_copys_sessions_go_offline_within_the_lease_ttl_and_its_commands_time_out(
    api: httpx.AsyncClient, copies: Callable[..., Copy], settings: Any
) -> None:
    settings.VMCONTROL_COMMAND_TIMEOUT_SECONDS = 3.0
    a, b = await asyncio.gather(asyncio.to_thread(copies), asyncio.to_thread(copies))
    on_a, token_a = await sync_to_async(vm_with_token)("stays")
    on_b, token_b = await sync_to_async(vm_with_token)("dies")
    async with running(_agent(on_a, token_a, a.port)) as agent_a:
        wire_b = await authorized_wire(b.port, on_b.pk, token_b)
        await _kill_and_expire(api, a, b, on_a, on_b, wire_b)
        assert agent_a.stats.disconnects == 0


async def _kill_and_expire(
    api: httpx.AsyncClient, a: Copy, b: Copy, on_a: Any, on_b: Any, wire_b: Wire
) -> None:
    """B, holding `on_b` (through `wire_b`, which answers nothing), is killed mid-command."""
    # A command in flight when its server dies ends timed out (504), not lost.
    patch = asyncio.create_task(api.patch(f"/vms/{on_b.pk}", json={"ram_mb": 999}))
    command_frame = await wire_b.recv(wait=10)
    assert command_frame["type"] == "command", command_frame
    await asyncio.to_thread(b.kill)
    response = await patch
    assert response.status_code == 504, response.text
    command = await sync_to_async(Command.objects.get)(vm=on_b)
    assert command.status == "timed_out"

    # Nobody else writes B's rows: B's lease lapses, its VM shows offline, A's lease keeper
    # reaps the session; A's VM never leaves.
    async def b_vm_offline() -> bool:
        return await live_status(on_b.pk) == "offline"

    assert await eventually(b_vm_offline, wait=LEASE_TTL + 10)
    assert await live_status(on_a.pk) == "authorized"

    async def reaped() -> bool:
        return await open_session(on_b.pk) is None

    assert await eventually(reaped, wait=LEASE_TTL + 10)
    session = await sync_to_async(AgentSession.objects.get)(vm=on_b)
    assert session.end_reason == "server_lost"
    await on_b.arefresh_from_db()
    assert (on_b.status, on_b.current_session_id) == ("offline", None)
    leases = await lease_names()
    assert b.name not in leases and a.name in leases
    assert await live_status(on_a.pk) == "authorized"
    await wire_b.close()


async def _ping_every_second(wire: Wire) -> None:
    while True:
        await wire.send({"type": "ping"})
        await asyncio.sleep(1)


@pytest.fixture
def web_process(transactional_db: None, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A web process (uvicorn) that waits up to 60 s for an agent's answer; yields its URL and
    the process (to kill)."""
    port = free_port()
    log = tmp_path / "web.log"
    process = _spawn(
        ["-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
        {"DATABASE_URL": test_database_url(), "VMCONTROL_COMMAND_TIMEOUT_SECONDS": "60"},
        log,
    )
    try:
        _wait_listening(port, process, log)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.mark.needs_postgres
@pytest.mark.needs_redis
@pytest.mark.parametrize("agent_answers", [True, False], ids=["answered", "silent"])
async def test_a_command_whose_web_process_dies_still_ends_answered_or_timed_out(
    web_process: tuple[str, Any], copies: Callable[..., Copy], agent_answers: bool
) -> None:
    url, web = web_process
    # The copy's lease keeper times out commands open past 1 s + the 2 s lease TTL.
    server = await asyncio.to_thread(copies, None, VMCONTROL_COMMAND_TIMEOUT_SECONDS="1")
    vm, token = await sync_to_async(vm_with_token)("orphan")
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    wire = await authorized_wire(server.port, vm.pk, token)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90) as client:
        patch = asyncio.create_task(
            client.patch(f"/api/vmcontrol/vms/{vm.pk}", json={"cpu_cores": 9})
        )
        frame = await wire.recv(wait=20)
        assert frame["type"] == "command", frame
        web.kill()
        await asyncio.to_thread(web.wait, 10)
        with pytest.raises(httpx.HTTPError):
            await patch
    # A live agent, heartbeating (the answers pile up unread until the next request).
    heartbeat = asyncio.create_task(_ping_every_second(wire))

    if agent_answers:
        ack = await wire.request(
            {"type": "result", "id": frame["id"], "ok": True, "data": frame["args"]}
        )
        assert ack["type"] == "ack", ack

    async def finished() -> Command | None:
        command = await sync_to_async(Command.objects.get)(vm=vm)
        return command if command.status not in ("queued", "sent") else None

    try:
        command = await eventually(finished, wait=20)
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    assert command is not None, "the command stayed open"
    await vm.arefresh_from_db()
    if agent_answers:
        assert command.status == "succeeded" and vm.cpu_cores == 9
    else:
        assert command.status == "timed_out" and command.error["code"] == "abandoned"
        assert vm.cpu_cores == 2
    await wire.close()


async def test_a_second_copy_under_a_name_in_use_refuses_to_start_and_leaves_the_first_alone(
    copies: Callable[..., Copy], tmp_path: Path
) -> None:
    first = await asyncio.to_thread(copies, None, VMCONTROL_SERVER_NAME="twin")
    vm, token = await sync_to_async(vm_with_token)("first")
    agent = _agent(vm, token, first.port)
    async with running(agent):
        await _second_copy_refused(first, vm, tmp_path)
        assert agent.authorized.is_set() and agent.stats.disconnects == 0


async def _second_copy_refused(first: Copy, vm: VirtualMachine, tmp_path: Path) -> None:

    log = tmp_path / "second.log"
    second = _spawn(
        ["manage.py", "run_vmcontrol_server", "--host", "127.0.0.1", "--port", str(free_port())],
        {
            "DATABASE_URL": test_database_url(),
            "VMCONTROL_SERVER_NAME": "twin",
            "VMCONTROL_SERVER_LEASE_TTL_SECONDS": str(LEASE_TTL),
        },
        log,
    )
    try:
        status = await asyncio.to_thread(second.wait, 60)
    except subprocess.TimeoutExpired:
        second.kill()
        second.wait(10)
        raise AssertionError(f"the second copy kept running:\n{log.read_text()[-3000:]}") from None
    assert status != 0
    assert "in use by the live process" in log.read_text()

    session = await open_session(vm.pk)
    assert session is not None and session.server_name == "twin"
    assert await live_status(vm.pk) == "authorized"
    lease = await sync_to_async(ServerLease.objects.get)(name="twin")
    assert lease.pid == first.process.pid


def test_the_agent_reads_other_server_copies_as_host_port() -> None:
    import argparse

    from vmcontrol.management.options import server_option

    assert server_option("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert server_option("vmc-2.example.org:9100") == ("vmc-2.example.org", 9100)
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "host name:9100", ":9100"):
        with pytest.raises(argparse.ArgumentTypeError):
            server_option(bad)


async def test_an_agent_dials_the_next_server_after_a_failure_and_a_fleet_starts_spread(
    start_vmserver: Callable[..., Any],
) -> None:
    """Without a second process: the first server listed is not listening, so the agent's
    first attempt fails and the next attempt authorizes on the second."""
    from vmcontrol.agent import AgentFleet

    server = start_vmserver()
    vm, token = await sync_to_async(vm_with_token)("failover")
    agent = _agent(vm, token, free_port(), more_servers=[("127.0.0.1", server.port)])
    async with running(agent):
        assert agent.port == server.port
        assert len(agent.attempts) >= 2
    fleet = AgentFleet("127.0.0.1", 1, count=4, state_file=None, more_servers=[("127.0.0.1", 2)])
    assert [a.port for a in fleet.agents] == [1, 2, 1, 2]
