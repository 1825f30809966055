"""Scale-out benchmark (issue 15): every process twice on this machine, mixed load, one copy of
each SIGKILLed mid-run and restarted, then: nothing lost, nothing applied twice; and the
throughput with one copy of each process against two.

Processes (README "## Processes", production command lines): web (granian WSGI), asgi (uvicorn
with settings.ASGI_WEBSOCKET_OPTIONS), Celery worker, Celery beat (one copy by design, in both
phases), VM control server, gRPC line provider, warehouse consumer, Telegram bot polling a
loopback Bot API stand-in (tests/docbot/fake_telegram.py, answering a superseded long poll with
409 Conflict as Telegram does). Each runs in its own session; a kill is SIGKILL to the whole
process group (a granian or Celery parent and its children, like a container dying).

Load, the same in both phases, closed loops with fixed concurrency (each driver kind in its own
process, so the load generators are not one GIL), for SCALEOUT_SECONDS:
- agents: SCALEOUT_AGENTS simulated agents (two `run_vm_agent --count` processes, one per VM
  server copy) heartbeating every SCALEOUT_HEARTBEAT s; SCALEOUT_COMMANDS_CONCURRENCY clients
  PATCH a VM's RAM through the REST API of either web copy (the agent answers);
- warehouse: movement envelopes published to RabbitMQ (a backlog of SCALEOUT_WH_BACKLOG kept),
  SCALEOUT_WH_DUPLICATES of them published again later (a real duplicate: same body, new
  message id);
- betting: SCALEOUT_BETTORS users bet over REST (Idempotency-Key, retried with the same key on
  the other web copy), SCALEOUT_OPEN_EVENTS events open, one finished every
  SCALEOUT_SETTLE_EVERY s through gRPC FinishEvent on either line-provider copy and replaced;
- chat: SCALEOUT_ROOMS rooms x SCALEOUT_ROOM_MEMBERS clients on WebSocket (each on either asgi
  copy), each sending and awaiting its ack; a client that loses its socket reconnects (fresh
  ticket, the other copy first), joins, `sync`s and resends its unacked message (same
  client_id); a jump in seq is filled by `sync`, as the protocol tells clients;
- bot: SCALEOUT_BOT_USERS Telegram users each send "My documents" and await the answer (the bot
  asks the backend REST API on the web copy that is never killed; production has the proxy
  there), going on after SCALEOUT_BOT_ANSWER_WAIT s without one.

Phase A runs one copy of each process; phase B two, and at SCALEOUT_KILL_AT of the run it
SIGKILLs the first copy of each (web, asgi, worker, consumer, VM server, line provider, bot),
waits SCALEOUT_KILL_PAUSE s and starts it again. After the run the drivers drain (bounded
waits) and each phase is verified through the database (Django ORM, same DATABASE_URL) and what
the clients recorded:
- warehouse: ledger rows = unique messages published, Σ duplicates = duplicates published, no
  dead letter, stock = Σ ledger per (warehouse, product) = what the publisher sent;
- betting: every bet on a finished event settled, once (Σ settled in the settlement audit = bets
  of the event), at the right payout; every 201 stored; no bet nobody asked for; every bet
  request resolved (not left `in_flight`);
- chat: per room seqs gap-free, every message delivered to every member, each socket's live
  deliveries in strictly increasing seq, every ack names the stored message;
- commands: none left queued/sent past its timeout; the last acknowledged RAM of a VM stored;
- bot: every update answered (at most one extra answer per user, for a reply cut by the
  kill), none with the failure text (an update not answered in time is classified by the
  stand-in: never fetched, fetched, fetched and confirmed by a later getUpdates offset);
- agents: every agent authorized again at the end, none gave up;
- no process exited on its own.
Phase B also reports how long each restarted copy took to listen (or consume) again.

Throughput per kind is reported for one copy against two (both over the same stretch before the
kill; phase B also over its whole run with the kill), with the CPU seconds of the server
processes (their process trees from /proc, reaped children included) and the utilisation
CPU / (wall x cores); the load generators' CPU and the whole machine's busy time are reported
apart. On two cores a second copy can only add what the first left idle.

Run (real services; defaults are helper 7's resources):
    flock /tmp/quintet-bench.lock .venv/bin/python bench/scaleout.py
Sizes (environment, defaults in brackets): SCALEOUT_SECONDS (60) per phase, SCALEOUT_PHASES
(one,two), SCALEOUT_KILL_AT (0.5 of the run), SCALEOUT_KILL_PAUSE (2 s), SCALEOUT_DRAIN (60 s
per bounded wait), and the sizes named above (see the constants below). A full run takes about
six minutes. Logs of every process and driver: var/bench-scaleout/<phase>/. Saves
bench/results/scaleout.json; exits 1 when a check fails.
"""

import asyncio
import contextlib
import contextvars
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quintet_h7")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/7")
os.environ.setdefault("CACHE_KEY_PREFIX", "qh7")
os.environ.setdefault("CHANNEL_LAYER_PREFIX", "qh7")
os.environ.setdefault("REALTIME_FANOUT_CHANNEL", "quintet:h7:fanout")
os.environ.setdefault("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/h7")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-scaleout-" + "k" * 50)
os.environ.setdefault("MEDIA_ROOT", str(ROOT / "var" / "bench-scaleout" / "media"))

SECONDS = float(os.environ.get("SCALEOUT_SECONDS", "60"))
KILL_AT = float(os.environ.get("SCALEOUT_KILL_AT", "0.5"))
KILL_PAUSE = float(os.environ.get("SCALEOUT_KILL_PAUSE", "2"))
DRAIN = float(os.environ.get("SCALEOUT_DRAIN", "60"))
PHASES = [p for p in os.environ.get("SCALEOUT_PHASES", "one,two").split(",") if p]
AGENTS = int(os.environ.get("SCALEOUT_AGENTS", "200"))
HEARTBEAT = float(os.environ.get("SCALEOUT_HEARTBEAT", "1"))
COMMANDS_CONCURRENCY = int(os.environ.get("SCALEOUT_COMMANDS_CONCURRENCY", "4"))
WH_BACKLOG = int(os.environ.get("SCALEOUT_WH_BACKLOG", "3000"))
WH_DUPLICATES = float(os.environ.get("SCALEOUT_WH_DUPLICATES", "0.1"))
WH_WAREHOUSES = int(os.environ.get("SCALEOUT_WH_WAREHOUSES", "20"))
WH_PRODUCTS = int(os.environ.get("SCALEOUT_WH_PRODUCTS", "200"))
BETTORS = int(os.environ.get("SCALEOUT_BETTORS", "8"))
OPEN_EVENTS = int(os.environ.get("SCALEOUT_OPEN_EVENTS", "3"))
SETTLE_EVERY = float(os.environ.get("SCALEOUT_SETTLE_EVERY", "5"))
ROOMS = int(os.environ.get("SCALEOUT_ROOMS", "4"))
ROOM_MEMBERS = int(os.environ.get("SCALEOUT_ROOM_MEMBERS", "5"))
BOT_USERS = int(os.environ.get("SCALEOUT_BOT_USERS", "8"))
WEB_WORKERS = int(os.environ.get("SCALEOUT_WEB_WORKERS", "2"))
WORKER_CONCURRENCY = int(os.environ.get("SCALEOUT_WORKER_CONCURRENCY", "2"))
COMMAND_TIMEOUT = float(os.environ.get("VMCONTROL_COMMAND_TIMEOUT_SECONDS", "10"))
RECONCILE_SECONDS = float(os.environ.get("BETTING_RECONCILE_SECONDS", "15"))
WORK = ROOT / "var" / "bench-scaleout"
KINDS = ("web", "asgi", "worker", "consumer", "vmcontrol", "grpc", "bot")
#: Seconds a bot user waits for the answer before sending the next update.
ANSWER_WAIT = float(os.environ.get("SCALEOUT_BOT_ANSWER_WAIT", "10"))
RATE_KINDS = {
    "commands": "commands/s",
    "heartbeats": "heartbeats/s",
    "warehouse": "msg/s",
    "bets": "bets/s",
    "chat": "chat msgs/s",
    "chat_deliveries": "deliveries/s",
    "bot": "updates/s",
}


# === load drivers (`--role NAME CONFIG`, each its own process) ================================


