"""The agent bus (`vmcontrol.bus`) on the configured channel layer (in-memory, or Redis when
REDIS_URL is set): a command reaches the VM's group and its answer comes back on the reply
channel; with nobody holding the VM the wait ends at its deadline."""

import asyncio
import time
from typing import Any

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import InMemoryChannelLayer, channel_layers, get_channel_layer

from vmcontrol import bus


def own_layer() -> Any:
    """A layer this test's event loop may receive on (channels_redis binds one loop per
    instance; the in-memory layer must be the shared instance)."""
    layer = get_channel_layer()
    if isinstance(layer, InMemoryChannelLayer):
        return layer
    return channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)


def test_a_vm_group_is_named_after_the_vm() -> None:
    assert bus.vm_group(42) == "vmcontrol.vm.42"


async def test_a_command_reaches_the_vm_group_and_its_answer_comes_back() -> None:
    layer = own_layer()
    connection = await layer.new_channel("test.agent.")
    await layer.group_add(bus.vm_group(900_001), connection)
    marked: list[bool] = []

    async def mark_sent() -> None:
        marked.append(True)

    waiting = asyncio.create_task(
        bus.command_push_and_wait(
            vm_id=900_001,
            command_id="c-1",
            name="update_specs",
            args={"cpu_cores": 2},
            wait_seconds=10,
            while_waiting=mark_sent,
        )
    )
    try:
        message = await asyncio.wait_for(layer.receive(connection), 10)
        assert message["type"] == "vm.command"
        assert (message["command_id"], message["name"], message["args"]) == (
            "c-1",
            "update_specs",
            {"cpu_cores": 2},
        )
        await bus.command_done_send(
            layer, message["reply_to"], command_id="c-1", status="succeeded", error=None
        )
        reply = await asyncio.wait_for(waiting, 10)
    finally:
        await layer.group_discard(bus.vm_group(900_001), connection)
    assert reply == {
        "type": "vm.command.done",
        "command_id": "c-1",
        "status": "succeeded",
        "error": None,
    }
    assert marked == [True]


async def test_a_command_nobody_holds_ends_at_its_deadline_with_no_answer() -> None:
    marked: list[bool] = []

    async def mark_sent() -> None:
        marked.append(True)

    started = time.monotonic()
    reply = await bus.command_push_and_wait(
        vm_id=900_002,
        command_id="c-2",
        name="noop",
        args={},
        wait_seconds=0.3,
        while_waiting=mark_sent,
    )
    assert reply is None
    assert 0.3 <= time.monotonic() - started < 5
    assert marked == [True]
