"""console: 50 open operator consoles change warehouse ingest and bet throughput by at most 5 %.

Real services (PostgreSQL, Redis, RabbitMQ), production processes: the ASGI server (uvicorn,
`config.asgi`, the WebSocket side the consoles connect to), the web server (granian WSGI,
`bench.harness.web_server_args`), a Celery worker and Celery beat (the console publisher: the
`common.console_publish` beat task every CONSOLE_SAMPLE_SECONDS, as in production).

Three phases in one run: no console, BENCH_CONSOLE_VIEWERS (50) consoles, no console again (the
baseline is the mean of the two console-less phases, so drift over the run does not count
against the consoles). The consoles are a separate process (this file with `--viewers N`): per
console a snapshot GET (what the page loads) and a real WebSocket subscribed to every console
topic, reading every event. Each phase measures:

1. warehouse ingest: BENCH_CONSOLE_MESSAGES messages pre-loaded into RabbitMQ, drained by one
   `run_warehouse_consumer` process (msg/s, from its first heartbeat to the last row stored);
2. bets: wrk POST /api/betting/bet (16 connections, one event) for BENCH_CONSOLE_BET_SECONDS;
3. idle cost: CPU seconds of the ASGI server and of the worker over BENCH_CONSOLE_IDLE_SECONDS
   with no load (the consoles' sockets only: per viewer it should be nearly nothing).

Printed: each rate with and without consoles and the ratio; the target (within 5 %); events
each console received (a check that the publisher was live). Results: bench/results/console.json.

Run: flock /tmp/quintet-bench.lock .venv/bin/python bench/console.py
Quick end-to-end check: BENCH_CONSOLE_MESSAGES=3000 BENCH_CONSOLE_BET_SECONDS=3
BENCH_CONSOLE_IDLE_SECONDS=3 .venv/bin/python bench/console.py
"""

import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VIEWERS = int(os.environ.get("BENCH_CONSOLE_VIEWERS", "50"))
MESSAGES = int(os.environ.get("BENCH_CONSOLE_MESSAGES", "30000"))
BET_SECONDS = float(os.environ.get("BENCH_CONSOLE_BET_SECONDS", "10"))
IDLE_SECONDS = float(os.environ.get("BENCH_CONSOLE_IDLE_SECONDS", "10"))
LIMIT = 0.05
QUEUE = "warehouse.bench.console"
CLIENTS = 16
EVENT = "console-bench"
DRAIN_LIMIT_SECONDS = 240.0


# --- the consoles (a separate process; no Django) ---------------------------------------------


async def _viewer_open(ws_url: str, ticket: str, hello: list[Any], subscribe: list[Any]) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(f"{ws_url}/ws/?ticket={ticket}", open_timeout=30, max_size=2**22)
    for frame in [*hello, *subscribe]:
        await ws.send(json.dumps(frame))
    pending = {frame["topic"] for frame in subscribe}
    while pending:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if frame.get("type") == "subscribed":
            pending.discard(frame["topic"])
        elif frame.get("type") == "error":
            raise RuntimeError(f"console refused: {frame}")
    return ws


async def viewers_run(http_url: str, ws_url: str, tokens: list[str], out: Path) -> None:
    """Open one console per staff token as the page does (snapshot, socket, subscriptions),
    write `ready` to `out`, read every frame until SIGTERM, then write `{"events": [per
    console]}` to `out`. One operator per console: the hub rate-limits frames per user."""
    import httpx

    count = len(tokens)
    snapshots, tickets = [], []
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        for token in tokens:
            headers = {"Authorization": f"Token {token}"}
            snapshots.append((await http.get("/api/console/snapshot", headers=headers)).json())
            ticket = await http.post("/api/realtime/ticket", headers=headers)
            tickets.append(ticket.json()["ticket"])
    hello, subscribe = snapshots[0]["ws"]["hello"], snapshots[0]["ws"]["subscribe"]
    sockets = [await _viewer_open(ws_url, ticket, hello, subscribe) for ticket in tickets]
    events = [0] * count
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def read(index: int) -> None:
        async for raw in sockets[index]:
            if json.loads(raw).get("type") == "event":
                events[index] += 1

    readers = [asyncio.create_task(read(index)) for index in range(count)]
    out.write_text("ready")  # noqa: ASYNC240 (a tiny file, once)
    await stop.wait()
    for reader in readers:
        reader.cancel()
    out.write_text(json.dumps({"events": events, "topics": len(subscribe)}))  # noqa: ASYNC240
    for ws in sockets:
        await ws.close()


# --- the measuring process --------------------------------------------------------------------


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()


def _reset() -> None:
    from django.db import connection

    from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock

    tables = [m._meta.db_table for m in (LedgerEntry, Stock, DeadLetter, ConsumerHeartbeat)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)}")
        cursor.execute(
            "truncate betting_idempotencykey, betting_bet, betting_eventchange, betting_event,"
            " betting_auditentry, betting_changesequence restart identity cascade"
        )


