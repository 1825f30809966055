"""The agent connection as a Channels consumer on the `tcp` scope.

It frames the byte stream into lines, validates each frame (vmcontrol.protocol), calls one
service per frame and answers. It joins the group `vmcontrol.vm.<id>` once authorized, so any
process reaches the agent through the channel layer (`vm.command`, `vm.logout`,
`vm.replaced`). ApplicationError and ProtocolError become `error` frames here and only here.
Pings touch only memory: no ORM, no thread hop.
"""

import time
import uuid
from typing import Any

import structlog
from asgiref.sync import sync_to_async
from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer
from django.db import close_old_connections

from common.exceptions import ApplicationError
from vmcontrol import services
from vmcontrol.protocol import (
    AUTH_FAILED,
    PROTOCOL_VERSION,
    UNSUPPORTED_VERSION,
    Frame,
    Inventory,
    LineSplitter,
    ProtocolError,
    decode_frame,
    encode_frame,
    error_frame,
)
from vmcontrol.server import AUTHORIZED, FRAMES, ServerState
from vmcontrol.services import AgentEvent

logger = structlog.get_logger(__name__)

PRE_AUTH_TYPES = frozenset({"hello", "enroll", "auth", "bye"})


def _command_complete(**kwargs: Any) -> str:
    close_old_connections()
    try:
        return services.command_complete(**kwargs)
    finally:
        close_old_connections()


