"""`manage.py runall` (what `make run` starts) serves VM agents too, and in that one process the
in-memory channel layer carries a PATCH from the web side to the agent's consumer; `vmctl`,
run from another terminal, reaches the agent the same way (issue 13 item 4)."""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.vmcontrol.conftest import ROOT, eventually, free_port, wait_port
from vmcontrol.agent import Agent, AgentIdentity

pytestmark = pytest.mark.timeout(150)


@dataclass
class Runall:
    base: str
    vm_port: int
    env: dict[str, str]
    child: subprocess.Popen[str]
    output: str = ""


def _embedded_env(tmp_path: Path, http_port: int, vm_port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'runall.sqlite3'}",
        HTTP_PORT=str(http_port),
        VMCONTROL_PORT=str(vm_port),
        GRPC_PORT=str(free_port()),
        DJANGO_SUPERUSER_USERNAME="boss",
        DJANGO_SUPERUSER_PASSWORD="a-long-demo-passphrase",
    )
    return env


async def _agent_gets_patched(base: str, vm_port: int, token: str) -> None:
    async with httpx.AsyncClient(
        base_url=f"{base}/api/vmcontrol", headers={"Authorization": f"Token {token}"}, timeout=20
    ) as api:
        created = (await api.post("/vms", json={"name": "embedded", "cpu_cores": 1})).json()
        agent = Agent(
            "127.0.0.1",
            vm_port,
            AgentIdentity(name="e", vm_id=created["id"], token=created["token"]),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.authorized.wait(), 20)
            listed = (await api.get("/vms?filter=authorized")).json()["results"]
            assert [vm["id"] for vm in listed] == [created["id"]]
            response = await api.patch(f"/vms/{created['id']}", json={"cpu_cores": 3})
            assert response.status_code == 200, response.text
            assert response.json()["cpu_cores"] == 3
            assert agent.identity.inventory["cpu_cores"] == 3
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def embedded_runall(tmp_path: Path) -> Iterator[Runall]:
    """`manage.py runall` on fresh ports and its own SQLite file, with no Redis, no broker (the
    embedded mode `make run` starts), operator `boss`; stopped with SIGINT on the way out."""
    http_port, vm_port = free_port(), free_port()
    env = _embedded_env(tmp_path, http_port, vm_port)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120)
    subprocess.run([*manage, "ensure_operator"], cwd=ROOT, env=env, check=True, timeout=60)
    child = subprocess.Popen(
        [*manage, "runall"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runall = Runall(base=f"http://127.0.0.1:{http_port}", vm_port=vm_port, env=env, child=child)
    try:
        wait_port(http_port, wait=60)
        wait_port(vm_port, wait=60)
        yield runall
    finally:
        child.send_signal(signal.SIGINT)
        runall.output, _ = child.communicate(timeout=30)


def test_runall_serves_agents_and_patch_reaches_them_on_the_in_memory_layer(
    tmp_path: Path,
) -> None:
    with embedded_runall(tmp_path) as runall:
        token = httpx.post(
            f"{runall.base}/api/auth/token",
            json={"username": "boss", "password": "a-long-demo-passphrase"},
            timeout=20,
        ).json()["token"]
        asyncio.run(_agent_gets_patched(runall.base, runall.vm_port, token))
    assert f"tcp://127.0.0.1:{runall.vm_port}" in runall.output
    assert runall.child.returncode == 0, runall.output


async def vmctl(runall: Runall, *args: str) -> tuple[int, str]:
    """`manage.py vmctl` in its own process, as an operator types it in another terminal."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        "vmctl",
        "--url",
        runall.base,
        *args,
        cwd=ROOT,
        env=runall.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(child.communicate(), 60)
    return child.returncode or 0, output.decode()


async def _console_reaches_the_agent(runall: Runall) -> None:
    code, output = await vmctl(runall, "register", "--name", "console", "--disk", "root:20")
    assert code == 0, output
    vm_id = int(re.search(r"VM id: (\d+)", output)[1])  # type: ignore[index]
    token = re.search(r"Token \(shown once\): (\S+)", output)[1]  # type: ignore[index]
    agent = Agent("127.0.0.1", runall.vm_port, AgentIdentity(name="c", vm_id=vm_id, token=token))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.authorized.wait(), 20)
        code, output = await vmctl(runall, "logout", str(vm_id))
        assert code == 0, output
        assert "Logged out" in output and " connected " in output, output  # REST: not authorized

        # The agent was told (it authorizes again on the same connection, as agents do).
        async def told() -> bool:
            return agent.stats.logouts >= 1

        assert await eventually(told)
        assert agent.stats.logouts == 1
        await asyncio.wait_for(agent.authorized.wait(), 10)
        # Database, REST and agent agree again: no 409, and an update reaches the agent
        # through the web process's in-memory channel layer (no Redis anywhere).
        code, output = await vmctl(runall, "update", str(vm_id), "--cpu", "3", "--ram", "3072")
        assert code == 0, output
        assert "acknowledged" in output
        assert (agent.identity.inventory["cpu_cores"], agent.identity.inventory["ram_mb"]) == (
            3,
            3072,
        )
        code, output = await vmctl(runall, "list", "--authorized")
        assert code == 0 and "console" in output, output
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_vmctl_logout_and_update_reach_the_agent_of_a_running_runall(tmp_path: Path) -> None:
    with embedded_runall(tmp_path) as runall:
        assert "REDIS_URL" not in runall.env
        asyncio.run(_console_reaches_the_agent(runall))
    assert runall.child.returncode == 0, runall.output
