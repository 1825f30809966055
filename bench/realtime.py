"""Messenger benchmark: the realtime app's /ws/ against a bare `websockets` broadcast server,
and the choice of the ASGI server that carries WebSocket in production.

Servers (BENCH_RT_SERVERS, comma-separated names of `SERVERS`; default all): each candidate
serves `config.asgi:application` and is measured on scenarios 1 and 2; the chosen one
(`CHOSEN`, the command line compose and the Procfile use) also on 3-5.
1. idle: BENCH_RT_IDLE authenticated idle sockets held; server RSS per socket (the whole process
   tree: granian serves from child processes), against the bare server with its defaults
   (permessage-deflate negotiated: the figure the target is stated against) and without
   compression (the same wire settings as ours).
2. fanout: one room of BENCH_RT_FANOUT_SUBS subscribers, BENCH_RT_FANOUT_MESSAGES messages sent
   as fast as possible (each persisted); deliveries/s, server CPU per delivered message (from
   /proc, the figure that survives a noisy machine), zero loss and order checked.
3. latency: BENCH_RT_LAT_SUBS subscribers at BENCH_RT_LAT_RATE messages/s (persisted) for
   BENCH_RT_LAT_SECONDS; p50/p99 delivery latency.
4. redis: two server processes on the Redis fan-out, subscribers split between them, sender on
   one; delivered share and p99.
5. recovery: BENCH_RT_RECOVER_CLIENTS clients dropped for BENCH_RT_DROP_SECONDS while messages
   flow, then reconnect + join + sync; time until each holds every missed message in order.

The baseline is a bare `websockets` server (`python bench/realtime.py --bare PORT [--no-deflate]`)
that broadcasts each `sendMessage` to every connection: no auth, rooms, persistence or recovery.
Uses DATABASE_URL/REDIS_URL from the environment (PostgreSQL and Redis in production shape).
Run under `flock /tmp/quintet-bench.lock`.
"""

import asyncio
import hashlib
import importlib.util
import json
import math
import os
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    Report,
    cpu_seconds,
    free_port,
    percentile,
    process,
    wait_for_port,
)

IDLE = int(os.environ.get("BENCH_RT_IDLE", "5000"))
FANOUT_SUBS = int(os.environ.get("BENCH_RT_FANOUT_SUBS", "1000"))
FANOUT_MESSAGES = int(os.environ.get("BENCH_RT_FANOUT_MESSAGES", "200"))
LAT_SUBS = int(os.environ.get("BENCH_RT_LAT_SUBS", "100"))
LAT_RATE = float(os.environ.get("BENCH_RT_LAT_RATE", "50"))
LAT_SECONDS = float(os.environ.get("BENCH_RT_LAT_SECONDS", "8"))
REDIS_SUBS = int(os.environ.get("BENCH_RT_REDIS_SUBS", "200"))
REDIS_RATE = float(os.environ.get("BENCH_RT_REDIS_RATE", "25"))
RECOVER_CLIENTS = int(os.environ.get("BENCH_RT_RECOVER_CLIENTS", "100"))
DROP_SECONDS = float(os.environ.get("BENCH_RT_DROP_SECONDS", "5"))
RECOVER_RATE = float(os.environ.get("BENCH_RT_RECOVER_RATE", "20"))
CONNECT_CONCURRENCY = 50

SERVER_ENV = {
    "DJANGO_SETTINGS_MODULE": "config.settings",
    "REALTIME_RATE_PER_SECOND": "100000",
    "REALTIME_RATE_BURST": "100000",
    "REALTIME_USER_RATE_PER_SECOND": "100000",
    "REALTIME_USER_RATE_BURST": "100000",
    "REALTIME_SEND_BUFFER_FRAMES": "20000",
    "REALTIME_AUTOJOIN_DEFAULT_ROOM": "false",
    "REALTIME_TICKET_TTL_SECONDS": "3600",
    "LOG_LEVEL": "WARNING",
    # Production shape: DEBUG off (no query log), plain HTTP on loopback.
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "DJANGO_SECURE_COOKIES": "false",
}


# --- the servers -----------------------------------------------------------------------------

