"""The thin asyncio TCP server: each connection becomes an instance of an ASGI application with
a `tcp` scope; the wiring hands in the application (`vmcontrol.consumers.application`: a router
that sends the scope to the agent consumer).

Messages in (to the application): `tcp.connect`, `tcp.receive {bytes}`, `tcp.disconnect
{reason}`. Messages out: `tcp.send {bytes}`, `tcp.close`. Framing and the protocol itself live in
the consumer; what the connections of this process share (the batched event writer, last-seen
times, the watchdog, the failed-attempt limiter, the lease) lives in `vmcontrol.sessions`, and
reaches each connection in its scope (`vmcontrol.state`).
"""

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog
from django.conf import settings
from django.utils import timezone

from vmcontrol.metrics import CONNECTIONS
from vmcontrol.protocol import INTERNAL, encode_frame, error_frame
from vmcontrol.sessions import ServerConfig, ServerState

logger = structlog.get_logger(__name__)

MAX_QUEUED_MESSAGES = 64
DEFAULT_SERVER_NAME = "{host}:{port}"
"""A name unique among copies (two copies on one host cannot bind one port) and stable across
a copy's restarts, so a restarted copy closes what it left open at once."""
CRASHED_FRAME = encode_frame(error_frame(INTERNAL, "the server could not serve this connection"))


ASGIApp = Callable[..., Any]


class _TcpConnection(asyncio.Protocol):
    """Bridges one socket to one application instance (the agent consumer)."""

    def __init__(self, app: ASGIApp, state: ServerState, instances: set["_TcpConnection"]):
        # Made by the server at accept, before a TLS handshake: the authorization deadline
        # counts from here.
        self.accepted_at = time.monotonic()
        self.accepted_wall = timezone.now()
        self.app = app
        self.state = state
        self.instances = instances
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        sockname = transport.get_extra_info("sockname") or ("", 0)
        scope = {
            "type": "tcp",
            "client": [str(peer[0]), int(peer[1])],
            "server": [str(sockname[0]), int(sockname[1])],
            "vmcontrol.state": self.state,
            "vmcontrol.accepted_at": self.accepted_at,
            "vmcontrol.accepted_wall": self.accepted_wall,
        }
        self.queue.put_nowait({"type": "tcp.connect"})
        self.instances.add(self)
        CONNECTIONS.inc()
        self.task = asyncio.get_running_loop().create_task(
            self._run(scope), name="vmcontrol-connection"
        )

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:
            # The consumer answers and logs what happens inside a frame; this is the application
            # itself failing (no channel layer at connect): tell the agent, then close.
            logger.exception("vmcontrol_consumer_crashed", client=scope["client"])
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(CRASHED_FRAME)
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            self.instances.discard(self)

    async def _receive(self) -> dict[str, Any]:
        message = await self.queue.get()
        if self.paused and self.queue.qsize() < MAX_QUEUED_MESSAGES // 2 and self.transport:
            self.paused = False
            self.transport.resume_reading()
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if message["type"] == "tcp.send":
            self.transport.write(message["bytes"])
        elif message["type"] == "tcp.close":
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait({"type": "tcp.receive", "bytes": data})
        if self.queue.qsize() >= MAX_QUEUED_MESSAGES and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnect("closed")

    def disconnect(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        CONNECTIONS.dec()
        self.queue.put_nowait({"type": "tcp.disconnect", "reason": reason})
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context when a certificate is configured (TLS 1.2 or later), else
    None (plaintext). A missing or unreadable certificate or key fails the start loudly."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key or None)
    return context


async def serve(
    stop: asyncio.Event,
    *,
    app: ASGIApp,
    host: str | None = None,
    port: int | None = None,
    config: ServerConfig | None = None,
    started: Callable[[int], None] | None = None,
) -> None:
    """Run the agent server until `stop` is set; `started(port)` is called once listening.
    Each connection is an instance of `app` (`vmcontrol.consumers.application`).

    The port is bound first (not yet accepting), so `{host}` and `{port}` in the server name
    (VMCONTROL_SERVER_NAME; empty means `DEFAULT_SERVER_NAME`) become this host's name and
    the bound port; then the server's lease is taken (waiting for a predecessor's to lapse;
    `services.LeaseHeld` when a live process holds the name) and renewed every third of its
    TTL (`ServerState.lease_keeper`), sessions a killed predecessor of the same name left open
    are closed, and only then are agents accepted. On stop every connection ends with reason
    `server_shutdown`, queued writes are drained and the lease is released; a server that
    finds another live process serving under its name stops so and raises `LeaseHeld`. With a TLS
    certificate the handshake counts against the authorization deadline
    (`ssl_handshake_timeout` = `auth_timeout`).
    """
    state = ServerState(config or ServerConfig())
    tls = tls_context(state.config)
    instances: set[_TcpConnection] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _TcpConnection(app, state, instances),
        host=settings.BIND_HOST if host is None else host,
        port=settings.VMCONTROL_PORT if port is None else port,
        ssl=tls,
        ssl_handshake_timeout=state.config.auth_timeout if tls is not None else None,
        backlog=4096,
        reuse_address=True,
        start_serving=False,
    )
    bound_port = int(server.sockets[0].getsockname()[1])
    # Within the 128 characters a session row keeps.
    state.config.server_name = (
        (state.config.server_name or DEFAULT_SERVER_NAME)
        .replace("{host}", state.host[:120])
        .replace("{port}", str(bound_port))
    )[:128]
    try:
        await state.open()
    except BaseException:
        server.close()
        state.close()
        raise
    await server.start_serving()
    logger.info(
        "vmcontrol_server_listening",
        port=bound_port,
        tls=tls is not None,
        server=state.config.server_name,
    )
    state.start(stop)
    if started is not None:
        started(bound_port)
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(instances):
            connection.disconnect("server_shutdown")
        tasks = [c.task for c in instances if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await state.shutdown()
        logger.info("vmcontrol_server_stopped")
    if state.fatal is not None:
        raise state.fatal
