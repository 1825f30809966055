"""The agent connection as a Channels consumer on the `tcp` scope.

It frames the byte stream into lines, validates each frame (vmcontrol.protocol), calls one
service per frame and answers. It joins the group `vmcontrol.vm.<id>` once authorized, so any
process reaches the agent through the channel layer (`vm.command`, `vm.logout`,
`vm.replaced`). Pings touch only memory: no ORM, no thread hop.

This is the TCP door's one place of error mapping (`input-policy.md`): ProtocolError and
ApplicationError become `error` frames with their code; any other exception while handling a
frame becomes `error {code: internal}` with a generic message, logged once with the session id
bound in structlog's contextvars, and the connection stays open. A failed write closes the
transport (the agent reconnects and recovers). Whatever way the consumer ends, `_end` runs:
the session row (if it authorized) is closed, the VM's status released, the gauges restored.
Before it authorizes a connection is bounded in time and attempts and writes nothing
(`AgentConsumer`; vmcontrol/PROTOCOL.md, "Before authorization").
"""

import contextlib
import math
import time
import uuid
from datetime import datetime
from typing import Any

import structlog
from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer
from channels.routing import ProtocolTypeRouter
from django.utils import timezone

from common.console import console_count
from common.db import orm_async
from common.exceptions import ApplicationError
from vmcontrol import bus, services
from vmcontrol.limits import peer_key
from vmcontrol.metrics import AUTH_REFUSED, AUTHORIZED, FRAMES, UNAUTHENTICATED
from vmcontrol.protocol import (
    ALREADY_AUTHORIZED,
    AUTH_FAILED,
    INTERNAL,
    PROTOCOL_VERSION,
    RATE_LIMITED,
    TIMEOUT,
    TOO_MANY_ATTEMPTS,
    UNKNOWN_COMMAND,
    UNSUPPORTED_VERSION,
    Frame,
    Inventory,
    LineSplitter,
    ProtocolError,
    decode_frame,
    encode_frame,
    error_frame,
    inventory_parse,
    protocol_error_frame,
)
from vmcontrol.services import AgentEvent, AgentEventResult
from vmcontrol.sessions import ServerState

logger = structlog.get_logger(__name__)

PRE_AUTH_TYPES = frozenset({"hello", "enroll", "auth", "bye"})
INTERNAL_MESSAGE = "the server could not handle the frame; quote the session id when reporting it"


