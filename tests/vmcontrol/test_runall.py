"""`manage.py runall` (what `make run` starts) serves VM agents too, and in that one process the
in-memory channel layer carries a PATCH from the web side to the agent's consumer."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.vmcontrol.conftest import ROOT, free_port, wait_port
from vmcontrol.agent import Agent, AgentIdentity

pytestmark = pytest.mark.timeout(150)


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


def test_runall_serves_agents_and_patch_reaches_them_on_the_in_memory_layer(
    tmp_path: Path,
) -> None:
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
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_port(http_port, wait=60)
        wait_port(vm_port, wait=60)
        token = httpx.post(
            f"{base}/api/auth/token",
            json={"username": "boss", "password": "a-long-demo-passphrase"},
            timeout=20,
        ).json()["token"]
        asyncio.run(_agent_gets_patched(base, vm_port, token))
    finally:
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=30)
    assert f"tcp://127.0.0.1:{vm_port}" in output
    assert child.returncode == 0, output