APP = "config.asgi:application"
UVICORN = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--no-access-log"]
UVICORN += ["--lifespan", "off", "--log-level", "warning"]
#: The production WebSocket server flags (compose, Procfile): the websockets Sans-I/O protocol
#: without permessage-deflate (a compressor per socket, and every broadcast frame compressed once
#: per socket), no proxy-headers middleware frame per connection (the proxy's address policy is
#: common/network.py's). Frames above --ws-max-size are closed 1009 by the server; up to it an
#: oversized frame gets the app's `frame_too_large` error and the socket stays open.
PRODUCTION_WS_FLAGS = [
    "--ws",
    "websockets-sansio",
    "--ws-per-message-deflate",
    "false",
    "--ws-max-size",
    "1048576",
    "--no-proxy-headers",
]
PLAIN = ["--ws-per-message-deflate", "false", "--no-proxy-headers"]
#: Candidates by name. `uvicorn-websockets` is the command before this choice (websockets'
#: legacy protocol, permessage-deflate negotiated); `*-nodeflate` the same implementations with
#: the production flags; granian (`asginl`: ASGI without lifespan, as uvicorn's `--lifespan off`).
SERVERS: dict[str, list[str]] = {
    "uvicorn-sansio": [*UVICORN, *PRODUCTION_WS_FLAGS],
    "uvicorn-websockets": [*UVICORN, "--ws", "websockets"],
    "uvicorn-websockets-nodeflate": [*UVICORN, "--ws", "websockets", *PLAIN],
    "uvicorn-wsproto-nodeflate": [*UVICORN, "--ws", "wsproto", *PLAIN],
    "granian-asgi": [
        str(Path(sys.executable).parent / "granian"),
        *("--interface", "asginl", APP, "--host", "127.0.0.1", "--workers", "1"),
        *("--log-level", "warning", "--backlog", "4096", "--backpressure", "100000"),
    ],
}
CHOSEN = "uvicorn-sansio"


def server_args(name: str, port: int) -> list[str]:
    args = SERVERS[name]
    at = args.index("--host") + 2
    return [*args[:at], "--port", str(port), *args[at:]]


def servers_selected() -> list[str]:
    wanted = os.environ.get("BENCH_RT_SERVERS", "")
    names = [n.strip() for n in wanted.split(",") if n.strip()] or list(SERVERS)
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise SystemExit(f"unknown BENCH_RT_SERVERS {unknown}; choose from {list(SERVERS)}")
    return [CHOSEN, *(n for n in names if n != CHOSEN)]


def server_unavailable(name: str) -> str | None:
    if "wsproto" in name and importlib.util.find_spec("wsproto") is None:
        return "wsproto is not installed"
    return None


def rss_tree_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (granian serves from children)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# --- the baseline server --------------------------------------------------------------------


async def bare_server(port: int, compression: str | None) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    clients: set[ServerConnection] = set()
    seq = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal seq
        clients.add(ws)
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "sendMessage":
                    seq += 1
                    out = {"type": "message", "room": "r", "seq": seq, "text": frame["text"]}
                    broadcast(clients, json.dumps(out, separators=(",", ":")))
        finally:
            clients.discard(ws)

    async with serve(
        handler, "127.0.0.1", port, ping_interval=None, max_queue=None, compression=compression
    ):
        await asyncio.Future()


# --- fixtures in the database ---------------------------------------------------------------


def django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def users_ensure(count: int) -> list[int]:
    from django.contrib.auth.models import User

    names = [f"rtbench{n}" for n in range(count)]
    existing = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    User.objects.bulk_create(
        [User(username=name, password="!") for name in names if name not in existing],
        batch_size=1000,
    )
    ids = dict(User.objects.filter(username__in=names).values_list("username", "id"))
    return [ids[name] for name in names]


def tickets_issue(user_ids: list[int]) -> list[str]:
    """Valid single-use tickets, written in bulk (the endpoint would cost one request each)."""
    from django.utils import timezone

    from realtime.models import ConnectionTicket

    raws = [secrets.token_urlsafe(32) for _ in user_ids]
    expires = timezone.now() + timedelta(hours=1)
    ConnectionTicket.objects.bulk_create(
        [
            ConnectionTicket(
                key_hash=hashlib.sha256(raw.encode()).hexdigest(), user_id=uid, expires_at=expires
            )
            for raw, uid in zip(raws, user_ids, strict=True)
        ],
        batch_size=1000,
    )
    return raws


def room_ensure(slug: str) -> None:
    from realtime.models import Room

    Room.objects.get_or_create(slug=slug, defaults={"kind": Room.Kind.PUBLIC})