class AgentConsumer(AsyncConsumer):
    """One agent TCP connection; a session row once it authorizes.

    Until it authorizes the connection writes nothing and changes no VM: it has
    `auth_timeout` seconds from accept (the server's watchdog closes it then, whatever it
    sends) and `auth_attempts` failed `auth`/`enroll` attempts (then `too_many_attempts` and a
    close); every failed attempt is also charged to its peer address (`limits`)."""

    state: ServerState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Everything `_end` reads exists before the first message, so cleanup works whatever
        # point a failure interrupted.
        self.session_id = uuid.uuid4()
        self.opened = False
        self.ended = False
        self.authorized = False
        self.persisted = False
        """the session row exists (the connection authorized at least once)"""
        self.failures = 0
        self.accepted_at = time.monotonic()
        self.auth_deadline = self.accepted_at
        self.started_at: datetime | None = None
        self.peer = ""
        self.peer_key = ""
        self.vm_id: int | None = None
        self.group: str | None = None
        self.inventory: Inventory | None = None
        self.end_reason = ""
        self.last_frame_at = time.monotonic()
        self.pending: dict[str | int, tuple[str, str, dict[str, Any], datetime]] = {}
        """command id → (reply channel of the process waiting for it, name, args, sent at)"""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # The connection's task owns this context: every log line of the session carries its id.
        structlog.contextvars.bind_contextvars(
            request_id=str(self.session_id), session_id=str(self.session_id)
        )
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._end(self.end_reason or "closed")

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch runs close_old_connections through a thread hop before every
        # message; here that would be one hop per ping. This consumer's ORM work runs in
        # executor threads that close their own connections (sessions.ServerState.run_sync).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            logger.warning("vmcontrol_message_unknown", message_type=message.get("type"))
            return
        try:
            await handler(message)
        except StopConsumer:
            raise
        except Exception:
            # Frames have their own catch-all (`_handle_line`); this one is for everything else
            # (a channel-layer event, the connect step). The session goes on when it can.
            logger.exception("vmcontrol_message_failed", message_type=message.get("type"))
            if not self.opened:
                await self._close("server_error")

    # Transport events -----------------------------------------------------------------------

    async def tcp_connect(self, message: dict[str, Any]) -> None:
        self.state = self.scope["vmcontrol.state"]
        self.splitter = LineSplitter()
        self.accepted_at = self.scope.get("vmcontrol.accepted_at", self.accepted_at)
        self.started_at = self.scope.get("vmcontrol.accepted_wall") or timezone.now()
        self.auth_deadline = self.accepted_at + self.state.config.auth_timeout
        client = self.scope.get("client") or ["", 0]
        self.peer = f"{client[0]}:{client[1]}"
        self.peer_key = peer_key(str(client[0]))
        self.opened = True
        self.state.connections[self.session_id] = self

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
        await self._end(self.end_reason or message.get("reason") or "closed")
        raise StopConsumer()

    async def expire(self, reason: str) -> None:
        """Called by the server's watchdog: a silent authorized connection, or an unauthorized
        one past its deadline. The agent gets `error {code: timeout}`, then the close."""
        if not self.end_reason:
            self.end_reason = reason
            await self._write(error_frame(TIMEOUT, reason.replace("_", " ")))
            await self._close(reason)

    async def drop(self, reason: str) -> None:
        """Close at once (the server lost its lease: the database already ended the session)."""
        if not self.end_reason:
            await self._close(reason)

    async def _end(self, reason: str) -> None:
        """Release everything the session holds, once: the server's registry, the authorized
        gauge and group, pending commands (failed as `closed`), and the session row (`end`
        event, which also takes the VM offline). Each step is guarded so one failing step
        (a channel layer that is down) cannot skip the others; the `end` event always goes for
        a session that has a row. A connection that never authorized has none: it is counted
        (`vmcontrol_unauthenticated_sessions_total{reason}`) and logged instead."""
        if self.ended or not self.opened:
            return
        self.ended = True
        if not self.persisted:
            self.state.connections.pop(self.session_id, None)
            UNAUTHENTICATED.labels(reason).inc()
            # Port probes and health checks close quietly; a refused or timed-out peer is news.
            log = logger.info if self.failures or reason != "closed" else logger.debug
            log(
                "vmcontrol_session_unauthenticated",
                peer=self.peer,
                reason=reason,
                failed_attempts=self.failures,
                seconds=round(time.monotonic() - self.accepted_at, 3),
            )
            return
        try:
            self.state.connections.pop(self.session_id, None)
            try:
                await self._deauthorize()
            except Exception:
                logger.exception("vmcontrol_cleanup_failed", step="group_discard")
            for command_id, (reply_to, _, _, sent_at) in list(self.pending.items()):
                try:
                    await self._command_finish(
                        command_id, reply_to, ok=False, error={"code": "closed"}, sent_at=sent_at
                    )
                except Exception:
                    logger.exception("vmcontrol_cleanup_failed", step="pending_command")
            self.pending.clear()
        finally:
            self.state.submit(
                AgentEvent(kind="end", session_id=self.session_id, vm_id=self.vm_id, reason=reason)
            )

    # Frames ---------------------------------------------------------------------------------

    async def _handle_line(self, line: bytes) -> None:
        frame_id: Any = None
        kind = ""
        try:
            frame = decode_frame(line, allowed=None if self.authorized else PRE_AUTH_TYPES)
            frame_id, kind = frame["id"], frame["type"]
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
            logger.exception("vmcontrol_frame_failed", frame_type=kind, vm_id=self.vm_id)
            await self._write(error_frame(INTERNAL, INTERNAL_MESSAGE, frame_id))

    async def _refuse(self, error: ProtocolError) -> None:
        await self._write(protocol_error_frame(error))
        if error.close:
            await self._close("protocol_error")

    async def _close(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason
        await self.send({"type": "tcp.close"})

    async def _write(self, frame: Frame) -> None:
        """Send one frame; if it cannot be encoded or written, close the transport: a session
        that lost a frame is out of step, and a reconnect puts it back in step."""
        try:
            data = encode_frame(frame)
            await self.send({"type": "tcp.send", "bytes": data})
        except Exception:
            logger.exception("vmcontrol_write_failed", frame_type=frame.get("type"))
            try:
                await self._close("server_error")
            except Exception:
                logger.exception("vmcontrol_close_failed")

    def _reply(self, kind: str, request: Frame, **fields: Any) -> Frame:
        frame: Frame = {"type": kind, **fields}
        if request["id"] is not None:
            frame["id"] = request["id"]
        return frame

    async def on_hello(self, frame: Frame) -> None:
        # A claim, not a credential: `vm_id` is ignored until `auth` proves it (no row, no
        # status change), and repeating `hello` does not move the authorization deadline.
        if frame["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(
                UNSUPPORTED_VERSION,
                f"server speaks protocol {PROTOCOL_VERSION}",
                frame_id=frame["id"],
                close=True,
            )
        if frame["inventory"] is not None:
            self.inventory = frame["inventory"]
        await self._write(
            self._reply(
                "welcome",
                frame,
                protocol=PROTOCOL_VERSION,
                session_id=str(self.session_id),
                heartbeat_interval=self.state.config.heartbeat_interval,
            )
        )

    async def _attempt(self, event: AgentEvent, frame: Frame) -> AgentEventResult | None:
        """Judge one `auth`/`enroll` (`ServerState.attempt`). Returns the result when it
        succeeded; a refusal is answered here (`rate_limited` with `retry_after`, or
        `auth_failed`) and counted, and the last allowed one closes the connection with
        `too_many_attempts`."""
        result = await self.state.attempt(event)
        if result.ok and result.vm_id is not None:
            return result
        self.failures += 1
        if result.error == RATE_LIMITED:
            AUTH_REFUSED.labels(event.kind, "rate_limited").inc()
            await self._write(
                error_frame(
                    RATE_LIMITED,
                    "too many failed attempts from this address; try again later",
                    frame["id"],
                    retry_after=max(1, math.ceil(result.retry_after)),
                )
            )
        else:
            AUTH_REFUSED.labels(event.kind, "failed").inc()
            message = (
                "Enrollment refused."
                if event.kind == "enroll"
                else services.AuthFailed.default_message
            )
            await self._write(error_frame(AUTH_FAILED, message, frame["id"]))
        if self.failures >= self.state.config.auth_attempts and not self.end_reason:
            await self._write(error_frame(TOO_MANY_ATTEMPTS, "too many failed attempts"))
            await self._close("too_many_attempts")
        return None

    def _event(self, kind: str, **fields: Any) -> AgentEvent:
        return AgentEvent(
            kind=kind,
            session_id=self.session_id,
            peer=self.peer,
            peer_key=self.peer_key,
            started_at=self.started_at,
            **fields,
        )

    async def on_enroll(self, frame: Frame) -> None:
        if self.authorized:
            raise ProtocolError(ALREADY_AUTHORIZED, "already authorized", frame_id=frame["id"])
        event = self._event(
            "enroll",
            secret=frame["secret"],
            name=frame["name"] or f"vm-{self.session_id.hex[:8]}",
            inventory=frame["inventory"],
        )
        result = await self._attempt(event, frame)
        if result is None:
            return
        self.inventory = frame["inventory"]
        await self._write(self._reply("enrolled", frame, vm_id=result.vm_id, token=result.token))

    async def on_auth(self, frame: Frame) -> None:
        if self.authorized:
            raise ProtocolError(ALREADY_AUTHORIZED, "already authorized", frame_id=frame["id"])
        event = self._event(
            "auth",
            vm_id=frame["vm_id"],
            token=frame["token"],
            inventory=frame["inventory"] or self.inventory,
        )
        result = await self._attempt(event, frame)
        if result is None or result.vm_id is None:
            return
        vm_id = self.vm_id = result.vm_id
        self.persisted = True
        if self.end_reason:
            # Closed while the check ran (the deadline passed): the `end` event, queued after
            # this auth, closes the row it got and takes the VM offline again.
            return
        structlog.contextvars.bind_contextvars(vm_id=vm_id)
        self.authorized = True
        AUTHORIZED.inc()
        self.group = bus.vm_group(vm_id)
        # Older connections of this VM (a reconnect the server has not noticed) step aside.
        await bus.vm_replaced_send(self.channel_layer, vm_id=vm_id, session_id=str(self.session_id))
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.state.mark_seen(vm_id)
        await self._write(self._reply("auth_ok", frame, vm_id=vm_id))

    async def on_ping(self, frame: Frame) -> None:
        console_count("vmcontrol.heartbeats")
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
            raise ProtocolError(UNKNOWN_COMMAND, "no such pending command", frame_id=frame["id"])
        reply_to, name, args, sent_at = pending
        if frame["ok"] and name == "update_specs":
            # The specs the agent now runs with: a later `auth` without an inventory (after an
            # operator's logout) must not bring back the ones it said hello with.
            with contextlib.suppress(ProtocolError):
                self.inventory = inventory_parse(frame["data"], field="data")
        await self._command_finish(
            frame["id"],
            reply_to,
            ok=frame["ok"],
            data=frame["data"],
            error=frame["error"],
            name=name,
            args=args,
            sent_at=sent_at,
        )
        await self._write(self._reply("ack", frame))

    async def on_logout(self, frame: Frame) -> None:
        await self._deauthorize()
        await self.state.apply(
            AgentEvent(kind="deauth", session_id=self.session_id, vm_id=self.vm_id)
        )
        await self._write(self._reply("logged_out", frame))

    async def on_bye(self, frame: Frame) -> None:
        await self._close("bye")

    async def _deauthorize(self) -> None:
        if self.authorized:
            AUTHORIZED.dec()
            # Logged out (by the agent, an operator or a token change): the connection gets a
            # fresh `auth_timeout` to authorize again before the watchdog closes it.
            self.auth_deadline = time.monotonic() + self.state.config.auth_timeout
        self.authorized = False
        self.last_frame_at = time.monotonic()
        if self.group is not None:
            group, self.group = self.group, None
            await self.channel_layer.group_discard(group, self.channel_name)

    # Channel-layer events -------------------------------------------------------------------

    async def vm_command(self, message: dict[str, Any]) -> None:
        command_id, reply_to = message["command_id"], message["reply_to"]
        if not self.authorized or self.end_reason:
            await self._command_finish(
                command_id, reply_to, ok=False, error={"code": "not_authorized"}
            )
            return
        self.pending[command_id] = (reply_to, message["name"], message["args"], timezone.now())
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
            await self._close("replaced")

    async def _command_finish(
        self,
        command_id: str | int,
        reply_to: str,
        *,
        ok: bool,
        data: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        name: str = "",
        args: dict[str, Any] | None = None,
        sent_at: datetime | None = None,
    ) -> None:
        status = await orm_async(services.command_complete)(
            command_id=str(command_id),
            vm_id=self.vm_id,
            ok=ok,
            data=data,
            error=error,
            name=name,
            args=args,
            sent_at=sent_at,
        )
        await bus.command_done_send(
            self.channel_layer, reply_to, command_id=command_id, status=status, error=error
        )


application = ProtocolTypeRouter({"tcp": AgentConsumer.as_asgi()})
"""The agent TCP server's ASGI application: every connection (a `tcp` scope made by
`vmcontrol.server`) is one AgentConsumer. The wiring (`run_vmcontrol_server`, the embedded
process `runall` starts) hands it to `server.serve`."""
