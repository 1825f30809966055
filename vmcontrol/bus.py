"""The agent bus: how any process reaches an agent's connection through the channel layer.

An authorized connection joins the group `vmcontrol.vm.<id>` (`vm_group`), so a message sent
to that group reaches it in whichever server process holds it. Messages (the `type` names the
consumer's handler):

- `vm.command` (`VmCommand`) to the connection: run a command, answer on `reply_to`;
- `vm.command.done` (`CommandDone`) from the connection to the waiting process's reply channel;
- `vm.logout` (`VmLogout`): an operator logged the VM out or its token changed;
- `vm.replaced` (`VmReplaced`): a newer connection of the VM authorized; older ones step aside.

A gateway: no ORM here (a caller hands in what to do while it waits).
"""

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict, cast

from asgiref.sync import async_to_sync
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import (
    BaseChannelLayer,
    InMemoryChannelLayer,
    channel_layers,
    get_channel_layer,
)


class VmCommand(TypedDict):
    """To the VM's group: run a command and answer on `reply_to`."""

    type: str  # "vm.command"
    command_id: str
    name: str
    args: dict[str, Any]
    reply_to: str
    """the reply channel of the process waiting for the answer"""


class CommandDone(TypedDict):
    """To the waiting process's reply channel: the command's outcome."""

    type: str  # "vm.command.done"
    command_id: str | int
    status: str
    """the command's final status (`CommandStatus`), as `services.command_complete` stored it"""
    error: dict[str, Any] | None


class VmLogout(TypedDict):
    """To the VM's group: the database already says logged out; the connection follows."""

    type: str  # "vm.logout"
    reason: str


class VmReplaced(TypedDict):
    """To the VM's group: a newer connection authorized as this VM."""

    type: str  # "vm.replaced"
    session_id: str
    """the new connection's session id (the one that does not step aside)"""


def vm_group(vm_id: int) -> str:
    """The channel-layer group of the VM's authorized connection: `vmcontrol.vm.<id>`."""
    return f"vmcontrol.vm.{vm_id}"


def vm_logout_send(vm_id: int, reason: str) -> None:
    """Tell the VM's connection (if any, on any server) that it is logged out; from sync code
    only (it blocks on the send; raises RuntimeError inside an event loop). Fire and forget: no
    connection, no error."""
    layer = get_channel_layer()
    assert layer is not None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        message: VmLogout = {"type": "vm.logout", "reason": reason}
        async_to_sync(layer.group_send)(vm_group(vm_id), dict(message))
    else:  # pragma: no cover - services are called from sync code
        raise RuntimeError("call from sync code")


async def vm_replaced_send(layer: BaseChannelLayer, *, vm_id: int, session_id: str) -> None:
    """Ask every connection of the VM but `session_id` to step aside (on any server)."""
    message: VmReplaced = {"type": "vm.replaced", "session_id": session_id}
    await layer.group_send(vm_group(vm_id), dict(message))


async def command_done_send(
    layer: BaseChannelLayer,
    reply_to: str,
    *,
    command_id: str | int,
    status: str,
    error: dict[str, Any] | None,
) -> None:
    """Answer the process waiting on `reply_to` (`command_push_and_wait`). A process that
    stopped waiting (timed out) never reads it; the channel layer expires it."""
    message: CommandDone = {
        "type": "vm.command.done",
        "command_id": command_id,
        "status": status,
        "error": error,
    }
    await layer.send(reply_to, dict(message))


_reply_layers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = (
    weakref.WeakKeyDictionary()
)


def _reply_layer() -> Any:
    """The layer to wait for an agent's answer on. A cross-process layer (Redis) gets one
    instance per event loop: channels_redis lets only one loop receive on an instance, and the
    console or a test may wait on another loop than the TCP server's consumers."""
    layer = get_channel_layer()
    assert layer is not None
    if isinstance(layer, InMemoryChannelLayer):
        return layer
    loop = asyncio.get_running_loop()
    own = _reply_layers.get(loop)
    if own is None:
        own = _reply_layers[loop] = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    return own


async def command_push_and_wait(
    *,
    vm_id: int,
    command_id: str,
    name: str,
    args: dict[str, Any],
    wait_seconds: float,
    while_waiting: Callable[[], Awaitable[None]] | None = None,
) -> CommandDone | None:
    """Send `vm.command` to the VM's group and wait up to `wait_seconds` for its
    `vm.command.done` on a fresh reply channel. Returns the answer, or None when none came in
    time (no connection holds the VM, or the agent is slow: the caller decides). At most once:
    the message is not resent. `while_waiting` (bookkeeping, e.g. marking the command sent)
    runs alongside the wait and is awaited before returning; its exception propagates."""
    layer = _reply_layer()
    reply_to = await layer.new_channel("vmcontrol.reply.")
    message: VmCommand = {
        "type": "vm.command",
        "command_id": command_id,
        "name": name,
        "args": args,
        "reply_to": reply_to,
    }
    await layer.group_send(vm_group(vm_id), dict(message))
    side = asyncio.ensure_future(while_waiting()) if while_waiting is not None else None
    try:
        received = await asyncio.wait_for(layer.receive(reply_to), wait_seconds)
        return cast(CommandDone, dict(received))
    except TimeoutError:
        return None
    finally:
        if side is not None:
            await side