# --- clients --------------------------------------------------------------------------------


@dataclass
class Sub:
    ws: Any
    seqs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    first_at: float = 0.0
    last_at: float = 0.0

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame.get("type") == "message":
                    self.seqs.append(frame["seq"])
                    self.latencies.append(now - float(frame["text"].split()[0]))
                    self.last_at = now
                    if not self.first_at:
                        self.first_at = now
                else:
                    self.frames.append(frame)
        except Exception:
            return

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.read())

    async def wait_frame(self, kind: str, within: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for frame in self.frames:
                if frame.get("type") == kind:
                    self.frames.remove(frame)
                    return frame
            await asyncio.sleep(0.01)
        raise TimeoutError(kind)


async def open_many(urls: list[str]) -> list[Any]:
    from websockets.asyncio.client import connect

    out: list[Any] = [None] * len(urls)
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int) -> None:
        async with semaphore:
            out[index] = await connect(
                urls[index], ping_interval=None, max_queue=None, open_timeout=60
            )

    await asyncio.gather(*(one(i) for i in range(len(urls))))
    return out


async def subscribers(
    base: str, tickets: list[str] | None, count: int, room: str | None
) -> list[Sub]:
    """Open `count` sockets (ticketed on our server) and join `room` (ours only)."""
    urls = [f"{base}/ws/?ticket={t}" for t in tickets] if tickets else [base] * count
    subs = [Sub(ws) for ws in await open_many(urls)]
    for sub in subs:
        sub.start()
    if room is not None:
        for sub in subs:
            await sub.ws.send(json.dumps({"type": "join", "room": room}))
        for sub in subs:
            await sub.wait_frame("joined")
    return subs


async def close_all(subs: list[Sub]) -> None:
    await asyncio.gather(*(s.ws.close() for s in subs), return_exceptions=True)
    for sub in subs:
        if sub.task:
            sub.task.cancel()


async def sender_open(base: str, ticket: str | None) -> Sub:
    from websockets.asyncio.client import connect

    url = f"{base}/ws/?ticket={ticket}" if ticket else base
    sender = Sub(await connect(url, ping_interval=None, max_queue=None))
    sender.start()
    return sender


async def send_burst(sender: Sub, room: str | None, count: int) -> None:
    for _ in range(count):
        frame: dict[str, Any] = {"type": "sendMessage", "text": f"{time.perf_counter():.6f} x"}
        if room:
            frame["room"] = room
        await sender.ws.send(json.dumps(frame))


async def send_at_rate(sender: Sub, room: str | None, rate: float, seconds: float) -> int:
    total = int(rate * seconds)
    began = time.perf_counter()
    for index in range(total):
        delay = began + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        frame: dict[str, Any] = {"type": "sendMessage", "text": f"{time.perf_counter():.6f} x"}
        if room:
            frame["room"] = room
        await sender.ws.send(json.dumps(frame))
    return total