class AgentConsumer(AsyncConsumer):
    """One agent TCP connection (one session row)."""

    state: ServerState

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch runs close_old_connections through a thread hop before every
        # message; here that would be one hop per ping. This consumer's ORM work runs in
        # executor threads that close their own connections (server.ServerState.run_sync).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # Transport events -----------------------------------------------------------------------

    async def tcp_connect(self, message: dict[str, Any]) -> None:
        self.state = self.scope["vmcontrol.state"]
        self.session_id = uuid.uuid4()
        self.splitter = LineSplitter()
        self.last_frame_at = time.monotonic()
        self.authorized = False
        self.said_hello = False
        self.vm_id: int | None = None
        self.group: str | None = None
        self.inventory: Inventory | None = None
        self.end_reason = ""
        self.pending: dict[str, tuple[str, str, dict[str, Any]]] = {}
        """command id → (reply channel of the process waiting for it, name, args)"""
        client = self.scope.get("client") or ["", 0]
        self.state.connections[self.session_id] = self
        self.state.submit(
            AgentEvent(kind="open", session_id=self.session_id, peer=f"{client[0]}:{client[1]}")
        )

    async def tcp_receive(self, message: dict[str, Any]) -> None:
        try:
            lines = self.splitter.feed(message["bytes"])
        except ProtocolError as error:
            await self._refuse(error)
            return
        for line in lines:
            if self.end_reason:
                return
            await self._handle_line(line)

    async def tcp_disconnect(self, message: dict[str, Any]) -> None:
        reason = self.end_reason or message.get("reason") or "closed"
        self.state.connections.pop(self.session_id, None)
        if self.authorized:
            AUTHORIZED.dec()
        self.authorized = False
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        for command_id, (reply_to, _, _) in self.pending.items():
            await self._command_finish(command_id, reply_to, ok=False, error={"code": "closed"})
        self.state.submit(
            AgentEvent(kind="end", session_id=self.session_id, vm_id=self.vm_id, reason=reason)
        )
        raise StopConsumer()

    async def expire(self, reason: str) -> None:
        """Called by the server's watchdog for a silent connection."""
        if not self.end_reason:
            self.end_reason = reason
            await self._write(error_frame("timeout", reason.replace("_", " ")))
            await self.send({"type": "tcp.close"})

    # Frames ---------------------------------------------------------------------------------

    async def _handle_line(self, line: bytes) -> None:
        frame_id: Any = None
        try:
            frame = decode_frame(line, allowed=None if self.authorized else PRE_AUTH_TYPES)
            frame_id = frame.get("id")
            kind = frame["type"]
            FRAMES.labels(kind).inc()
            self.last_frame_at = time.monotonic()
            await getattr(self, f"on_{kind}")(frame)
            # Time spent on our side (a busy batch) is not the peer's silence.
            self.last_frame_at = time.monotonic()
        except ProtocolError as error:
            await self._refuse(error)
        except ApplicationError as error:
            await self._write(error_frame(error.code, error.message, frame_id))
        except Exception:
            logger.exception("vmcontrol_frame_failed", session=str(self.session_id))
            await self._write(error_frame("internal", "the server could not handle the frame"))

    async def _refuse(self, error: ProtocolError) -> None:
        await self._write(error_frame(error.code, error.message, error.frame_id))
        if error.close:
            self.end_reason = "protocol_error"
            await self.send({"type": "tcp.close"})

    async def _write(self, frame: Frame) -> None:
        await self.send({"type": "tcp.send", "bytes": encode_frame(frame)})

    def _reply(self, kind: str, request: Frame, **fields: Any) -> Frame:
        frame: Frame = {"type": kind, **fields}
        if request.get("id") is not None:
            frame["id"] = request["id"]
        return frame

    async def on_hello(self, frame: Frame) -> None:
        if frame["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(
                UNSUPPORTED_VERSION,
                f"server speaks protocol {PROTOCOL_VERSION}",
                frame_id=frame.get("id"),
                close=True,
            )
        self.said_hello = True
        self.inventory = frame.get("inventory")
        if frame.get("vm_id") is not None and not self.authorized:
            result = await self.state.apply(
                AgentEvent(kind="bind", session_id=self.session_id, vm_id=frame["vm_id"])
            )
            if result.ok:
                self.vm_id = result.vm_id
        await self._write(
            self._reply(
                "welcome",
                frame,
                protocol=PROTOCOL_VERSION,
                session_id=str(self.session_id),
                heartbeat_interval=self.state.config.heartbeat_interval,
            )
        )

    async def on_enroll(self, frame: Frame) -> None:
        result = await self.state.apply(
            AgentEvent(
                kind="enroll",
                session_id=self.session_id,
                secret=frame["secret"],
                name=frame.get("name") or f"vm-{self.session_id.hex[:8]}",
                inventory=frame["inventory"],
            )
        )
        if not result.ok:
            raise services.AuthFailed("Enrollment refused.", code=AUTH_FAILED)
        self.inventory = frame["inventory"]
        await self._write(self._reply("enrolled", frame, vm_id=result.vm_id, token=result.token))

    async def on_auth(self, frame: Frame) -> None:
        if self.authorized:
            raise ProtocolError("already_authorized", "already authorized", frame_id=frame["id"])
        inventory = frame.get("inventory") or self.inventory
        result = await self.state.apply(
            AgentEvent(
                kind="auth",
                session_id=self.session_id,
                vm_id=frame["vm_id"],
                token=frame["token"],
                inventory=inventory,
            )
        )
        if not result.ok:
            raise services.AuthFailed()
        assert result.vm_id is not None
        self.vm_id = result.vm_id
        self.authorized = True
        AUTHORIZED.inc()
        self.group = services.vm_group(result.vm_id)
        # Older connections of this VM (a reconnect the server has not noticed) step aside.
        await self.channel_layer.group_send(
            self.group, {"type": "vm.replaced", "session_id": str(self.session_id)}
        )
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.state.mark_seen(result.vm_id)
        await self._write(self._reply("auth_ok", frame, vm_id=result.vm_id))

    async def on_ping(self, frame: Frame) -> None:
        if self.vm_id is not None:
            self.state.mark_seen(self.vm_id)
        await self._write(self._reply("pong", frame))

    async def on_inventory(self, frame: Frame) -> None:
        await self.state.apply(
            AgentEvent(
                kind="inventory",
                session_id=self.session_id,
                vm_id=self.vm_id,
                inventory=frame["inventory"],
            )
        )
        await self._write(self._reply("ack", frame))

    async def on_result(self, frame: Frame) -> None:
        pending = self.pending.pop(frame["id"], None)
        if pending is None:
            raise ProtocolError("unknown_command", "no such pending command", frame_id=frame["id"])
        reply_to, name, args = pending
        await self._command_finish(
            frame["id"],
            reply_to,
            ok=frame["ok"],
            data=frame.get("data"),
            error=frame.get("error"),
            name=name,
            args=args,
        )
        await self._write(self._reply("ack", frame))

    async def on_logout(self, frame: Frame) -> None:
        await self._deauthorize()
        await self.state.apply(
            AgentEvent(kind="deauth", session_id=self.session_id, vm_id=self.vm_id)
        )
        await self._write(self._reply("logged_out", frame))

    async def on_bye(self, frame: Frame) -> None:
        self.end_reason = "bye"
        await self.send({"type": "tcp.close"})

    async def _deauthorize(self) -> None:
        if self.authorized:
            AUTHORIZED.dec()
        self.authorized = False
        self.last_frame_at = time.monotonic()
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None

    # Channel-layer events -------------------------------------------------------------------

    async def vm_command(self, message: dict[str, Any]) -> None:
        command_id, reply_to = message["command_id"], message["reply_to"]
        if not self.authorized or self.end_reason:
            await self._command_finish(
                command_id, reply_to, ok=False, error={"code": "not_authorized"}
            )
            return
        self.pending[command_id] = (reply_to, message["name"], message["args"])
        await self._write(
            {"type": "command", "id": command_id, "name": message["name"], "args": message["args"]}
        )

    async def vm_logout(self, message: dict[str, Any]) -> None:
        """An operator logged the VM out (or its token changed); the database already says so."""
        await self._deauthorize()
        await self._write({"type": "logout", "reason": message.get("reason", "operator")})

    async def vm_replaced(self, message: dict[str, Any]) -> None:
        if message["session_id"] != str(self.session_id) and not self.end_reason:
            await self._deauthorize()
            self.end_reason = "replaced"
            await self.send({"type": "tcp.close"})

    async def _command_finish(
        self,
        command_id: str,
        reply_to: str,
        *,
        ok: bool,
        data: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        name: str = "",
        args: dict[str, Any] | None = None,
    ) -> None:
        status = await sync_to_async(_command_complete, thread_sensitive=False)(
            command_id=command_id,
            vm_id=self.vm_id,
            ok=ok,
            data=data,
            error=error,
            name=name,
            args=args,
        )
        await self.channel_layer.send(
            reply_to,
            {"type": "vm.command.done", "command_id": command_id, "status": status, "error": error},
        )
