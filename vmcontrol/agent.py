"""The VM agent: dials the control server, authorizes, heartbeats, applies commands, and
reconnects with exponential backoff and full jitter. `AgentFleet` runs many in one loop (the
`--count` mode used to simulate a fleet). No Django: it only speaks vmcontrol.protocol.

It logs through structlog (`vmcontrol_agent_*` events; `run_vm_agent` renders them for people
or as JSON lines): INFO when it connects, authorizes, is logged out or runs a command, WARNING
before each reconnect (with the backoff delay), ERROR when its credentials are refused. A
refusal of its credentials (`auth_failed`, `enroll_failed`, `too_many_attempts`: a wrong,
revoked or rotated token, a wrong enrollment secret) is definitive: after `max_auth_failures`
of them in a row the agent gives up (`Agent.gave_up`) instead of retrying forever; network
failures and `rate_limited` refusals are transient and retried with backoff.

An agent may know several servers (copies of the control server sharing one database and
channel layer): when its connection fails or ends, the next attempt dials the next server in
turn, so the agents of a server that died come back on the others. A fleet spreads its agents
over the servers from the start. Refusals and `rate_limited` keep the same server.

Over TLS (`client_tls_context`) the agent verifies the server's certificate against the given
CA file (or the system's trust store) and checks the host name; there is no way to turn either
check off. A certificate it does not trust ends the attempt before a byte of the protocol is
sent (counted in `FleetStats.tls_failures`, logged once per run of failures)."""

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from vmcontrol.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Frame,
    ProtocolError,
    decode_server_frame,
    encode_frame,
    inventory_parse,
)

logger = structlog.get_logger(__name__)


REFUSAL_CODES = frozenset({"auth_failed", "enroll_failed", "too_many_attempts"})
"""Error codes that refuse the agent's credentials: retrying with them cannot succeed."""


class AgentRefused(Exception):
    """The server refused our credentials: retrying with them is pointless until they change."""


class AgentRateLimited(Exception):
    """The server locked our address out after failed attempts; wait `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited for {retry_after} s")
        self.retry_after = retry_after


def client_tls_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the server: its certificate must chain to `ca_file`
    (PEM; the system's trust store when None) and name the host dialed (or the
    `server_hostname` given to the agent). TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class AgentIdentity:
    name: str
    vm_id: int | None = None
    token: str | None = None
    inventory: dict[str, Any] = field(
        default_factory=lambda: {
            "cpu_cores": 2,
            "ram_mb": 2048,
            "disks": [{"name": "root", "size_gb": 20}],
        }
    )


@dataclass
class FleetStats:
    connects: int = 0
    authorized_now: int = 0
    auths: int = 0
    auth_failures: int = 0
    rate_limited: int = 0
    tls_failures: int = 0
    disconnects: int = 0
    commands: int = 0
    logouts: int = 0
    pongs: int = 0
    gave_up: int = 0
    """agents that stopped because their credentials were refused (`Agent.gave_up`)"""
    last_auth_at: float = 0.0
    rtts: list[tuple[float, float]] = field(default_factory=list)
    """(wall time the pong arrived, round trip seconds)"""

    def counters(self) -> dict[str, Any]:
        return {
            "connects": self.connects,
            "authorized_now": self.authorized_now,
            "auths": self.auths,
            "auth_failures": self.auth_failures,
            "rate_limited": self.rate_limited,
            "tls_failures": self.tls_failures,
            "disconnects": self.disconnects,
            "commands": self.commands,
            "logouts": self.logouts,
            "pongs": self.pongs,
            "gave_up": self.gave_up,
            "last_auth_at": self.last_auth_at,
            "at": time.time(),
        }


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog): uniform(0, min(cap,
    base·2^attempt)), so a restarted server is not hit by every agent at the same instant."""
    return random.uniform(0, min(cap, base * (2**attempt)))