class Buckets:
    """Completions per wall-clock second."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, n: int = 1) -> None:
        self.counts[int(time.time())] += n

    def dump(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}


def count_between(buckets: dict[str, int], start: float, end: float) -> int:
    """Completions in the whole seconds [start, end)."""
    return sum(v for k, v in buckets.items() if int(start) <= int(k) < int(end))


@dataclass
class RoleContext:
    cfg: dict[str, Any]
    out: Path
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start_line(self) -> None:
        """Tell the orchestrator the driver is set up, then wait for its start time."""
        await asyncio.to_thread(start_line, self.cfg)

    def write(self, result: dict[str, Any]) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.out)


def start_line(cfg: dict[str, Any]) -> None:
    """Write the ready file, wait for the go file, then sleep until the start time in it."""
    Path(cfg["ready_file"]).write_text("ready")
    go = Path(cfg["go_file"])
    while not go.exists():
        time.sleep(0.05)
    time.sleep(max(0.0, float(go.read_text()) - time.time()))


def _transport_error(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, httpx.TransportError | OSError | asyncio.TimeoutError)


class WebClients:
    """One httpx client per web copy; a call that fails in transport or with a 5xx other than
    the documented 504 is tried on the next copy (the copies are peers behind no proxy)."""

    def __init__(self, urls: list[str], token: str, timeout: float = 30) -> None:
        import httpx

        self.clients = [
            httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Token {token}"}, timeout=timeout
            )
            for url in urls
        ]
        self.turn = random.randrange(len(urls))
        self.failovers = 0

    async def call(self, method: str, path: str, *, deadline: float = 20, **kwargs: Any) -> Any:
        end = time.monotonic() + deadline
        self.turn = (self.turn + 1) % len(self.clients)
        index = self.turn
        while True:
            client = self.clients[index]
            try:
                response = await client.request(method, path, **kwargs)
                if response.status_code < 500 or response.status_code == 504:
                    return response
            except Exception as exc:
                if not _transport_error(exc):
                    raise
            if time.monotonic() > end:
                raise TimeoutError(f"{method} {path}: no web copy answered")
            self.failovers += 1
            index = (index + 1) % len(self.clients)
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


# --- commands ---------------------------------------------------------------------------------


async def role_commands(ctx: RoleContext) -> None:
    cfg = ctx.cfg
    web = WebClients(cfg["web"], cfg["staff_token"])
    vm_ids: list[int] = cfg["vm_ids"]
    done = Buckets()
    statuses: Counter[str] = Counter()
    last: dict[int, tuple[int, int]] = {}  # vm -> (ram asked, status)
    await ctx.start_line()

    async def worker(k: int) -> None:
        mine = vm_ids[k::COMMANDS_CONCURRENCY]
        while not ctx.stop.is_set():
            vm_id = random.choice(mine)
            ram = 1024 + random.randrange(1, 60000)
            try:
                response = await web.call(
                    "PATCH", f"/api/vmcontrol/vms/{vm_id}", json={"ram_mb": ram}, deadline=30
                )
            except Exception as exc:
                statuses[f"error {type(exc).__name__}"] += 1
                last[vm_id] = (ram, 0)
                continue
            statuses[str(response.status_code)] += 1
            last[vm_id] = (ram, response.status_code)
            if response.status_code == 200:
                done.add()
            else:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(k) for k in range(COMMANDS_CONCURRENCY)))
    await web.close()
    ctx.write(
        {
            "done": done.dump(),
            "statuses": dict(statuses),
            "last": {str(vm): value for vm, value in last.items()},
            "failovers": web.failovers,
        }
    )


# --- bets and settlements ---------------------------------------------------------------------


async def role_bets(ctx: RoleContext) -> None:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from betting.grpc.generated import betting_pb2 as pb
    from betting.grpc.generated import betting_pb2_grpc as pb_grpc

    cfg = ctx.cfg
    prefix = cfg["event_prefix"]
    auth = (("authorization", f"Bearer {cfg['staff_token']}"),)
    channels = [grpc.aio.insecure_channel(address) for address in cfg["grpc"]]
    stubs = [pb_grpc.LineProviderStub(channel) for channel in channels]
    grpc_failovers = 0
    open_events: list[str] = []
    finished: dict[str, str] = {}
    created: list[str] = []
    serial = 0
    acked: dict[str, dict[str, Any]] = {}  # idempotency key -> {bet, event}
    unresolved: dict[str, str] = {}  # key -> last answer
    refusals: Counter[str] = Counter()
    done = Buckets()

    async def grpc_call(name: str, request: Any, ok_codes: tuple[Any, ...]) -> None:
        nonlocal grpc_failovers
        index = random.randrange(len(stubs))
        end = time.monotonic() + 30
        while True:
            try:
                await getattr(stubs[index], name)(request, metadata=auth, timeout=10)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in ok_codes:
                    return  # an earlier attempt took effect before its answer was lost
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.INTERNAL,
                ):
                    raise
                if time.monotonic() > end:
                    raise
            grpc_failovers += 1
            index = (index + 1) % len(stubs)
            await asyncio.sleep(0.1)

    async def create() -> None:
        nonlocal serial
        serial += 1
        event_id = f"{prefix}-{serial}"
        deadline = Timestamp()
        deadline.FromDatetime(datetime(2099, 1, 1, tzinfo=UTC))
        await grpc_call(
            "CreateEvent",
            pb.CreateEventRequest(
                id=event_id, name=f"Scale-out {event_id}", coefficient="1.90", deadline=deadline
            ),
            (grpc.StatusCode.ALREADY_EXISTS,),
        )
        created.append(event_id)
        open_events.append(event_id)

    async def finish(event_id: str) -> None:
        open_events.remove(event_id)
        outcome = pb.OUTCOME_WIN if len(finished) % 2 == 0 else pb.OUTCOME_LOSE
        await grpc_call(
            "FinishEvent",
            pb.FinishEventRequest(id=event_id, outcome=outcome),
            (grpc.StatusCode.FAILED_PRECONDITION,),
        )
        finished[event_id] = "win" if outcome == pb.OUTCOME_WIN else "lose"

    for _ in range(OPEN_EVENTS):
        await create()
    tokens: list[str] = cfg["bettor_tokens"]
    clients = [WebClients(cfg["web"], token) for token in tokens]
    await ctx.start_line()

    async def bettor(client: WebClients) -> None:
        while not ctx.stop.is_set():
            if not open_events:
                await asyncio.sleep(0.05)
                continue
            event_id = random.choice(open_events)
            key = uuid.uuid4().hex
            body = {"event_id": event_id, "amount": "10.00"}
            end = time.monotonic() + 20
            answer = ""
            while True:
                try:
                    response = await client.call(
                        "POST", "/api/betting/bet", json=body, headers={"Idempotency-Key": key}
                    )
                except Exception as exc:
                    answer = type(exc).__name__
                    break
                if response.status_code in (200, 201):
                    acked[key] = {"bet": response.json()["id"], "event": event_id}
                    done.add()
                    answer = ""
                    break
                code = (response.json().get("error") or {}).get("code", "")
                answer = f"{response.status_code} {code}"
                if code == "in_flight" and time.monotonic() < end:
                    await asyncio.sleep(0.5)
                    continue
                break
            if answer:
                if answer.endswith(("event_closed", "betting_closed")):
                    refusals[answer] += 1
                else:
                    unresolved[key] = answer

    async def scheduler() -> None:
        while not ctx.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop.wait(), SETTLE_EVERY)
            if ctx.stop.is_set():
                break
            await finish(open_events[0])
            await create()

    await asyncio.gather(scheduler(), *(bettor(c) for c in clients))
    for event_id in list(open_events):
        await finish(event_id)
    for client in clients:
        await client.close()
    for channel in channels:
        await channel.close(None)
    ctx.write(
        {
            "done": done.dump(),
            "acked": acked,
            "unresolved": unresolved,
            "refusals": dict(refusals),
            "created": created,
            "finished": finished,
            "failovers": sum(c.failovers for c in clients),
            "grpc_failovers": grpc_failovers,
        }
    )


# --- chat -------------------------------------------------------------------------------------


class ChatClient:
    """One member of a room on one socket at a time; see the module docstring."""

    def __init__(self, name: str, room: str, token: str, cfg: dict[str, Any], first: int) -> None:
        self.name = name
        self.room = room
        self.cfg = cfg
        self.web = WebClients(cfg["web"], token)
        self.copy = first
        self.ws: Any = None
        self.received: set[int] = set()
        self.runs: list[list[int]] = []  # live seqs, one list per socket
        self.acked: dict[str, int] = {}  # client_id -> seq
        self.sent = 0
        self.pending_ack: asyncio.Future[int] | None = None
        self.pending_id = ""
        self.sync_pending = False
        self.synced = 0
        self.reconnects = 0
        self.ack_timeouts = 0
        self.errors: Counter[str] = Counter()
        self.done = Buckets()
        self.ready = asyncio.Event()

    def contiguous(self) -> int:
        seq = 0
        while seq + 1 in self.received:
            seq += 1
        return seq

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        response = await self.web.call("POST", "/api/realtime/ticket")
        response.raise_for_status()
        ticket = response.json()["ticket"]
        urls = self.cfg["asgi"]
        url = f"{urls[self.copy % len(urls)]}/ws/?ticket={ticket}"
        self.ws = await connect(url, ping_interval=None, max_queue=None, open_timeout=10)
        self.runs.append([])
        await self.ws.send(json.dumps({"type": "join", "room": self.room}))

    async def request_sync(self) -> None:
        if not self.sync_pending:
            self.sync_pending = True
            after = self.contiguous()
            await self.ws.send(json.dumps({"type": "sync", "room": self.room, "after_seq": after}))

    async def read(self, joined: asyncio.Event) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "message" and frame.get("room") == self.room:
                seq = int(frame["seq"])
                self.runs[-1].append(seq)
                self.received.add(seq)
                if seq > self.contiguous() + 1:
                    await self.request_sync()
            elif kind == "ack":
                ack = self.pending_ack
                if frame.get("ref") == self.pending_id and ack is not None and not ack.done():
                    ack.set_result(int(frame["seq"]))
            elif kind == "joined":
                joined.set()
                self.sync_pending = False
                await self.request_sync()
            elif kind == "sync":
                self.sync_pending = False
                if frame.get("reset_required"):
                    await self.page_rest()
                for message in frame.get("messages", []):
                    if int(message["seq"]) not in self.received:
                        self.synced += 1
                    self.received.add(int(message["seq"]))
                if frame.get("last_seq") and int(frame["last_seq"]) > self.contiguous():
                    await self.request_sync()
            elif kind == "sync_required":
                await self.request_sync()
            elif kind == "error":
                self.errors[str(frame.get("code"))] += 1

    async def page_rest(self) -> None:
        """More was missed than `sync` replays: page the REST history instead."""
        after = self.contiguous()
        while True:
            response = await self.web.call(
                "GET", f"/api/realtime/rooms/{self.room}/messages?after_seq={after}&limit=100"
            )
            rows = response.json()
            rows = rows.get("results", rows) if isinstance(rows, dict) else rows
            if not rows:
                return
            for row in rows:
                if int(row["seq"]) not in self.received:
                    self.synced += 1
                self.received.add(int(row["seq"]))
            after = max(int(row["seq"]) for row in rows)

    async def session(self, sending: asyncio.Event, finished: asyncio.Event) -> None:
        """One socket: join, then send-and-await-ack while `sending`; returns when `finished`,
        raises when the socket is lost."""
        await self.connect()
        joined = asyncio.Event()
        reader = asyncio.create_task(self.read(joined))
        try:
            await asyncio.wait_for(self._first(joined, reader), 10)
            self.ready.set()
            while not finished.is_set():
                if reader.done():
                    reader.result()
                    raise ConnectionError("socket closed")
                if not sending.is_set() and not self.pending_id:
                    await asyncio.wait([reader], timeout=0.1)
                    continue
                if not self.pending_id:
                    self.sent += 1
                    self.pending_id = f"{self.name}-{self.sent}"
                loop = asyncio.get_running_loop()
                self.pending_ack = loop.create_future()
                await self.ws.send(
                    json.dumps(
                        {
                            "type": "sendMessage",
                            "room": self.room,
                            "text": f"{self.pending_id} at {time.time():.3f}",
                            "client_id": self.pending_id,
                            "ref": self.pending_id,
                        }
                    )
                )
                waiting: list[asyncio.Future[Any]] = [self.pending_ack, reader]
                await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                if self.pending_ack.done():
                    self.acked[self.pending_id] = self.pending_ack.result()
                    self.pending_id = ""
                    self.done.add()
                elif not reader.done():
                    self.ack_timeouts += 1  # resent with the same client_id
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def _first(self, joined: asyncio.Event, reader: asyncio.Task[None]) -> None:
        waiter = asyncio.ensure_future(joined.wait())
        try:
            await asyncio.wait([waiter, reader], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not joined.is_set():
            raise ConnectionError("socket closed before joined")

    async def run(self, sending: asyncio.Event, finished: asyncio.Event) -> None:
        while not finished.is_set():
            try:
                await self.session(sending, finished)
            except Exception as exc:
                if finished.is_set():
                    return
                self.errors[f"lost: {type(exc).__name__}"] += 1
                self.reconnects += 1
                self.copy += 1  # the other copy first
                await asyncio.sleep(0.2)

    def result(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "room": self.room,
            "received": sorted(self.received),
            "runs": self.runs,
            "acked": self.acked,
            "unacked": self.pending_id,
            "synced": self.synced,
            "reconnects": self.reconnects,
            "ack_timeouts": self.ack_timeouts,
            "errors": dict(self.errors),
            "done": self.done.dump(),
        }


async def role_chat(ctx: RoleContext) -> None:
    cfg = ctx.cfg
    clients = [
        ChatClient(f"c{r}x{m}", room, cfg["chat_tokens"][r * ROOM_MEMBERS + m], cfg, m)
        for r, room in enumerate(cfg["rooms"])
        for m in range(ROOM_MEMBERS)
    ]
    sending, finished = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(c.run(sending, finished)) for c in clients]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), 60)
    await asyncio.sleep(1)  # every member has joined before the first message
    await ctx.start_line()
    sending.set()
    await ctx.stop.wait()
    sending.clear()
    # Drain: every unacked message acked, every member holding every seq any member knows of.
    end = time.monotonic() + DRAIN / 2
    while time.monotonic() < end:
        known = {
            room: max(
                (
                    max([*c.received, *c.acked.values()], default=0)
                    for c in clients
                    if c.room == room
                ),
                default=0,
            )
            for room in cfg["rooms"]
        }
        if all(not c.pending_id for c in clients) and all(
            c.contiguous() >= known[c.room] for c in clients
        ):
            break
        await asyncio.sleep(0.2)
    finished.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        await c.web.close()
    ctx.write({"clients": [c.result() for c in clients]})


# --- bot updates (the Bot API stand-in lives in this driver's process) ------------------------


def role_bot(ctx: RoleContext, stop_flag: list[bool]) -> None:
    from aiohttp import web as aioweb

    from docbot import texts
    from tests.docbot.fake_telegram import Call, FakeTelegram

    class StandIn(FakeTelegram):
        """The test stand-in, counting answers per chat instead of keeping every call, and
        ending a long poll superseded by a newer getUpdates with 409 Conflict, as Telegram
        does when two bot instances poll."""

        answered: Counter[int]
        failures: Counter[int]
        conflicts: int
        generation: int
        poll_count: int
        fetched: set[int]  # update ids some getUpdates returned
        confirmed_below: int  # the highest offset asked for: every id below it is confirmed

        def _record(self, call: Call) -> None:
            if call.method in {"sendMessage", "editMessageText"} and call.chat_id is not None:
                self.answered[call.chat_id] += 1
                if call.text == texts.FAILED:
                    self.failures[call.chat_id] += 1
                waiter = waiters.get(call.chat_id)
                if waiter is not None:
                    waiter.set()
            elif call.method != "sendChatAction":
                super()._record(call)

        async def _method(self, request: aioweb.Request) -> aioweb.Response:
            # Each bot copy calls through its own labelled base URL (when the stand-in has
            # them), so polls and answers can be told apart by copy.
            label = request.match_info.get("label", "")
            caller.set(label)
            if request.match_info["method"] == "getUpdates":
                self.poll_count += 1
                polls_by[label] += 1
            elif request.match_info["method"] == "sendMessage":
                answers_by[label] += 1
            return await super()._method(request)

        async def _m_getUpdates(
            self, params: dict[str, Any], upload: bytes | None
        ) -> aioweb.Response:
            assert self._new_update is not None
            self.generation += 1
            mine = self.generation
            self._new_update.set()  # an earlier long poll wakes up and is told it lost
            offset = int(params.get("offset") or 0)
            if offset > self.confirmed_below:
                self.confirmed_below = offset
                confirmations.append((offset, caller.get()))
            deadline = time.monotonic() + float(params.get("timeout") or 0)
            while True:
                if self.generation != mine:
                    self.conflicts += 1
                    return self._error(
                        409,
                        "Conflict: terminated by other getUpdates request; make sure that only "
                        "one bot instance is running",
                    )
                with self._changed:
                    self._pending = [
                        u for u in self._pending if int(u.get("update_id", offset)) >= offset
                    ]
                    ready = list(self._pending)
                if ready or time.monotonic() >= deadline or self._closing:
                    self.fetched.update(int(u["update_id"]) for u in ready)
                    return self._ok(ready)
                self._new_update.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new_update.wait(), deadline - time.monotonic())

    waiters: dict[int, asyncio.Event] = {}
    polls_by: Counter[str] = Counter()
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")
    confirmations: list[tuple[int, str]] = []  # (offset, copy) each time the offset moved on
    answers_by: Counter[str] = Counter()
    fake = StandIn(token=ctx.cfg["bot_token"])
    fake.answered, fake.failures = Counter(), Counter()
    fake.conflicts = fake.generation = fake.poll_count = fake.confirmed_below = 0
    fake.fetched = set()
    # Update ids unique across runs: the bots' dedupe in Redis outlives a phase.
    fake._update_ids = itertools.count(int(time.time() * 1000) * 100)
    fake.start()
    labelled = getattr(fake, "base_url_for", None)
    labels = {f"bot-{n}": labelled(f"bot-{n}") for n in (1, 2)} if labelled else {}
    Path(ctx.cfg["port_file"]).write_text(
        json.dumps({"base": fake.base_url, "file": fake.base_file_url, "labels": labels})
    )
    users = [ctx.cfg["bot_first_user"] + i for i in range(BOT_USERS)]
    pushed: Counter[int] = Counter()
    done = Buckets()
    latencies: list[float] = []
    unanswered: list[int] = []  # update ids not answered within ANSWER_WAIT

    async def drive() -> None:
        for _ in range(1200):  # a bot polls before the clock starts
            if fake.poll_count:
                break
            await asyncio.sleep(0.1)
        await ctx.start_line()

        async def user(user_id: int) -> None:
            waiter = waiters[user_id] = asyncio.Event()
            while not stop_flag[0]:
                before = fake.answered[user_id]
                waiter.clear()
                update = fake.push(fake.text_update(user_id, texts.MENU_BROWSE))
                pushed[user_id] += 1
                started = time.perf_counter()
                end = time.monotonic() + ANSWER_WAIT
                while fake.answered[user_id] <= before and time.monotonic() < end:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.wait(), 0.5)
                    waiter.clear()
                if fake.answered[user_id] > before:
                    done.add()
                    latencies.append(time.perf_counter() - started)
                else:  # the user gives up waiting and goes on
                    unanswered.append(int(update["update_id"]))

        await asyncio.gather(*(user(u) for u in users))
        # Drain: every update answered, then a quiet spell to catch late second answers.
        for _ in range(int(DRAIN * 5 / 2)):
            if all(fake.answered[u] >= pushed[u] for u in users):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)

    assert fake._loop is not None
    asyncio.run_coroutine_threadsafe(drive(), fake._loop).result()

    def fate(update_id: int) -> str:
        if update_id not in fake.fetched:
            return "never fetched"
        by = next((label for offset, label in confirmations if offset > update_id), None)
        if by is None:
            return "fetched, not confirmed"
        return f"fetched, confirmed by a later getUpdates of {by or 'a bot'}"

    fates = Counter(fate(u) for u in unanswered)
    ctx.write(
        {
            "unanswered_in_time": dict(fates),
            "done": done.dump(),
            "pushed": {str(u): pushed[u] for u in users},
            "answers": {str(u): fake.answered[u] for u in users},
            "failures": {str(u): fake.failures[u] for u in users},
            "conflicts": fake.conflicts,
            "polls": fake.poll_count,
            "polls_by_copy": dict(polls_by),
            "answers_by_copy": dict(answers_by),
            "latency_p50_ms": sorted(latencies)[len(latencies) // 2] * 1000 if latencies else None,
        }
    )
    fake.stop()


# --- warehouse --------------------------------------------------------------------------------


def role_warehouse(ctx: RoleContext, stop_flag: list[bool]) -> None:
    import django

    django.setup()
    from warehouse.queue import connection_open, movement_queue
    from warehouse.schemas import envelope_build

    cfg = ctx.cfg
    rng = random.Random()
    warehouses = [uuid.UUID(w) for w in cfg["warehouses"]]
    products = [uuid.UUID(p) for p in cfg["products"]]
    expected: Counter[str] = Counter()
    unique = duplicates = 0
    recent: list[bytes] = []
    queue = movement_queue(cfg["queue"])
    Path(cfg["ready_file"]).write_text("ready")
    go = Path(cfg["go_file"])
    while not go.exists():
        time.sleep(0.05)
    time.sleep(max(0.0, float(go.read_text()) - time.time()))
    with connection_open() as conn:
        channel = conn.channel()
        queue(channel).declare()
        producer = conn.Producer(channel, exchange=queue.exchange, routing_key=queue.routing_key)

        def publish(body: bytes) -> None:
            producer.publish(
                body,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=uuid.uuid4().hex,
                retry=True,
            )

        while not stop_flag[0]:
            depth = int(queue(channel).queue_declare(passive=True).message_count)
            if depth > WH_BACKLOG:
                time.sleep(0.02)
                continue
            for _ in range(200):
                sender, receiver = rng.sample(range(len(warehouses)), 2)
                product = rng.choice(products)
                quantity = rng.randint(1, 100)
                envelope_id, movement_id = uuid.uuid4(), uuid.uuid4()
                now = datetime.now(UTC)
                for event, index, sign in (("departure", sender, -1), ("arrival", receiver, 1)):
                    body = json.dumps(
                        envelope_build(
                            envelope_id=envelope_id,
                            source=f"WH-{1000 + index}",
                            event=event,
                            movement_id=movement_id,
                            warehouse_id=warehouses[index],
                            product_id=product,
                            quantity=quantity,
                            timestamp=now,
                            sent_millis=int(now.timestamp() * 1000),
                        )
                    ).encode()
                    publish(body)
                    unique += 1
                    expected[f"{warehouses[index]} {product}"] += sign * quantity
                    recent.append(body)
                    if rng.random() < WH_DUPLICATES:
                        publish(rng.choice(recent))
                        duplicates += 1
                if len(recent) > 2000:
                    del recent[:1000]
    ctx.write({"unique": unique, "duplicates": duplicates, "expected": dict(expected)})


def role_main(name: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    ctx = RoleContext(cfg, Path(cfg["out"]))
    if name in ("bot", "warehouse"):
        stop_flag = [False]

        def _stop(*_: Any) -> None:
            stop_flag[0] = True

        signal.signal(signal.SIGTERM, _stop)
        (role_bot if name == "bot" else role_warehouse)(ctx, stop_flag)
        return
    drivers: dict[str, Callable[[RoleContext], Awaitable[None]]] = {
        "commands": role_commands,
        "bets": role_bets,
        "chat": role_chat,
    }

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, ctx.stop.set)
        await drivers[name](ctx)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# === the orchestrator ===========================================================================


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, its live descendants, and the children each of
    them has reaped (a restarted granian or Celery child still counts), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15]) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / ticks, sum(values) / ticks


@dataclass
class Proc:
    """One copy of a process in its own session (a kill takes its whole process group)."""

    name: str
    kind: str
    args: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    cpu_gone: float = 0.0  # CPU of incarnations already killed
    kills: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu(self) -> float:
        live = tree_cpu(self.popen.pid) if self.alive() and self.popen else 0.0
        return self.cpu_gone + live

    def kill(self) -> None:
        assert self.popen is not None
        self.cpu_gone += tree_cpu(self.popen.pid)
        self.kills.append(time.time())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        # A group member that outlived its leader (a granian worker) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def django_setup() -> None:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def server_env() -> dict[str, str]:
    """Production settings (DEBUG off, plain HTTP on loopback), the limits a load generator
    would trip raised, and the bench's short periods."""
    return {
        "DJANGO_DEBUG": "false",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "LOG_LEVEL": "WARNING",
        "METRICS_PORT": "0",
        "DATABASE_POOL": "true",
        "DATABASE_POOL_MAX": "8",
        "REALTIME_RATE_PER_SECOND": "100000",
        "REALTIME_RATE_BURST": "100000",
        "REALTIME_USER_RATE_PER_SECOND": "100000",
        "REALTIME_USER_RATE_BURST": "100000",
        "REALTIME_AUTOJOIN_DEFAULT_ROOM": "false",
        "VMCONTROL_HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT),
        "VMCONTROL_COMMAND_TIMEOUT_SECONDS": str(COMMAND_TIMEOUT),
        "BETTING_RECONCILE_SECONDS": str(RECONCILE_SECONDS),
        "DOCBOT_MODE": "polling",
        "DOCBOT_FLOOD_MAX_PER_SECOND": "1000",
        "DOCBOT_RATE_LIMIT_PER_SECOND": "5000",
    }