def _betting_seed() -> list[str]:
    from datetime import timedelta
    from decimal import Decimal

    from django.utils import timezone

    from betting import services
    from tests.factories import UserFactory, token_for

    services.event_create(
        event_id=EVENT,
        name="Console bench",
        coefficient=Decimal("1.90"),
        deadline=timezone.now() + timedelta(hours=24),
        actor_id=None,
        via="bench",
    )
    return [
        token_for(UserFactory.create(username=f"cb-{uuid.uuid4().hex[:10]}"))
        for _ in range(CLIENTS)
    ]


def _drain(bodies: list[bytes], env: dict[str, str]) -> float:
    """msg/s of one consumer process draining `bodies` pre-loaded into RabbitMQ."""
    from django.db import close_old_connections

    from bench.harness import process
    from warehouse.models import ConsumerHeartbeat, LedgerEntry
    from warehouse.queue import connection_open, envelopes_publish, movement_queue

    with connection_open() as conn:
        bound = movement_queue(QUEUE)(conn.channel())
        bound.declare()
        bound.purge()
    envelopes_publish(bodies, queue_name=QUEUE)
    command = [sys.executable, "manage.py", "run_warehouse_consumer", "--queue", QUEUE]
    with process(command, env={**env, "WAREHOUSE_HEARTBEAT_SECONDS": "0.5"}):
        deadline = time.monotonic() + 60
        while not ConsumerHeartbeat.objects.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the consumer did not start")
            time.sleep(0.02)
        began = time.perf_counter()
        deadline = time.monotonic() + DRAIN_LIMIT_SECONDS
        stored = 0
        while stored < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.02)
            close_old_connections()
            stored = LedgerEntry.objects.count()
        seconds = time.perf_counter() - began
    if stored < len(bodies):
        raise RuntimeError(f"drained {stored} of {len(bodies)} in {DRAIN_LIMIT_SECONDS} s")
    return stored / seconds


@contextmanager
def _viewers(count: int, http_url: str, ws_url: str, tokens: list[str]) -> Iterator[Path | None]:
    """The consoles process, ready (every console subscribed) when the block starts; the file
    then holds what they received."""
    if not count:
        yield None
        return
    from bench.harness import process

    out = Path(tempfile.mkdtemp(prefix="console-bench-")) / "viewers.json"
    args = [sys.executable, __file__, "--viewers", http_url, ws_url, str(out)]
    # Tokens travel in the environment, not on the command line other users can read.
    with process(args, env={"CONSOLE_BENCH_TOKENS": ",".join(tokens[:count])}) as child:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text() == "ready"):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the consoles did not open")
            time.sleep(0.1)
        yield out
        child.terminate()
        child.wait(timeout=30)