class Agent:
    def __init__(
        self,
        host: str,
        port: int,
        identity: AgentIdentity,
        *,
        stats: FleetStats | None = None,
        enroll_secret: str = "",
        answer_commands: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        on_enrolled: Callable[["Agent"], None] | None = None,
        record_rtts: bool = True,
        max_auth_failures: int | None = None,
        chatty: bool = True,
        more_servers: Sequence[tuple[str, int]] = (),
        start_at: int = 0,
    ) -> None:
        """`max_auth_failures`: refusals of the credentials in a row after which `run` gives
        up (None: never). `chatty`: log connects, authorizations and reconnects at INFO and
        WARNING (a simulated fleet logs them at DEBUG; refusals are always ERROR).
        `more_servers`: (host, port) of other copies of the server, dialed in turn after
        `host`:`port` when a connection fails or ends; the first attempt dials the one at
        `start_at` (modulo their number) in that list."""
        self.servers: list[tuple[str, int]] = [(host, port), *more_servers]
        self._server_index = start_at % len(self.servers)
        self.server_hostname = server_hostname
        """the name the server certificate must carry, when it is not `host` (TLS only)"""
        self.identity = identity
        self.stats = stats or FleetStats()
        self.enroll_secret = enroll_secret
        self.answer_commands = answer_commands
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.tls = tls
        self.on_enrolled = on_enrolled
        self.record_rtts = record_rtts
        self.max_auth_failures = max_auth_failures
        self._chatty_level = logging.INFO if chatty else logging.DEBUG
        self._warning_level = logging.WARNING if chatty else logging.DEBUG
        self.refusals = 0
        """refusals of the credentials since the last successful authorization"""
        self.gave_up: str | None = None
        """why `run` stopped for good (credentials refused `max_auth_failures` times), or None"""
        self.authorized = asyncio.Event()
        self.attempts: list[float] = []
        """monotonic time of every connection attempt (tests check the backoff)"""
        self._writer: asyncio.StreamWriter | None = None
        self._counter = 0

    @property
    def host(self) -> str:
        """The host of the server the agent dials now (or is connected to)."""
        return self.servers[self._server_index][0]

    @property
    def port(self) -> int:
        """The port of the server the agent dials now (or is connected to)."""
        return self.servers[self._server_index][1]

    def _next_server(self) -> None:
        self._server_index = (self._server_index + 1) % len(self.servers)

    def _next_id(self) -> str:
        self._counter += 1
        return f"a{self._counter}"

    async def _send(self, frame: Frame) -> None:
        assert self._writer is not None
        self._writer.write(encode_frame(frame))
        await self._writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> Frame:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        return decode_server_frame(line)

    async def _expect(self, reader: asyncio.StreamReader, *types: str) -> Frame:
        frame = await self._read(reader)
        self._raise_for_refusal(frame)
        if frame["type"] not in types:
            raise ConnectionError(f"expected {types}, got {frame}")
        return frame

    @staticmethod
    def _raise_for_refusal(frame: Frame) -> None:
        if frame["type"] != "error":
            return
        code = frame.get("code")
        if code == "rate_limited":
            retry_after = frame.get("retry_after")
            wait = retry_after if isinstance(retry_after, int | float) else 60
            raise AgentRateLimited(float(min(max(wait, 1), 3600)))
        if code in REFUSAL_CODES:
            raise AgentRefused(f"{code}: {frame.get('message', 'refused')}")

    def _log(self, level: int, event: str, **fields: Any) -> None:
        logger.log(level, event, vm_id=self.identity.vm_id, name=self.identity.name, **fields)

    def _refused(self, error: AgentRefused) -> bool:
        """Count a refusal of the credentials; True when it is the last one allowed."""
        self.stats.auth_failures += 1
        self.refusals += 1
        last = self.max_auth_failures is not None and self.refusals >= self.max_auth_failures
        self._log(
            logging.ERROR,
            "vmcontrol_agent_auth_failed",
            error=str(error),
            attempt=self.refusals,
            attempts=self.max_auth_failures or "unlimited",
        )
        if last:
            self.gave_up = str(error)
            self.stats.gave_up += 1
            self._log(logging.ERROR, "vmcontrol_agent_giving_up", attempts=self.refusals)
        return last

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, and on any failure wait a jittered backoff and connect again (at
        least the `retry_after` of a `rate_limited` refusal), to the next server when the
        connection failed or ended (not after a refusal). Returns when `stop` is set, or when
        the credentials were refused `max_auth_failures` times in a row (`gave_up`)."""
        attempt = 0
        tls_failing = False
        while not stop.is_set():
            self.attempts.append(time.monotonic())
            at_least = 0.0
            reason = "the server closed the connection"
            # The server judged us: another copy shares its database and would judge the same.
            judged = False
            try:
                await self._session(stop)
                attempt = 0
            except AgentRefused as refused:
                reason = str(refused)
                judged = True
                if self._refused(refused):
                    self._disconnected()
                    return
            except AgentRateLimited as limited:
                self.stats.rate_limited += 1
                at_least = limited.retry_after
                reason = f"rate limited for {limited.retry_after:g} s after failed attempts"
                judged = True
            except ssl.SSLCertVerificationError as error:
                self.stats.tls_failures += 1
                if not tls_failing:
                    logger.error(
                        "vmcontrol_agent_tls_refused",
                        host=self.server_hostname or self.host,
                        port=self.port,
                        error=f"certificate verify failed: {error.verify_message or error}",
                    )
                tls_failing = True
                reason = "the server certificate was refused"
            except (OSError, ConnectionError, ProtocolError, asyncio.IncompleteReadError) as error:
                reason = str(error) or type(error).__name__
            else:
                tls_failing = False
            if self._disconnected():
                # We were authorized: the next attempt starts the backoff from the beginning.
                attempt = 0
            if stop.is_set():
                break
            if not judged:
                self._next_server()
            delay = max(
                at_least, backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_cap)
            )
            attempt += 1
            self._log(
                self._warning_level,
                "vmcontrol_agent_reconnecting",
                reason=reason,
                delay_seconds=round(delay, 2),
                attempt=attempt,
                next_server=f"{self.host}:{self.port}",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _disconnected(self) -> bool:
        """Count a disconnect; True when the agent had been authorized."""
        self.stats.disconnects += 1
        if not self.authorized.is_set():
            return False
        self.authorized.clear()
        self.stats.authorized_now -= 1
        return True

    async def _session(self, stop: asyncio.Event) -> None:
        reader, self._writer = await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.tls,
            server_hostname=(self.server_hostname or self.host) if self.tls else None,
            limit=MAX_FRAME_BYTES,
        )
        self.stats.connects += 1
        self._log(
            self._chatty_level,
            "vmcontrol_agent_connected",
            host=self.host,
            port=self.port,
            tls=self.tls is not None,
        )
        try:
            await self._handshake(reader)
            await self._serve(reader, stop)
        finally:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                if stop.is_set():
                    writer.write(encode_frame({"type": "bye"}))
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _handshake(self, reader: asyncio.StreamReader) -> None:
        hello: Frame = {
            "type": "hello",
            "id": self._next_id(),
            "protocol": PROTOCOL_VERSION,
            "inventory": self.identity.inventory,
        }
        if self.identity.vm_id is not None:
            hello["vm_id"] = self.identity.vm_id
        await self._send(hello)
        welcome = await self._expect(reader, "welcome")
        self.heartbeat_interval = float(welcome["heartbeat_interval"])
        if self.identity.token is None:
            if not self.enroll_secret:
                raise AgentRefused("no token and no enrollment secret")
            await self._send(
                {
                    "type": "enroll",
                    "id": self._next_id(),
                    "secret": self.enroll_secret,
                    "name": self.identity.name,
                    "inventory": self.identity.inventory,
                }
            )
            enrolled = await self._expect(reader, "enrolled")
            self.identity.vm_id, self.identity.token = enrolled["vm_id"], enrolled["token"]
            self._log(self._chatty_level, "vmcontrol_agent_enrolled")
            if self.on_enrolled is not None:
                self.on_enrolled(self)
        await self._authorize(reader)

    async def _authorize(self, reader: asyncio.StreamReader) -> None:
        await self._send(
            {
                "type": "auth",
                "id": self._next_id(),
                "vm_id": self.identity.vm_id,
                "token": self.identity.token,
                "inventory": self.identity.inventory,
            }
        )
        await self._expect(reader, "auth_ok")
        self._authorized_now()

    def _authorized_now(self) -> None:
        self.stats.auths += 1
        self.stats.authorized_now += 1
        self.stats.last_auth_at = time.time()
        self.refusals = 0
        self.authorized.set()
        self._log(self._chatty_level, "vmcontrol_agent_authorized", host=self.host, port=self.port)

    async def _serve(self, reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
        """Read frames and ping until the connection fails or `stop` is set (three long-lived
        tasks per agent, nothing created per frame: a fleet process stays cheap)."""
        tasks = [
            asyncio.create_task(self._read_loop(reader)),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            await self._on_frame(reader, await self._read(reader))

    async def _heartbeat(self) -> None:
        # A random phase spreads a fleet's pings evenly over the interval.
        await asyncio.sleep(random.uniform(0, self.heartbeat_interval))
        while True:
            self._ping_sent = time.perf_counter()
            await self._send({"type": "ping"})
            await asyncio.sleep(self.heartbeat_interval)

    async def _on_frame(self, reader: asyncio.StreamReader, frame: Frame) -> None:
        kind = frame["type"]
        if kind == "pong":
            self.stats.pongs += 1
            if self.record_rtts:
                self.stats.rtts.append((time.time(), time.perf_counter() - self._ping_sent))
        elif kind == "auth_ok":
            self._authorized_now()
        elif kind == "error":
            self._raise_for_refusal(frame)
        elif kind == "command":
            self.stats.commands += 1
            if self.answer_commands:
                result = self._command_result(frame)
                await self._send(result)
                self._log(
                    self._chatty_level,
                    "vmcontrol_agent_command",
                    command=frame.get("name"),
                    ok=result["ok"],
                    inventory=self.identity.inventory if result["ok"] else None,
                    error=result.get("error"),
                )
        elif kind == "logout":
            self.stats.logouts += 1
            self.stats.authorized_now -= 1
            self.authorized.clear()
            reason = frame.get("reason")
            self._log(self._chatty_level, "vmcontrol_agent_logged_out", reason=reason)
            if reason in ("token_rotated", "token_revoked"):
                raise ConnectionError(f"logged out: {reason}")
            # Logged out by an operator: authorize again on this connection.
            await asyncio.sleep(0.05)
            await self._authorize_on_live_connection()

    async def _authorize_on_live_connection(self) -> None:
        await self._send(
            {
                "type": "auth",
                "id": self._next_id(),
                "vm_id": self.identity.vm_id,
                "token": self.identity.token,
                "inventory": self.identity.inventory,
            }
        )

    def _command_result(self, frame: Frame) -> Frame:
        if frame.get("name") != "update_specs":
            return {
                "type": "result",
                "id": frame["id"],
                "ok": False,
                "error": {"code": "unknown_command", "message": str(frame.get("name"))},
            }
        try:
            inventory = inventory_parse(frame.get("args"), field="args")
        except ProtocolError as error:
            return {
                "type": "result",
                "id": frame["id"],
                "ok": False,
                "error": {"code": error.code, "message": error.message},
            }
        self.identity.inventory = inventory.as_dict()
        return {"type": "result", "id": frame["id"], "ok": True, "data": inventory.as_dict()}


class AgentFleet:
    """Many agents in one process; identities persist in a JSON state file."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        count: int,
        state_file: Path | None,
        enroll_secret: str = "",
        identities: list[AgentIdentity] | None = None,
        answer_commands: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        record_rtts: bool = True,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_auth_failures: int | None = None,
        more_servers: Sequence[tuple[str, int]] = (),
    ) -> None:
        """`more_servers`: other copies of the server (see `Agent`); agent i dials server
        i mod n first, so the fleet starts spread over all of them."""
        self.stats = FleetStats()
        self.state_file = state_file
        known = identities or self._load()
        while len(known) < count:
            known.append(AgentIdentity(name=f"sim-{len(known) + 1}"))
        self.agents = [
            Agent(
                host,
                port,
                identity,
                stats=self.stats,
                enroll_secret=enroll_secret,
                answer_commands=answer_commands,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
                on_enrolled=lambda _agent: self._save(),
                record_rtts=record_rtts,
                tls=tls,
                server_hostname=server_hostname,
                max_auth_failures=max_auth_failures,
                # One agent narrates its life; a simulated fleet leaves that to the summaries.
                chatty=count == 1,
                more_servers=more_servers,
                start_at=index,
            )
            for index, identity in enumerate(known[:count])
        ]

    def _load(self) -> list[AgentIdentity]:
        if self.state_file is None or not self.state_file.exists():
            return []
        return [AgentIdentity(**row) for row in json.loads(self.state_file.read_text())]

    def _save(self) -> None:
        if self.state_file is None:
            return
        rows = [
            {
                "name": a.identity.name,
                "vm_id": a.identity.vm_id,
                "token": a.identity.token,
                "inventory": a.identity.inventory,
            }
            for a in self.agents
            if a.identity.token
        ]
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(self.state_file)

    async def run(self, stop: asyncio.Event, *, ramp_seconds: float = 0.0) -> None:
        async def start(index: int, agent: Agent) -> None:
            if ramp_seconds:
                await asyncio.sleep(ramp_seconds * index / max(1, len(self.agents)))
            await agent.run(stop)

        await asyncio.gather(*(start(i, a) for i, a in enumerate(self.agents)))