async def drain(subs: list[Sub], expected: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(len(s.seqs) >= expected for s in subs):
            return
        await asyncio.sleep(0.02)


def in_order_without_loss(subs: list[Sub], expected: int) -> tuple[int, int]:
    """(subscribers missing messages, subscribers with out-of-order or duplicate seqs)."""
    lost = sum(1 for s in subs if len(set(s.seqs)) < expected)
    disordered = sum(1 for s in subs if s.seqs != sorted(set(s.seqs)))
    return lost, disordered


# --- scenarios --------------------------------------------------------------------------------


WARM = 20  # sockets opened and closed first, so lazy imports and pools are not counted


async def idle_measure(base: str, pid: int, tickets: list[str] | None) -> tuple[float, int, float]:
    """(bytes of server RSS per idle socket, sockets still open after 2 s, seconds to open)."""
    warm = await subscribers(base, tickets[:WARM] if tickets else None, WARM, None)
    await close_all(warm)
    await asyncio.sleep(1)
    before = rss_tree_kib(pid)
    began = time.perf_counter()
    subs = await subscribers(base, tickets[WARM:] if tickets else None, IDLE, None)
    opened = time.perf_counter() - began
    await asyncio.sleep(2)
    after = rss_tree_kib(pid)
    alive = sum(1 for s in subs if s.task and not s.task.done())
    await close_all(subs)
    await asyncio.sleep(1)
    return (after - before) * 1024 / IDLE, alive, opened


@dataclass
class Fanout:
    rate: float  # deliveries/s
    cpu_us: float  # server CPU (user + system, process tree) per delivered message
    delivered: int
    lost: int
    disordered: int


async def fanout_measure(base: str, pid: int, user_ids: list[int] | None) -> Fanout:
    """One room (ours: `bench-fanout`, joined; bare: every socket) of FANOUT_SUBS subscribers and
    FANOUT_MESSAGES messages sent back to back by one more socket."""
    tickets = await asyncio.to_thread(tickets_issue, user_ids) if user_ids else None
    room = "bench-fanout" if tickets else None
    subs = await subscribers(base, tickets[1:] if tickets else None, FANOUT_SUBS, room)
    sender = await sender_open(base, tickets[0] if tickets else None)
    cpu_before = cpu_seconds(pid)
    began = time.perf_counter()
    await send_burst(sender, room, FANOUT_MESSAGES)
    await drain(subs, FANOUT_MESSAGES, 120)
    cpu = cpu_seconds(pid) - cpu_before
    finished = max((s.last_at for s in subs), default=began)
    delivered = sum(len(s.seqs) for s in subs)
    lost, disordered = in_order_without_loss(subs, FANOUT_MESSAGES)
    await close_all([*subs, sender])
    await asyncio.sleep(1)
    return Fanout(
        rate=delivered / (finished - began) if finished > began else 0.0,
        cpu_us=cpu * 1e6 / delivered if delivered else math.nan,
        delivered=delivered,
        lost=lost,
        disordered=disordered,
    )


@dataclass
class Baseline:
    idle: float  # bytes per idle socket, bare server with its defaults (deflate)
    idle_plain: float  # bytes per idle socket, bare server without compression
    fanout: Fanout


async def baseline_measure(bare: str, bare_pid: int, plain: str, plain_pid: int) -> Baseline:
    idle, _, _ = await idle_measure(bare, bare_pid, None)
    idle_plain, _, _ = await idle_measure(plain, plain_pid, None)
    fanout = await fanout_measure(bare, bare_pid, None)
    print(
        f"bare websockets server: {idle / 1024:.1f} KiB per idle socket with its default"
        f" permessage-deflate, {idle_plain / 1024:.1f} KiB without;"
        f" fan-out {fanout.rate:,.0f} deliveries/s at {fanout.cpu_us:.1f} us CPU each",
        flush=True,
    )
    return Baseline(idle, idle_plain, fanout)


async def candidate_measure(
    report: Report, name: str, base: str, pid: int, baseline: Baseline
) -> dict[str, Any]:
    """Idle memory and fan-out of one server; correctness checked, figures printed."""
    user_ids = await asyncio.to_thread(users_ensure, max(IDLE + WARM, FANOUT_SUBS + 1))
    tickets = await asyncio.to_thread(tickets_issue, user_ids[: IDLE + WARM])
    per_socket, alive, opened = await idle_measure(base, pid, tickets)
    report.check(alive == IDLE, f"{name}: only {alive} of {IDLE} idle sockets stayed open")
    await asyncio.to_thread(room_ensure, "bench-fanout")
    fanout = await fanout_measure(base, pid, user_ids[: FANOUT_SUBS + 1])
    report.check(fanout.lost == 0, f"{name}: fanout: {fanout.lost} subscribers missed messages")
    report.check(fanout.disordered == 0, f"{name}: fanout: {fanout.disordered} out of order")
    ratio = per_socket / baseline.idle
    print(
        f"  {name:<38} idle {per_socket / 1024:6.1f} KiB/socket  ratio {ratio:5.2f}"
        f" (to bare without deflate {per_socket / baseline.idle_plain:5.2f})"
        f"  fan-out {fanout.rate:8,.0f}/s  cpu {fanout.cpu_us:6.1f} us/delivery"
        f"  (opened {IDLE} in {opened:.1f} s)",
        flush=True,
    )
    return {
        "idle_bytes": per_socket,
        "idle_ratio": ratio,
        "idle_ratio_bare_no_deflate": per_socket / baseline.idle_plain,
        "idle_alive": alive,
        "fanout_per_s": fanout.rate,
        "fanout_cpu_us_per_delivery": fanout.cpu_us,
        "fanout_lost": fanout.lost,
        "fanout_delivered": fanout.delivered,
    }


def chosen_report(report: Report, figures: dict[str, Any], baseline: Baseline) -> None:
    """The chosen server's figures against the bare server, with the targets."""
    per_socket = figures["idle_bytes"]
    report.figure("idle_connections", IDLE, f"idle: {IDLE} authenticated sockets on {CHOSEN}")
    report.compare(
        "idle_bytes_per_connection",
        per_socket,
        baseline.idle,
        "B",
        "memory per idle socket (bare: default deflate)",
    )
    report.compare(
        "idle_bytes_per_connection_bare_no_deflate",
        per_socket,
        baseline.idle_plain,
        "B",
        "memory per idle socket (bare: no compression)",
    )
    alive_all = figures["idle_alive"] == IDLE
    report.target(
        "idle_memory_ratio",
        per_socket <= 1.2 * baseline.idle and alive_all,
        "memory per idle socket <= 1.20 x the bare websockets server's",
    )
    report.target(
        "idle_memory", per_socket <= 40 * 1024 and alive_all, f"{IDLE:,} idle at <= 40 KB each"
    )
    report.figure(
        "fanout_size",
        [FANOUT_SUBS, FANOUT_MESSAGES],
        f"fanout: {FANOUT_SUBS} subscribers x {FANOUT_MESSAGES} messages",
    )
    report.figure("fanout_delivered", figures["fanout_delivered"])
    report.compare(
        "fanout_deliveries_per_s",
        figures["fanout_per_s"],
        baseline.fanout.rate,
        "/s",
        "deliveries/s into one room (persisted)",
    )
    report.compare(
        "fanout_cpu_us_per_delivery",
        figures["fanout_cpu_us_per_delivery"],
        baseline.fanout.cpu_us,
        "us",
        "server CPU per delivered message",
    )
    report.target("fanout", figures["fanout_per_s"] >= 10_000, ">= 10,000 deliveries/s, zero loss")


async def latency_run(
    subs: list[Sub], sender: Sub, room: str | None, rate: float, seconds: float
) -> tuple[float, float, float, int]:
    sent = await send_at_rate(sender, room, rate, seconds)
    await drain(subs, sent, 30)
    samples = [lat * 1000 for s in subs for lat in s.latencies]
    delivered = sum(len(s.seqs) for s in subs)
    share = delivered / (sent * len(subs)) if sent else 0.0
    return percentile(samples, 50), percentile(samples, 99), share, sent


async def latency_scenario(report: Report, ours: str, bare: str) -> None:
    user_ids = await asyncio.to_thread(users_ensure, LAT_SUBS + 1)
    await asyncio.to_thread(room_ensure, "bench-latency")
    figures = {}
    for name, base in (("ours", ours), ("bare", bare)):
        ticketed = name == "ours"
        tickets = await asyncio.to_thread(tickets_issue, user_ids) if ticketed else None
        room = "bench-latency" if ticketed else None
        subs = await subscribers(base, tickets[1:] if tickets else None, LAT_SUBS, room)
        sender = await sender_open(base, tickets[0] if tickets else None)
        figures[name] = await latency_run(subs, sender, room, LAT_RATE, LAT_SECONDS)
        await close_all([*subs, sender])
        await asyncio.sleep(1)
    p50, p99, share, _ = figures["ours"]
    offered = LAT_SUBS * LAT_RATE
    report.figure(
        "latency_size",
        [LAT_SUBS, LAT_RATE, LAT_SECONDS],
        f"latency: {LAT_SUBS} subscribers x {LAT_RATE:g} msg/s = {offered:,.0f} deliveries/s"
        f" for {LAT_SECONDS:g} s",
    )
    report.compare(
        "latency_p50_ms", p50, figures["bare"][0], "ms", "p50 delivery latency (persisted)"
    )
    report.compare(
        "latency_p99_ms", p99, figures["bare"][1], "ms", "p99 delivery latency (persisted)"
    )
    report.check(share == 1.0, f"latency: delivered {share:.4%}")
    report.target("latency", p99 <= 100, "p99 <= 100 ms at 5,000 deliveries/s with persistence")


async def redis_scenario(report: Report, bare: str) -> None:
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        report.figure("redis", "skipped: REDIS_URL not set", "redis: skipped (REDIS_URL not set)")
        return
    user_ids = await asyncio.to_thread(users_ensure, REDIS_SUBS + 1)
    await asyncio.to_thread(room_ensure, "bench-redis")
    env = {**SERVER_ENV, "REDIS_URL": redis_url}
    port_a, port_b = free_port(), free_port()
    with server(port_a, env), server(port_b, env):
        tickets = await asyncio.to_thread(tickets_issue, user_ids)
        half = REDIS_SUBS // 2
        subs = await subscribers(
            f"ws://127.0.0.1:{port_a}", tickets[1 : half + 1], half, "bench-redis"
        )
        subs += await subscribers(
            f"ws://127.0.0.1:{port_b}", tickets[half + 1 :], REDIS_SUBS - half, "bench-redis"
        )
        sender = await sender_open(f"ws://127.0.0.1:{port_a}", tickets[0])
        _, p99, share, sent = await latency_run(
            subs, sender, "bench-redis", REDIS_RATE, LAT_SECONDS
        )
        lost, disordered = in_order_without_loss(subs, sent)
        await close_all([*subs, sender])
    bare_subs = await subscribers(bare, None, REDIS_SUBS, None)
    bare_sender = await sender_open(bare, None)
    _, b99, _, _ = await latency_run(bare_subs, bare_sender, None, REDIS_RATE, LAT_SECONDS)
    await close_all([*bare_subs, bare_sender])
    report.figure(
        "redis_size",
        [REDIS_SUBS, REDIS_RATE],
        f"redis: 2 processes, {REDIS_SUBS} subscribers split, {REDIS_RATE:g} msg/s"
        f" = {REDIS_SUBS * REDIS_RATE:,.0f} deliveries/s",
    )
    report.compare(
        "redis_delivered_pct", share * 100, 100.0, "%", "two processes on Redis: delivered"
    )
    report.compare("redis_p99_ms", p99, b99, "ms", "two processes on Redis: p99 latency")
    report.check(lost == 0 and disordered == 0, f"redis: {lost} lost, {disordered} disordered")
    report.target("redis", share == 1.0 and p99 <= 150, "100 % delivered, p99 <= 150 ms")


async def recovery_scenario(report: Report, ours: str, bare: str) -> None:
    from websockets.asyncio.client import connect

    user_ids = await asyncio.to_thread(users_ensure, RECOVER_CLIENTS + 1)
    await asyncio.to_thread(room_ensure, "bench-recover")
    tickets = await asyncio.to_thread(tickets_issue, user_ids)
    subs = await subscribers(ours, tickets[1:], RECOVER_CLIENTS, "bench-recover")
    sender = await sender_open(ours, tickets[0])
    total_seconds = 2 + DROP_SECONDS + 3
    sending = asyncio.create_task(
        send_at_rate(sender, "bench-recover", RECOVER_RATE, total_seconds)
    )
    await asyncio.sleep(2)
    last_seen = [s.seqs[-1] if s.seqs else 0 for s in subs]
    before = [list(s.seqs) for s in subs]
    await close_all(subs)
    await asyncio.sleep(DROP_SECONDS)
    fresh = await asyncio.to_thread(tickets_issue, user_ids[1:])
    times: list[float] = []
    connected: list[float] = []
    complete = 0

    async def recover(index: int) -> None:
        nonlocal complete
        began = time.perf_counter()
        ws = await connect(f"{ours}/ws/?ticket={fresh[index]}", ping_interval=None, max_queue=None)
        connected.append(time.perf_counter() - began)
        sub = Sub(ws)
        sub.start()
        await ws.send(json.dumps({"type": "join", "room": "bench-recover"}))
        await ws.send(
            json.dumps({"type": "sync", "room": "bench-recover", "after_seq": last_seen[index]})
        )
        batch = await sub.wait_frame("sync")
        replayed = [m["seq"] for m in batch["messages"]]
        times.append(time.perf_counter() - began)
        await asyncio.sleep(0)
        merged = sorted(set(before[index] + replayed + sub.seqs))
        expected = list(range(merged[0], merged[-1] + 1)) if merged else []
        if merged == expected and replayed == sorted(replayed) and not batch["reset_required"]:
            complete += 1
        subs[index] = sub

    await asyncio.gather(*(recover(i) for i in range(RECOVER_CLIENTS)))
    await sending
    await close_all([*subs, sender])
    bare_times: list[float] = []

    async def bare_reconnect() -> None:
        began = time.perf_counter()
        ws = await connect(bare, ping_interval=None)
        bare_times.append(time.perf_counter() - began)
        await ws.close()

    await asyncio.gather(*(bare_reconnect() for _ in range(RECOVER_CLIENTS)))
    worst = max(times) if times else float("nan")
    report.figure(
        "recovery_connect_p50_s",
        percentile(connected, 50),
        f"recovery: median reconnect (handshake + ticket) {percentile(connected, 50):.2f} s",
    )
    report.figure(
        "recovery_size",
        [RECOVER_CLIENTS, DROP_SECONDS, RECOVER_RATE],
        f"recovery: {RECOVER_CLIENTS} clients dropped {DROP_SECONDS:g} s at {RECOVER_RATE:g}"
        f" msg/s ({int(DROP_SECONDS * RECOVER_RATE)} missed each)",
    )
    report.compare(
        "recovery_worst_s", worst, max(bare_times), "s", "recovery: slowest client back in sync"
    )
    report.compare(
        "recovery_p50_s",
        percentile(times, 50),
        percentile(bare_times, 50),
        "s",
        "recovery: median client back in sync",
    )
    report.figure(
        "recovery_complete",
        complete,
        f"recovered every missed message in order: {complete}/{RECOVER_CLIENTS}"
        " (bare server: none, it has no replay)",
    )
    report.check(
        complete == RECOVER_CLIENTS, f"recovery: only {complete}/{RECOVER_CLIENTS} complete"
    )
    report.target(
        "recovery",
        complete == RECOVER_CLIENTS and worst <= 1.0,
        "every missed message in order within 1 s",
    )


class server:
    """One of `SERVERS` serving our ASGI app in a child process."""

    def __init__(self, port: int, env: dict[str, str], name: str = CHOSEN) -> None:
        self.port = port
        self.cm = process(server_args(name, port), env=env)

    def __enter__(self) -> Any:
        child = self.cm.__enter__()
        wait_for_port(self.port, 60)
        return child

    def __exit__(self, *exc: Any) -> None:
        self.cm.__exit__(*exc)


async def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    await asyncio.to_thread(django_setup)
    report = Report("realtime")
    env = {**SERVER_ENV}
    bare_port, plain_port = free_port(), free_port()
    names = servers_selected()
    print(
        f"database {os.environ.get('DATABASE_URL', '(default)')};"
        f" single node without Redis for 1-3 and 5; servers: {', '.join(names)}"
    )
    # The single node runs without Redis: the child inherits os.environ.
    redis_url = os.environ.pop("REDIS_URL", "")
    servers: dict[str, Any] = {}
    try:
        with (
            process([sys.executable, __file__, "--bare", str(bare_port)]) as bare_child,
            process([sys.executable, __file__, "--bare", str(plain_port), "--no-deflate"]) as plain,
        ):
            wait_for_port(bare_port)
            wait_for_port(plain_port)
            bare = f"ws://127.0.0.1:{bare_port}"
            baseline = await baseline_measure(
                bare, bare_child.pid, f"ws://127.0.0.1:{plain_port}", plain.pid
            )
            for name in names:
                missing = server_unavailable(name)
                if missing:
                    print(f"  {name:<38} skipped: {missing}", flush=True)
                    servers[name] = {"skipped": missing}
                    continue
                port = free_port()
                with server(port, env, name) as child:
                    ours = f"ws://127.0.0.1:{port}"
                    servers[name] = await candidate_measure(report, name, ours, child.pid, baseline)
                    if name == CHOSEN:
                        chosen_report(report, servers[name], baseline)
                        await latency_scenario(report, ours, bare)
                        await recovery_scenario(report, ours, bare)
            report.figure("servers", servers)
            report.figure("chosen_server", server_args(CHOSEN, 8000), f"chosen: {CHOSEN}")
            if redis_url:
                os.environ["REDIS_URL"] = redis_url
            await redis_scenario(report, bare)
    finally:
        if redis_url:
            os.environ["REDIS_URL"] = redis_url
    report.finish()


if __name__ == "__main__":
    import uvloop

    if len(sys.argv) >= 3 and sys.argv[1] == "--bare":
        compression = None if "--no-deflate" in sys.argv else "deflate"
        uvloop.run(bare_server(int(sys.argv[2]), compression))
    else:
        uvloop.run(main())
