"""PATCH from a separate web process (uvicorn subprocess) reaches the agent's consumer in the
TCP server process through the Redis channel layer."""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from tests.factories import StaffFactory, auth_header
from tests.vmcontrol.conftest import (
    ROOT,
    VmServer,
    authorized_wire,
    free_port,
    test_database_url,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import Command, VirtualMachine

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(120)]


@pytest.fixture
def web_process(transactional_db: None) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": test_database_url(),
        "VMCONTROL_COMMAND_TIMEOUT_SECONDS": "1.5",
    }
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert child.poll() is None, "web process exited"
            time.sleep(0.1)
        yield base
    finally:
        child.terminate()
        child.wait(15)


async def test_patch_from_another_process_reaches_the_agent_through_redis(
    web_process: str, vmserver: VmServer
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    vm, token = await sync_to_async(vm_with_token)("remote")
    agent = Agent(
        "127.0.0.1",
        vmserver.port,
        AgentIdentity(name="r", vm_id=vm.pk, token=token),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.authorized.wait(), 10)
    try:
        async with httpx.AsyncClient(base_url=web_process, headers=headers, timeout=20) as api:
            response = await api.patch(
                f"/api/vmcontrol/vms/{vm.pk}",
                json={"cpu_cores": 12, "disks": [{"name": "root", "size_gb": 80}]},
            )
            assert response.status_code == 200, response.text
            assert response.json()["cpu_cores"] == 12
            assert agent.identity.inventory["cpu_cores"] == 12
            await vm.arefresh_from_db()
            assert vm.cpu_cores == 12
            assert (await sync_to_async(Command.objects.get)(vm=vm)).status == "succeeded"

            offline, _ = await sync_to_async(vm_with_token)("offline")
            response = await api.patch(f"/api/vmcontrol/vms/{offline.pk}", json={"ram_mb": 1})
            assert response.status_code == 409
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_remote_patch_times_out_with_504_when_the_agent_is_silent(
    web_process: str, vmserver: VmServer
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    headers = await sync_to_async(auth_header)(staff)
    vm, token = await sync_to_async(vm_with_token)("silent")
    wire = await authorized_wire(vmserver.port, vm.pk, token)
    async with httpx.AsyncClient(base_url=web_process, headers=headers, timeout=20) as api:
        patch = asyncio.create_task(api.patch(f"/api/vmcontrol/vms/{vm.pk}", json={"ram_mb": 777}))
        command: dict[str, Any] = await wire.recv(wait=10)
        assert command["type"] == "command" and command["args"]["ram_mb"] == 777
        response = await patch
    assert response.status_code == 504
    vm = await sync_to_async(VirtualMachine.objects.get)(pk=vm.pk)
    assert vm.ram_mb == 2048
    await wire.close()