def _publisher_alive(http_url: str, token: str, within: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + within
    headers = {"Authorization": f"Token {token}"}
    first = None
    while time.monotonic() < deadline:
        panels = httpx.get(f"{http_url}/api/console/snapshot", headers=headers).json()["panels"]
        at = panels[0]["at"]
        if at is not None and first is not None and at > first:
            return
        first = at if first is None else first
        time.sleep(0.5)
    raise RuntimeError("the console publisher (beat + worker) is not publishing")


def main() -> None:
    _setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from bench.harness import (
        Report,
        celery_worker_args,
        cpu_seconds,
        free_port,
        process,
        wait_for_port,
        web_server_args,
        wrk,
    )
    from tests.factories import StaffFactory, token_for
    from warehouse.simulator import Simulation

    if (
        connection.vendor != "postgresql"
        or not settings.CELERY_BROKER_URL
        or not settings.REDIS_URL
    ):
        sys.exit(
            "bench/console.py needs DATABASE_URL (PostgreSQL), REDIS_URL and CELERY_BROKER_URL"
        )
    call_command("migrate", verbosity=0)
    report = Report("console")
    operators = [
        token_for(StaffFactory.create(username=f"cs-{uuid.uuid4().hex[:10]}"))
        for _ in range(max(VIEWERS, 1))
    ]
    staff = operators[0]
    movements = max(1, (MESSAGES - 20 * 100) // 2)
    simulation = Simulation(
        seed=7, warehouses=20, products=100, movements=movements, initial_stock=1000
    )
    bodies = simulation.initial_bodies() + simulation.movement_bodies()
    report.figure(
        "sizes",
        {
            "viewers": VIEWERS,
            "messages": len(bodies),
            "bet_seconds": BET_SECONDS,
            "idle_seconds": IDLE_SECONDS,
            "sample_seconds": settings.CONSOLE_SAMPLE_SECONDS,
        },
        f"sizes: {VIEWERS} consoles; {len(bodies):,} warehouse messages; bets for "
        f"{BET_SECONDS:g} s x {CLIENTS} connections; publisher every "
        f"{settings.CONSOLE_SAMPLE_SECONDS:g} s",
    )
    env = {
        "LOG_LEVEL": "WARNING",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
    }
    asgi_port, web_port = free_port(), free_port()
    asgi = [
        str(Path(sys.executable).parent / "uvicorn"),
        "config.asgi:application",
        "--port",
        str(asgi_port),
        "--ws",
        "websockets-sansio",
        "--ws-per-message-deflate",
        "false",
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    schedule = Path(tempfile.mkdtemp(prefix="console-beat-")) / "schedule"
    beat = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "WARNING"]
    beat += ["--schedule", str(schedule)]
    phases: list[dict[str, Any]] = []
    with (
        process(asgi, env=env) as asgi_server,
        process(web_server_args(web_port), env=env) as web,
        process(celery_worker_args(), env=env) as worker,
        process(beat, env=env),
    ):
        wait_for_port(asgi_port)
        wait_for_port(web_port)
        http_url = f"http://127.0.0.1:{web_port}"
        ws_url = f"ws://127.0.0.1:{asgi_port}"
        _publisher_alive(http_url, staff)
        for label, count in (("none", 0), ("consoles", VIEWERS), ("none again", 0)):
            _reset()
            tokens = _betting_seed()
            with _viewers(count, http_url, ws_url, operators) as out:
                asgi_cpu, worker_cpu = cpu_seconds(asgi_server.pid), cpu_seconds(worker.pid)
                time.sleep(IDLE_SECONDS)
                idle = {
                    "asgi_cpu_per_s": (cpu_seconds(asgi_server.pid) - asgi_cpu) / IDLE_SECONDS,
                    "worker_cpu_per_s": (cpu_seconds(worker.pid) - worker_cpu) / IDLE_SECONDS,
                }
                drain_rate = _drain(bodies, env)
                bets = wrk(
                    f"{http_url}/api/betting/bet",
                    server_pids=[web.pid],
                    seconds=BET_SECONDS,
                    connections=CLIENTS,
                    script="betting_bet.lua",
                    script_env={"BETTING_TOKENS": ",".join(tokens), "BETTING_EVENT_ID": EVENT},
                )
            received = json.loads(out.read_text()) if out is not None else None
            phase = {
                "label": label,
                "viewers": count,
                "drain_rate": drain_rate,
                "bet_rate": bets.rate,
                "bet_p99_ms": bets.p99_ms,
                "bet_errors": bets.non_2xx + bets.socket_errors,
                **idle,
                "events": received,
            }
            phases.append(phase)
            print(
                f"phase {label:<10} consoles {count:>3}: ingest {drain_rate:>9,.0f} msg/s   "
                f"bets {bets.rate:>8,.0f}/s (p99 {bets.p99_ms:.1f} ms)   idle CPU: asgi "
                f"{idle['asgi_cpu_per_s'] * 1000:.1f} ms/s, worker "
                f"{idle['worker_cpu_per_s'] * 1000:.1f} ms/s",
                flush=True,
            )
    report.figure("phases", phases)
    without = [phase for phase in phases if not phase["viewers"]]
    with_consoles = next(phase for phase in phases if phase["viewers"])
    for key, label, unit in (
        ("drain_rate", "warehouse ingest with 50 consoles (vs none)", "msg/s"),
        ("bet_rate", "bets with 50 consoles (vs none)", "bets/s"),
    ):
        baseline = statistics.fmean(phase[key] for phase in without)
        report.compare(key, with_consoles[key], baseline, unit, label)
        change = with_consoles[key] / baseline - 1
        report.target(key, change >= -LIMIT, f"{label}: within 5 % (changed {change:+.1%})")
    idle_extra = with_consoles["asgi_cpu_per_s"] - statistics.fmean(
        phase["asgi_cpu_per_s"] for phase in without
    )
    report.figure(
        "asgi_idle_cpu_ms_per_s_per_console",
        idle_extra * 1000 / VIEWERS,
        f"ASGI server CPU per idle console: {idle_extra * 1000 / VIEWERS:.3f} ms/s",
    )
    events = with_consoles["events"]["events"]
    report.figure(
        "events_per_console",
        {"min": min(events), "max": max(events)},
        f"events received per console: {min(events)}..{max(events)} "
        f"({with_consoles['events']['topics']} topics)",
    )
    report.check(min(events) > 0, "a console received no event: the publisher was not live")
    report.check(
        all(phase["bet_errors"] == 0 for phase in phases),
        f"bet errors: {[phase['bet_errors'] for phase in phases]}",
    )
    report.finish()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--viewers":
        http_url, ws_url, out = sys.argv[2:5]
        tokens = os.environ["CONSOLE_BENCH_TOKENS"].split(",")
        asyncio.run(viewers_run(http_url, ws_url, tokens, Path(out)))
    else:
        main()