def asgi_args(port: int) -> list[str]:
    """The Procfile's asgi line; the WebSocket options come from settings."""
    from django.conf import settings

    args = [str(Path(sys.executable).parent / "uvicorn"), "config.asgi:application"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.ASGI_WEBSOCKET_OPTIONS.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{key.replace('_', '-')}", text]
    args += ["--lifespan", "off", "--no-access-log", "--no-proxy-headers"]
    return [*args, "--log-level", "warning"]


def manage(*args: str) -> list[str]:
    return [sys.executable, "manage.py", *args]


@dataclass
class Fixtures:
    staff_token: str
    bettor_tokens: list[str]
    chat_tokens: list[str]
    vm_ids: list[int]
    fleet_files: list[Path]
    bot_token: str
    service_token: str
    bot_first_user: int
    warehouses: list[str]
    products: list[str]


def fixtures_create() -> Fixtures:
    """Accounts, tokens and VMs, written straight through the ORM (setup, not load)."""
    from django.contrib.auth.models import User
    from knox.models import AuthToken

    from docbot import services as docbot_services
    from vmcontrol.models import VirtualMachine
    from vmcontrol.services import token_generate

    run = uuid.uuid4().hex[:6]

    def user(name: str, **extra: Any) -> str:
        account = User.objects.create(username=f"so{run}-{name}", **extra)
        return str(AuthToken.objects.create(user=account)[1])

    staff = user("staff", is_staff=True)
    bettors = [user(f"bet{i}") for i in range(BETTORS)]
    chatters = [user(f"chat{i}") for i in range(ROOMS * ROOM_MEMBERS)]
    tokens = [token_generate() for _ in range(AGENTS)]
    vms = VirtualMachine.objects.bulk_create(
        [
            VirtualMachine(name=f"so{run}-{i}", cpu_cores=2, ram_mb=2048, token_hash=hashed)
            for i, (_, hashed) in enumerate(tokens)
        ],
        batch_size=1000,
    )
    inventory = {"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]}
    rows = [
        {"name": vm.name, "vm_id": vm.pk, "token": raw, "inventory": inventory}
        for vm, (raw, _) in zip(vms, tokens, strict=True)
    ]
    WORK.mkdir(parents=True, exist_ok=True)
    files = []
    for half in range(2):
        path = WORK / f"fleet-{half}.json"
        path.write_text(json.dumps(rows[half::2]))
        files.append(path)
    rng = random.Random(run)
    return Fixtures(
        staff_token=staff,
        bettor_tokens=bettors,
        chat_tokens=chatters,
        vm_ids=[vm.pk for vm in vms],
        fleet_files=files,
        bot_token=f"{rng.randrange(10**8, 10**9)}:scaleout-{run}",
        service_token=docbot_services.service_token_issue(),
        bot_first_user=rng.randrange(10**9, 2 * 10**9),
        warehouses=[
            str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(WH_WAREHOUSES)
        ],
        products=[str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(WH_PRODUCTS)],
    )


def warehouse_reset() -> None:
    """Empty the warehouse tables and queue, so each phase is verified on its own."""
    from django.apps import apps
    from django.conf import settings
    from django.db import connection

    from warehouse.queue import connection_open, movement_queue

    tables = [model._meta.db_table for model in apps.get_app_config("warehouse").get_models()]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
    with connection_open() as conn:
        bound = movement_queue(settings.WAREHOUSE_QUEUE)(conn.channel())
        bound.declare()
        bound.purge()


def queue_consumers(name: str) -> int:
    from warehouse.queue import connection_open

    with connection_open() as conn:
        try:
            return int(conn.channel().queue_declare(name, passive=True).consumer_count)
        except Exception:
            return 0


def consumers_at_least(name: str, count: int) -> bool:
    return queue_consumers(name) >= count


def warehouse_consumed() -> int:
    """Messages the consumers have finished with: ledger rows, counted duplicates, dead letters."""
    from django.db import close_old_connections
    from django.db.models import Sum

    from warehouse.models import DeadLetter, LedgerEntry

    close_old_connections()
    rows = LedgerEntry.objects.count()
    duplicates = LedgerEntry.objects.aggregate(n=Sum("duplicates"))["n"] or 0
    return rows + int(duplicates) + DeadLetter.objects.count()


def fleet_stats(paths: list[Path]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for path in paths:
        for _ in range(20):
            try:
                data = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        else:
            continue
        for key in ("pongs", "authorized_now", "gave_up", "auths", "disconnects", "commands"):
            total[key] += int(data.get(key, 0))
    return dict(total)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def wait_until(predicate: Callable[[], bool], limit: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@dataclass
class Sample:
    at: float
    server_cpu: dict[str, float]
    load_cpu: float
    machine: tuple[float, float]
    consumed: int
    pongs: int
    loadavg: float  # the machine's 1-minute load average


class Phase:
    """One run of the mixed load with `copies` copies of each process."""

    def __init__(self, name: str, copies: int, fx: Fixtures) -> None:
        self.name = name
        self.copies = copies
        self.fx = fx
        self.dir = WORK / name
        self.procs: list[Proc] = []
        self.roles: dict[str, Proc] = {}
        self.fleets: list[Proc] = []
        self.samples: dict[str, Sample] = {}
        self.results: dict[str, Any] = {}
        self.rooms = [f"so-{name}-{uuid.uuid4().hex[:6]}-{r}" for r in range(ROOMS)]
        self.event_prefix = f"so-{name}-{uuid.uuid4().hex[:6]}"
        self.checks: list[tuple[str, bool, str]] = []
        self.watcher: threading.Thread | None = None
        self.recovery: dict[str, float | None] = {}
        self.drivers_done = 0.0
        self.fleet_end: dict[str, int] = {}
        self.died: list[str] = []

    # --- processes ---------------------------------------------------------------------------

    def _proc(
        self,
        kind: str,
        copy: int,
        args: list[str],
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        proc = Proc(
            f"{kind}-{copy + 1}",
            kind,
            args,
            {**server_env(), **(env or {})},
            self.dir / f"{kind}-{copy + 1}.log",
            port,
        )
        self.procs.append(proc)
        return proc

    def _role(self, name: str, cfg: dict[str, Any]) -> Proc:
        path = self.dir / f"role-{name}.json"
        cfg = {
            **cfg,
            "out": str(self.dir / f"result-{name}.json"),
            "ready_file": str(self.dir / f"ready-{name}"),
            "go_file": str(self.dir / "go"),
        }
        path.write_text(json.dumps(cfg))
        proc = Proc(
            f"driver-{name}",
            "driver",
            [sys.executable, str(Path(__file__)), "--role", name, str(path)],
            {"LOG_LEVEL": "WARNING"},
            self.dir / f"driver-{name}.log",
        )
        proc.start()
        self.roles[name] = proc
        return proc

    def build(self, bot_api: dict[str, Any]) -> None:
        from bench.harness import celery_worker_args, free_port, web_server_args

        ports = {
            kind: [free_port() for _ in range(self.copies)]
            for kind in ("web", "asgi", "vmcontrol", "grpc")
        }
        self.ports = ports
        bot_env = {
            "TELEGRAM_BOT_TOKEN": self.fx.bot_token,
            "TELEGRAM_API_BASE_URL": bot_api["base"],
            "TELEGRAM_FILE_BASE_URL": bot_api["file"],
            "DOCBOT_SERVICE_TOKEN": self.fx.service_token,
        }
        labels: dict[str, str] = bot_api.get("labels") or {}
        # The bot asks the backend on the web copy that is never killed (production puts the
        # proxy in front of the web copies; the drivers here fail over by themselves).
        backend = {"DOCBOT_BACKEND_URL": f"http://127.0.0.1:{ports['web'][-1]}"}
        for copy in range(self.copies):
            web, asgi, vmc, grpc = (ports[k][copy] for k in ("web", "asgi", "vmcontrol", "grpc"))
            worker = ("-n", f"scaleout{copy + 1}@%h")
            host = ("--host", "127.0.0.1", "--port")
            self._proc("web", copy, web_server_args(web, workers=WEB_WORKERS), web, bot_env)
            self._proc("asgi", copy, asgi_args(asgi), asgi, bot_env)
            args = celery_worker_args(concurrency=WORKER_CONCURRENCY, extra=worker)
            self._proc("worker", copy, args, None, bot_env)
            self._proc("consumer", copy, manage("run_warehouse_consumer"))
            name = {"VMCONTROL_SERVER_NAME": f"scaleout-vm-{copy + 1}"}
            self._proc(
                "vmcontrol", copy, manage("run_vmcontrol_server", *host, str(vmc)), vmc, name
            )
            self._proc("grpc", copy, manage("run_line_provider", *host, str(grpc)), grpc)
            args = manage("run_docbot", "--mode", "polling")
            # INFO: each update's fate (served, duplicate, refused) is in its log.
            own = {"TELEGRAM_API_BASE_URL": labels.get(f"bot-{copy + 1}", bot_api["base"])}
            env = {**bot_env, **backend, **own, "LOG_LEVEL": "INFO"}
            self._proc("bot", copy, args, None, env)
        schedule = str(self.dir / "celerybeat-schedule")
        args = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "WARNING"]
        self._proc("beat", 0, [*args, "--schedule", schedule])

    def start_all(self) -> None:
        from django.conf import settings

        from bench.harness import wait_for_port

        for copy in range(self.copies):  # every first copy starts first
            for proc in self.procs:
                if proc.name.endswith(f"-{copy + 1}"):
                    proc.start()
            time.sleep(1)
        for proc in self.procs:
            if proc.port:
                wait_for_port(proc.port, timeout=120)
        for queue, kind in ((settings.WAREHOUSE_QUEUE, "consumer"), ("quintet.default", "worker")):
            if not wait_until(partial(consumers_at_least, queue, self.copies), 120, 0.5):
                print(
                    f"  note: {queue} has {queue_consumers(queue)} consumers "
                    f"with {self.copies} {kind} copies",
                    flush=True,
                )

    def start_fleets(self) -> None:
        for half in range(2):
            port = self.ports["vmcontrol"][half % self.copies]
            stats = self.dir / f"fleet-{half}.stats.json"
            proc = Proc(
                f"agents-{half + 1}",
                "agents",
                manage(
                    "run_vm_agent",
                    "--port",
                    str(port),
                    "--count",
                    str(len(json.loads(self.fx.fleet_files[half].read_text()))),
                    "--state-file",
                    str(self.fx.fleet_files[half]),
                    "--stats-file",
                    str(stats),
                    "--ramp",
                    "3",
                    "--backoff-cap",
                    "2",
                    "-v",
                    "0",
                ),
                {"LOG_LEVEL": "WARNING"},
                self.dir / f"agents-{half + 1}.log",
            )
            proc.start()
            self.fleets.append(proc)
        ok = wait_until(lambda: self.fleet().get("authorized_now", 0) >= AGENTS, 90, 0.5)
        if not ok:
            print(
                f"  note: only {self.fleet().get('authorized_now')} of {AGENTS} agents "
                "authorized before the load",
                flush=True,
            )

    def fleet(self) -> dict[str, int]:
        return fleet_stats([self.dir / f"fleet-{half}.stats.json" for half in range(2)])

    def stop_all(self) -> None:
        for proc in [*self.roles.values(), *self.fleets, *self.procs]:
            proc.stop()

    # --- the run -----------------------------------------------------------------------------

    def sample(self, key: str) -> None:
        server: dict[str, float] = {}
        for proc in self.procs:
            server[proc.kind] = server.get(proc.kind, 0.0) + proc.cpu()
        load = sum(p.cpu() for p in [*self.roles.values(), *self.fleets])
        self.samples[key] = Sample(
            time.time(),
            dict(server),
            load + time.process_time(),
            machine_busy(),
            warehouse_consumed(),
            self.fleet().get("pongs", 0),
            os.getloadavg()[0],
        )

    def run(self) -> None:
        from django.conf import settings

        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.iterdir():
            if stale.is_file() and stale.suffix != ".log":
                stale.unlink()
        for log in self.dir.glob("*.log"):
            log.unlink()
        warehouse_reset()
        self._rooms_create()
        web_urls = lambda: [f"http://127.0.0.1:{p}" for p in self.ports["web"]]  # noqa: E731
        print(f"phase {self.name}: {self.copies} copy/copies of each process; starting", flush=True)
        bot = self._role(
            "bot",
            {
                "bot_token": self.fx.bot_token,
                "bot_first_user": self.fx.bot_first_user + (0 if self.name == "one" else 10**6),
                "port_file": str(self.dir / "bot-api.json"),
            },
        )
        if not wait_until(lambda: (self.dir / "bot-api.json").exists(), 60):
            raise RuntimeError(f"the Bot API stand-in did not start; see {bot.log}")
        self.build(json.loads((self.dir / "bot-api.json").read_text()))
        started = time.monotonic()
        self.start_all()
        self.start_fleets()
        print(f"  processes up in {time.monotonic() - started:.0f} s", flush=True)
        common = {"web": web_urls(), "staff_token": self.fx.staff_token}
        self._role("commands", {**common, "vm_ids": self.fx.vm_ids})
        self._role(
            "bets",
            {
                **common,
                "bettor_tokens": self.fx.bettor_tokens,
                "grpc": [f"127.0.0.1:{p}" for p in self.ports["grpc"]],
                "event_prefix": self.event_prefix,
            },
        )
        self._role(
            "chat",
            {
                **common,
                "chat_tokens": self.fx.chat_tokens,
                "rooms": self.rooms,
                "asgi": [f"ws://127.0.0.1:{p}" for p in self.ports["asgi"]],
            },
        )
        self._role(
            "warehouse",
            {
                "queue": settings.WAREHOUSE_QUEUE,
                "warehouses": self.fx.warehouses,
                "products": self.fx.products,
            },
        )
        ready = lambda: all((self.dir / f"ready-{n}").exists() for n in self.roles)  # noqa: E731
        if not wait_until(ready, 120):
            missing = [n for n in self.roles if not (self.dir / f"ready-{n}").exists()]
            raise RuntimeError(f"drivers not ready: {missing}")
        t0 = float(int(time.time()) + 2)
        (self.dir / "go").write_text(str(t0))
        self.t0, self.t_end = t0, t0 + round(SECONDS)
        self.t_kill = t0 + round(SECONDS * KILL_AT) if self.copies > 1 else None
        time.sleep(max(0.0, t0 - time.time()))
        self.sample("t0")
        # The same instant in both phases: phase two kills there, phase one runs on.
        time.sleep(max(0.0, self.t0 + round(SECONDS * KILL_AT) - time.time()))
        self.sample("kill")
        if self.t_kill is not None:
            self.kill_and_restart()
        time.sleep(max(0.0, self.t_end - time.time()))
        self.sample("end")
        self.died = [p.name for p in [*self.procs, *self.fleets] if not p.alive()]
        print(f"  load stopped after {self.t_end - self.t0:.0f} s; draining", flush=True)
        for proc in self.roles.values():
            if proc.popen is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        for name, proc in self.roles.items():
            assert proc.popen is not None
            try:
                proc.popen.wait(timeout=DRAIN + 60)
            except subprocess.TimeoutExpired:
                print(f"  driver {name} did not finish its drain; killed", flush=True)
                proc.stop(1)
            out = self.dir / f"result-{name}.json"
            self.results[name] = json.loads(out.read_text()) if out.exists() else None
        self.drivers_done = time.time()
        self.drain()

    def kill_and_restart(self) -> None:
        victims = [p for p in self.procs if p.kind in KINDS and p.name.endswith("-1")]
        for proc in victims:
            proc.kill()
        print(
            f"  t+{time.time() - self.t0:.0f} s: SIGKILLed {', '.join(p.name for p in victims)}",
            flush=True,
        )
        time.sleep(KILL_PAUSE)
        for proc in victims:
            proc.start()
        restarted = time.time()
        print(f"  t+{restarted - self.t0:.0f} s: restarted them", flush=True)
        self.watcher = threading.Thread(
            target=self.watch_recovery, args=(victims, restarted), daemon=True
        )
        self.watcher.start()

    def watch_recovery(self, victims: list[Proc], restarted: float) -> None:
        """Seconds from the restart until each restarted copy listens (or consumes) again and
        until every agent is authorized again."""
        from django.conf import settings

        waiting: dict[str, Callable[[], bool]] = {}
        for proc in victims:
            if proc.port:
                waiting[proc.name] = partial(port_open, proc.port)
        waiting["consumer-1"] = partial(consumers_at_least, settings.WAREHOUSE_QUEUE, self.copies)
        waiting["worker-1"] = partial(consumers_at_least, "quintet.default", self.copies)
        waiting["all agents"] = lambda: self.fleet().get("authorized_now", 0) >= AGENTS
        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:
            for name, ready in list(waiting.items()):
                if ready():
                    self.recovery[name] = round(time.time() - restarted, 2)
                    del waiting[name]
            time.sleep(0.1)
        for name in waiting:
            self.recovery[name] = None

    def drain(self) -> None:
        """Bounded waits for what runs behind the drivers' backs: the queue, settlement, the
        command timeouts."""
        wh = self.results.get("warehouse") or {}
        total = wh.get("unique", 0) + wh.get("duplicates", 0)
        if not wait_until(lambda: warehouse_consumed() >= total, DRAIN, 0.5):
            print(
                f"  warehouse: {warehouse_consumed()} of {total} consumed after {DRAIN:.0f} s",
                flush=True,
            )
        bets = self.results.get("bets") or {}
        finished = list((bets.get("finished") or {}).keys())
        if not wait_until(lambda: self._pending_bets(finished) == 0, DRAIN, 0.5):
            print(f"  betting: {self._pending_bets(finished)} bets still pending", flush=True)
        # Every command was created before its driver stopped; its web copy answers or times
        # it out within the timeout (unless that copy died holding it: the check's point).
        time.sleep(max(0.0, self.drivers_done + COMMAND_TIMEOUT + 2 - time.time()))
        if not wait_until(lambda: self.fleet().get("authorized_now", 0) >= AGENTS, DRAIN, 0.5):
            print(f"  agents: {self.fleet().get('authorized_now')} of {AGENTS} online", flush=True)
        self.fleet_end = self.fleet()
        if self.watcher is not None:
            self.watcher.join(timeout=DRAIN)
        time.sleep(2)  # the last batches commit before their acks

    @staticmethod
    def _pending_bets(events: list[str]) -> int:
        from django.db import close_old_connections

        from betting.models import Bet, BetStatus

        close_old_connections()
        return Bet.objects.filter(event_id__in=events, status=BetStatus.PENDING).count()

    def _rooms_create(self) -> None:
        from realtime.models import Room

        for slug in self.rooms:
            Room.objects.create(slug=slug, kind=Room.Kind.PUBLIC)

    # --- verification ------------------------------------------------------------------------

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def verify(self) -> None:
        from django.db import close_old_connections

        close_old_connections()
        self.check(
            "no process exited on its own",
            not self.died,
            f"exited: {self.died} (logs in {self.dir.relative_to(ROOT)})" if self.died else "none",
        )
        missing = [name for name, result in self.results.items() if result is None]
        self.check(
            "every driver reported",
            not missing,
            f"no result from {missing}" if missing else "all five drivers",
        )
        if self.results.get("warehouse"):
            self.verify_warehouse(self.results["warehouse"])
        if self.results.get("bets"):
            self.verify_bets(self.results["bets"])
        if self.results.get("chat"):
            self.verify_chat(self.results["chat"])
        if self.results.get("commands"):
            self.verify_commands(self.results["commands"])
        if self.results.get("bot"):
            self.verify_bot(self.results["bot"])
        gave_up = self.fleet_end.get("gave_up", 0)
        online = self.fleet_end.get("authorized_now", 0)
        self.check(
            "every agent online at the end",
            online == AGENTS and gave_up == 0,
            f"{online}/{AGENTS} authorized, {gave_up} gave up",
        )

    def verify_warehouse(self, wh: dict[str, Any]) -> None:
        from django.db.models import Sum

        from warehouse.models import DeadLetter, LedgerEntry, Stock

        rows = LedgerEntry.objects.count()
        counted = int(LedgerEntry.objects.aggregate(n=Sum("duplicates"))["n"] or 0)
        dead = DeadLetter.objects.count()
        self.check(
            "warehouse: ledger rows = unique messages",
            rows == wh["unique"],
            f"{rows} rows, {wh['unique']} unique messages published",
        )
        self.check(
            "warehouse: each duplicate counted once",
            counted == wh["duplicates"],
            f"{counted} counted, {wh['duplicates']} duplicates published",
        )
        reasons = list(DeadLetter.objects.values_list("reason", flat=True)[:5])
        self.check("warehouse: no dead letter", dead == 0, f"{dead} {reasons}")
        ledger = {
            f"{r['warehouse_id']} {r['product_id']}": int(r["s"])
            for r in LedgerEntry.objects.values("warehouse_id", "product_id").annotate(
                s=Sum("delta")
            )
        }
        stock = {
            f"{w} {p}": int(b)
            for w, p, b in Stock.objects.values_list("warehouse_id", "product_id", "balance")
        }
        expected = {k: v for k, v in wh["expected"].items()}
        keys = set(ledger) | set(stock) | set(expected)
        off_ledger = [k for k in keys if stock.get(k, 0) != ledger.get(k, 0)]
        off_sent = [k for k in keys if stock.get(k, 0) != expected.get(k, 0)]
        self.check(
            "warehouse: stock = Σ ledger per (warehouse, product)",
            not off_ledger,
            f"{len(off_ledger)} of {len(keys)} pairs differ",
        )
        self.check(
            "warehouse: stock = what was published",
            not off_sent,
            f"{len(off_sent)} of {len(keys)} pairs differ",
        )

    def verify_bets(self, bets: dict[str, Any]) -> None:
        from decimal import Decimal

        from betting.models import AuditEntry, Bet, BetStatus, IdempotencyKey

        finished: dict[str, str] = bets["finished"]
        rows = list(
            Bet.objects.filter(event_id__in=bets["created"]).values(
                "id", "event_id", "status", "payout", "potential_payout"
            )
        )
        by_id = {row["id"]: row for row in rows}
        pending = [r["id"] for r in rows if r["status"] == BetStatus.PENDING]
        wrong = [
            r["id"]
            for r in rows
            if r["status"] != BetStatus.PENDING
            and (
                (
                    finished.get(r["event_id"]) == "win"
                    and (r["status"] != BetStatus.WON or r["payout"] != r["potential_payout"])
                )
                or (
                    finished.get(r["event_id"]) == "lose"
                    and (r["status"] != BetStatus.LOST or r["payout"] != Decimal("0.00"))
                )
            )
        ]
        self.check(
            "betting: every bet on a finished event settled",
            not pending and len(finished) == len(bets["created"]),
            f"{len(rows)} bets on {len(finished)}/{len(bets['created'])} finished events,"
            f" {len(pending)} pending",
        )
        self.check("betting: settled at the right payout", not wrong, f"{len(wrong)} wrong")
        settled: Counter[str] = Counter()
        vias: Counter[str] = Counter()
        for subject_id, data, via in AuditEntry.objects.filter(
            subject=AuditEntry.Subject.BET, subject_id__in=list(finished)
        ).values_list("subject_id", "data", "via"):
            settled[subject_id] += int(data.get("bets", 0))
            vias[via] += 1
        per_event = Counter(r["event_id"] for r in rows)
        twice = [e for e in finished if settled[e] != per_event[e]]
        self.check(
            "betting: every bet settled once (Σ settlement audit = bets)",
            not twice,
            f"{len(twice)} events differ; settlements by {dict(vias)}",
        )
        acked = bets["acked"]
        lost = [
            k
            for k, v in acked.items()
            if v["bet"] not in by_id or by_id[v["bet"]]["event_id"] != v["event"]
        ]
        self.check(
            "betting: every acknowledged bet stored",
            not lost,
            f"{len(acked)} acknowledged, {len(lost)} missing",
        )
        acked_ids = {v["bet"] for v in acked.values()}
        others = [i for i in by_id if i not in acked_ids]
        explained = set(
            IdempotencyKey.objects.filter(
                bet_id__in=others, key__in=list(bets["unresolved"])
            ).values_list("bet_id", flat=True)
        )
        unasked = [i for i in others if i not in explained]
        self.check(
            "betting: no bet nobody asked for (no double placement)",
            not unasked,
            f"{len(others)} stored but unacknowledged, {len(unasked)} not from a "
            "request left unresolved",
        )
        unresolved = bets["unresolved"]
        self.check(
            "betting: every bet request resolved",
            not unresolved,
            f"{len(unresolved)} unresolved: {dict(Counter(unresolved.values()))}"
            f"; refusals {bets['refusals']}",
        )

    def verify_chat(self, chat: dict[str, Any]) -> None:
        from realtime.models import Message

        stored: dict[str, dict[int, str | None]] = {room: {} for room in self.rooms}
        for slug, seq, client_id in Message.objects.filter(room__slug__in=self.rooms).values_list(
            "room__slug", "seq", "client_id"
        ):
            stored[slug][int(seq)] = client_id
        gaps = [
            room
            for room, seqs in stored.items()
            if seqs and sorted(seqs) != list(range(1, max(seqs) + 1))
        ]
        self.check("chat: seqs gap-free per room", not gaps, f"{len(gaps)} rooms with gaps")
        missing = disorder = duplicates = 0
        members_missing = 0
        for client in chat["clients"]:
            want = set(stored[client["room"]])
            lacks = want - set(client["received"])
            missing += len(lacks)
            members_missing += bool(lacks)
            for run in client["runs"]:
                for before, after in itertools.pairwise(run):
                    if after == before:
                        duplicates += 1
                    elif after < before:
                        disorder += 1
        total = sum(len(s) for s in stored.values())
        self.check(
            "chat: every message delivered to every member",
            missing == 0,
            f"{total} messages x {ROOM_MEMBERS} members; {missing} deliveries missing at "
            f"{members_missing} members",
        )
        self.check(
            "chat: live deliveries in seq order",
            disorder == 0 and duplicates == 0,
            f"{disorder} out of order, {duplicates} repeated (per socket)",
        )
        wrong = unacked = 0
        acked_total = 0
        for client in chat["clients"]:
            seqs = stored[client["room"]]
            for client_id, seq in client["acked"].items():
                acked_total += 1
                wrong += seqs.get(seq) != client_id
            unacked += bool(client["unacked"])
        self.check(
            "chat: every ack names the stored message",
            wrong == 0,
            f"{acked_total} acks, {wrong} wrong; {total - acked_total} stored unacked, "
            f"{unacked} sends unfinished",
        )

    def verify_commands(self, commands: dict[str, Any]) -> None:
        from vmcontrol.models import Command, VirtualMachine

        since = datetime.fromtimestamp(self.t0 - 5, UTC)
        statuses = Counter(
            Command.objects.filter(created_at__gte=since).values_list("status", flat=True)
        )
        stuck = statuses.get("queued", 0) + statuses.get("sent", 0)
        self.check(
            "commands: every command answered or timed out",
            stuck == 0,
            f"database {dict(statuses)}; REST answers {commands['statuses']}",
        )
        last = {int(vm): tuple(v) for vm, v in commands["last"].items() if v[1] == 200}
        ram = dict(VirtualMachine.objects.filter(pk__in=list(last)).values_list("pk", "ram_mb"))
        wrong = [vm for vm, (asked, _) in last.items() if ram.get(vm) != asked]
        self.check(
            "commands: last acknowledged RAM stored",
            not wrong,
            f"{len(wrong)} of {len(last)} VMs differ",
        )

    def verify_bot(self, bot: dict[str, Any]) -> None:
        pushed, answers, failures = bot["pushed"], bot["answers"], bot["failures"]
        lost = sum(max(0, pushed[u] - answers[u]) for u in pushed)
        twice = sum(max(0, answers[u] - pushed[u]) for u in pushed)
        failed = sum(failures.values())
        # At-least-once (README "Scaling out"): an update the killed poller was replying to may be
        # answered again by the copy that takes over; each user has at most one in flight.
        self.check(
            "bot: every update answered, at most once more if its reply was cut by the kill",
            lost == 0 and twice <= BOT_USERS,
            f"{sum(pushed.values())} updates: {lost} unanswered, {twice} extra answers"
            f" ({bot['conflicts']} getUpdates conflicts, {bot['polls']} polls; not answered"
            f" within {ANSWER_WAIT:.0f} s: {bot['unanswered_in_time']})",
        )
        self.check(
            "bot: no failure answer", failed == 0, f"{failed} answered with the failure text"
        )

    # --- figures -----------------------------------------------------------------------------

    def rates(self, start: float, end: float) -> dict[str, float]:
        span = end - start
        out: dict[str, float] = {}

        def buckets(name: str) -> int:
            result = self.results.get(name) or {}
            return count_between(result.get("done", {}), start, end)

        out["commands"] = buckets("commands") / span
        out["bets"] = buckets("bets") / span
        out["bot"] = buckets("bot") / span
        chat = (self.results.get("chat") or {}).get("clients", [])
        sent = sum(count_between(c["done"], start, end) for c in chat)
        out["chat"] = sent / span
        out["chat_deliveries"] = sent * ROOM_MEMBERS / span
        keys = {self.t0: "t0", self.t0 + round(SECONDS * KILL_AT): "kill", self.t_end: "end"}
        a, b = self.samples[keys[start]], self.samples[keys[end]]
        out["warehouse"] = (b.consumed - a.consumed) / span
        out["heartbeats"] = (b.pongs - a.pongs) / span
        return out

    def cpu(self, start: str, end: str) -> dict[str, Any]:
        a, b = self.samples[start], self.samples[end]
        wall = b.at - a.at
        cores = os.cpu_count() or 1
        per_kind = {k: b.server_cpu.get(k, 0) - a.server_cpu.get(k, 0) for k in b.server_cpu}
        server = sum(per_kind.values())
        busy = b.machine[0] - a.machine[0]
        total = b.machine[1] - a.machine[1]
        return {
            "wall_s": wall,
            "server_cpu_s": server,
            "server_utilisation": server / (wall * cores),
            "per_kind_cpu_s": per_kind,
            "load_generators_cpu_s": b.load_cpu - a.load_cpu,
            "machine_busy": busy / total if total else None,
            "machine_load_average": max(a.loadavg, b.loadavg),
        }

    def figures(self) -> dict[str, Any]:
        steady_end = self.t0 + round(SECONDS * KILL_AT)
        out: dict[str, Any] = {
            "copies": self.copies,
            "rates_steady": self.rates(self.t0, steady_end),
            "rates_whole": self.rates(self.t0, self.t_end),
            "cpu_whole": self.cpu("t0", "end"),
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
        }
        out["cpu_steady"] = self.cpu("t0", "kill")
        extras: dict[str, Any] = {}
        if self.results.get("chat"):
            clients = self.results["chat"]["clients"]
            extras["chat_reconnects"] = sum(c["reconnects"] for c in clients)
            extras["chat_filled_by_sync"] = sum(c["synced"] for c in clients)
            extras["chat_ack_timeouts"] = sum(c["ack_timeouts"] for c in clients)
            extras["chat_errors"] = dict(sum((Counter(c["errors"]) for c in clients), Counter()))
        for name in ("commands", "bets"):
            if self.results.get(name):
                extras[f"{name}_failovers"] = self.results[name].get("failovers")
        if self.results.get("bets"):
            extras["grpc_failovers"] = self.results["bets"].get("grpc_failovers")
            extras["events_finished"] = len(self.results["bets"]["finished"])
        if self.results.get("bot"):
            extras["bot_conflicts"] = self.results["bot"]["conflicts"]
            extras["bot_polls_by_copy"] = self.results["bot"].get("polls_by_copy")
            extras["bot_answers_by_copy"] = self.results["bot"].get("answers_by_copy")
            extras["bot_latency_p50_ms"] = self.results["bot"]["latency_p50_ms"]
        if self.results.get("warehouse"):
            extras["warehouse_published"] = {
                "unique": self.results["warehouse"]["unique"],
                "duplicates": self.results["warehouse"]["duplicates"],
            }
        if self.recovery:
            extras["seconds_to_recover_after_restart"] = self.recovery
        out["extras"] = extras
        return out


def cpu_line(label: str, cpu: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["per_kind_cpu_s"].items()))
    return (
        f"  {label:<10} server processes {cpu['server_cpu_s']:6.1f} CPU s in {cpu['wall_s']:.0f} s"
        f" = {cpu['server_utilisation']:4.0%} of {os.cpu_count()} cores ({kinds});"
        f" load generators {cpu['load_generators_cpu_s']:.1f} s;"
        f" machine busy {cpu['machine_busy']:.0%}, load average {cpu['machine_load_average']:.1f}"
    )


def figure_kind_line(label: str, one: float, two: float, two_whole: float | None, unit: str) -> str:
    ratio = two / one if one else float("nan")
    whole = f"{two_whole:>10,.1f}" if two_whole is not None else f"{'-':>10}"
    return f"  {label:<18} {one:>10,.1f} {two:>10,.1f} {ratio:>7.2f} {whole}  {unit}"


def main() -> None:
    from bench.harness import Report

    django_setup()
    from django.db import connection

    if connection.vendor != "postgresql" or not os.environ.get("CELERY_BROKER_URL"):
        sys.exit("bench/scaleout.py needs PostgreSQL (DATABASE_URL) and RabbitMQ")
    report = Report("scaleout")
    sizes = {
        "seconds": SECONDS,
        "kill_at": KILL_AT,
        "kill_pause_s": KILL_PAUSE,
        "agents": AGENTS,
        "heartbeat_s": HEARTBEAT,
        "commands_concurrency": COMMANDS_CONCURRENCY,
        "warehouse_backlog": WH_BACKLOG,
        "warehouse_duplicates": WH_DUPLICATES,
        "bettors": BETTORS,
        "open_events": OPEN_EVENTS,
        "settle_every_s": SETTLE_EVERY,
        "rooms": ROOMS,
        "room_members": ROOM_MEMBERS,
        "bot_users": BOT_USERS,
        "web_workers": WEB_WORKERS,
        "worker_concurrency": WORKER_CONCURRENCY,
        "cores": os.cpu_count(),
    }
    report.figure("sizes", sizes, f"sizes: {json.dumps(sizes)}")
    fx = fixtures_create()
    phases: dict[str, Phase] = {}
    for name in PHASES:
        phase = Phase(name, 1 if name == "one" else 2, fx)
        try:
            phase.run()
            print(f"phase {name}: verifying", flush=True)
            phase.verify()
        except Exception:
            traceback.print_exc()
            report.check(False, f"phase {name} did not complete (traceback above)")
            continue
        finally:
            phase.stop_all()
        phases[name] = phase
        figures = phase.figures()
        report.figure(name, figures)
        print(f"phase {name} throughput (first {round(SECONDS * KILL_AT)} s / whole run):")
        for kind, unit in RATE_KINDS.items():
            steady, whole = figures["rates_steady"][kind], figures["rates_whole"][kind]
            print(f"  {kind:<18} {steady:>10,.1f} {whole:>10,.1f}  {unit}")
        print(cpu_line("whole run", figures["cpu_whole"]))
        print(f"  {json.dumps(figures['extras'])}", flush=True)
        for check, ok, detail in phase.checks:
            report.check(ok, f"phase {name}: {check}: {detail}")
    if "one" in phases and "two" in phases:
        one, two = phases["one"].figures(), phases["two"].figures()
        span = round(SECONDS * KILL_AT)
        print(
            f"\nthroughput, first {span} s of each run (before the kill), and phase two's whole"
            f" {SECONDS:.0f} s with the kill and restart:"
        )
        print(f"  {'kind':<18} {'one copy':>10} {'two':>10} {'ratio':>7} {'two, whole':>10}")
        for kind, unit in RATE_KINDS.items():
            a, b = one["rates_steady"][kind], two["rates_steady"][kind]
            print(figure_kind_line(kind, a, b, two["rates_whole"][kind], unit), flush=True)
            report.figures.setdefault("ratios", {})[kind] = b / a if a else None
        for window in ("steady", "whole"):
            print(f"CPU, {'first ' + str(span) + ' s' if window == 'steady' else 'whole run'}:")
            for label, data in (("one copy", one), ("two copies", two)):
                print(cpu_line(label, data[f"cpu_{window}"]), flush=True)
    report.finish()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--role":
        role_main(sys.argv[2], sys.argv[3])
    else:
        main()
