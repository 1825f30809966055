# ruff: noqa: E402
"""Betting benchmark against the real services (PostgreSQL, Redis, RabbitMQ).

HTTP load comes from `wrk` (C, 16 connections) against the production server
(`bench.harness.web_server_args`: granian WSGI, 2 workers); every HTTP figure is printed with
the server's CPU time per request (its process tree, from /proc) and its ratio to a bare Django
view (`bench.bare_django:wsgi`, GET /bare) on the same server in the same run.

1. POST /api/betting/bet, every bet on ONE event (the hot-event case), 16 connections:
   bets/s, p99, web CPU ms per bet, PostgreSQL backend CPU ms per bet (the web servers'
   backends, from /proc), database transactions per bet (`pg_stat_database.xact_commit`).
   Meanwhile ten odds changes of that event (the exclusive lock the placements' shared ones must
   let through), timed against the same changes with no bet in flight.
   Also GET /api/auth/me, the trivial authenticated view the per-request cost is judged by.
2. GET /api/betting/events?limit=200 with 200 open events: uncached (a second server with
   BETTING_EVENTS_CACHE_SECONDS=0) and cached (the default brief cache).
3. gRPC GetEvent at concurrency 16 against `manage.py run_line_provider`; baseline: a bare
   grpc.aio server returning a constant Event (this file with --bare-grpc), same run.
4. WatchEvents: 100 subscribers, 50 odds changes/s: delivery p99 and no gaps/duplicates.
5. Settle BENCH_BETTING_SETTLE_BETS (100k) pending bets: time from FinishEvent returning to the
   last bet settled by a real Celery worker; baseline: one raw SQL UPDATE of the same rows;
   a redelivered settlement must change 0 rows.

The gRPC processes start only after the HTTP phases, so the transaction count per bet is the
web server's alone.

Run: flock /tmp/quintet-bench.lock .venv/bin/python bench/betting.py
"""

import asyncio
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django
import grpc

django.setup()

from datetime import datetime, timedelta

from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from google.protobuf.timestamp_pb2 import Timestamp

from bench.harness import (
    Report,
    WrkResult,
    celery_worker_args,
    cpu_seconds,
    free_port,
    percentile,
    process,
    run_at_rate,
    run_concurrently,
    wait_for_port,
    web_server_args,
    wrk,
)
from betting import services
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Bet, BetStatus
from tests.factories import StaffFactory, UserFactory, token_for

HTTP_SECONDS = float(os.environ.get("BENCH_BETTING_HTTP_SECONDS", "10"))
GRPC_CALLS = int(os.environ.get("BENCH_BETTING_GRPC_CALLS", "10000"))
SETTLE_BETS = int(os.environ.get("BENCH_BETTING_SETTLE_BETS", "100000"))
WATCHERS = int(os.environ.get("BENCH_BETTING_WATCHERS", "100"))
WATCH_RATE = float(os.environ.get("BENCH_BETTING_WATCH_RATE", "50"))
WATCH_SECONDS = float(os.environ.get("BENCH_BETTING_WATCH_SECONDS", "10"))
OPEN_EVENTS = 200
HOT_EVENT = "open-0"
CLIENTS = 16


# --- the bare gRPC baseline -------------------------------------------------------------------


class BareLineProvider(pb_grpc.LineProviderServicer):
    def __init__(self) -> None:
        self.event = pb.Event(id="bare", name="Bare", coefficient="1.75", version=1, sequence=1)

    async def GetEvent(self, request: Any, context: Any) -> pb.Event:
        return self.event


async def bare_grpc_serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_LineProviderServicer_to_server(BareLineProvider(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- setup ------------------------------------------------------------------------------------


def reset() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "truncate betting_idempotencykey, betting_bet, betting_eventchange, betting_event,"
            " betting_auditentry, betting_changesequence restart identity cascade"
        )


def deadline_in(hours: float) -> datetime:
    return timezone.now() + timedelta(hours=hours)


def seed() -> tuple[list[str], str]:
    tokens = [
        token_for(UserFactory.create(username=f"bb-{uuid.uuid4().hex[:10]}"))
        for _ in range(CLIENTS)
    ]
    staff = token_for(StaffFactory.create(username=f"bs-{uuid.uuid4().hex[:10]}"))
    for n in range(OPEN_EVENTS):
        services.event_create(
            event_id=f"open-{n}",
            name=f"Open match {n}",
            coefficient=Decimal("1.90"),
            deadline=deadline_in(24),
            actor_id=None,
            via="bench",
        )
    return tokens, staff


# --- HTTP (wrk) -------------------------------------------------------------------------------


def backend_pids() -> list[int]:
    """PostgreSQL backends serving this database, other than this process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "select pid from pg_stat_activity where datname = current_database()"
            " and backend_type = 'client backend' and pid <> pg_backend_pid()"
        )
        return [row[0] for row in cursor.fetchall()]


def transactions_committed() -> int:
    """Committed + rolled-back transactions of this database (`pg_stat_database`), once the
    figure holds still: a backend flushes its counts within about a second of going idle."""
    last = -1
    for _ in range(20):
        with connection.cursor() as cursor:
            cursor.execute(
                "select xact_commit + xact_rollback from pg_stat_database"
                " where datname = current_database()"
            )
            value = int(cursor.fetchone()[0])
        if value - last <= 2:  # at most our own reads moved it (a few among thousands)
            return value
        last = value
        time.sleep(0.75)
    return last


def metered(run: Callable[[], WrkResult]) -> tuple[WrkResult, float, float]:
    """`run()` plus the PostgreSQL backend CPU (ms) and transactions it caused, per request.
    Backends opened during the run count from their start."""
    before = {pid: cpu_seconds(pid) for pid in backend_pids()}
    xacts = transactions_committed()
    result = run()
    xacts = transactions_committed() - xacts
    after = {pid: cpu_seconds(pid) for pid in backend_pids()}
    cpu = sum(after[pid] - before.get(pid, 0.0) for pid in after)
    count = max(result.requests, 1)
    return result, cpu * 1000 / count, xacts / count


class HotOddsWriter(threading.Thread):
    """While the bets run, change the hot event's odds now and then (the exclusive lock the
    placements' shared locks must let through) and time each change, in ms."""

    ODDS = [Decimal("1.90"), Decimal("1.95")]

    def __init__(self, *, delay: float = min(2.0, HTTP_SECONDS / 4)) -> None:
        super().__init__(daemon=True)
        self.delay = delay
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            time.sleep(self.delay)
            for change in range(10):
                started = time.perf_counter()
                services.event_odds_update(
                    event_id=HOT_EVENT,
                    coefficient=self.ODDS[(change + 1) % 2],
                    actor_id=None,
                    via="bench",
                )
                self.latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(HTTP_SECONDS / 20)
        except Exception as error:
            self.errors.append(repr(error))
        finally:
            connection.close()


@dataclass(frozen=True)
class Server:
    port: int
    pid: int


def http_phases(
    report: Report, *, bare: Server, web: Server, uncached: Server, tokens: list[str]
) -> None:
    base = "http://127.0.0.1"
    header = {"Authorization": f"Token {tokens[0]}"}
    events_path = f"/api/betting/events?limit={OPEN_EVENTS}"
    for server, path in ((bare, "/bare"), (web, "/api/auth/me"), (uncached, events_path)):
        wrk(f"{base}:{server.port}{path}", server_pids=[], seconds=2, headers=header)  # warm up

    def run(server: Server, path: str, **options: Any) -> WrkResult:
        url = f"{base}:{server.port}{path}"
        return wrk(url, server_pids=[server.pid], seconds=HTTP_SECONDS, **options)

    bare_run = run(bare, "/bare")
    print(bare_run.line("bare Django GET /bare"), flush=True)

    def versus(key: str, label: str, result: WrkResult) -> None:
        print(result.line(label), flush=True)
        report.compare(f"{key}_rps", result.rate, bare_run.rate, "req/s", f"  {label} throughput")
        report.compare(
            f"{key}_cpu_ms",
            result.server_cpu_ms_per_request,
            bare_run.server_cpu_ms_per_request,
            "ms/req",
            f"  {label} server CPU",
        )
        report.figure(f"{key}_p50_ms", result.p50_ms)
        report.figure(f"{key}_p99_ms", result.p99_ms)
        report.check(
            result.non_2xx == 0 and result.socket_errors == 0,
            f"{label}: {result.non_2xx} non-2xx, {result.socket_errors} socket errors",
        )

    me = run(web, "/api/auth/me", headers=header)
    versus("me", "GET /api/auth/me (trivial authenticated)", me)

    writer = HotOddsWriter()
    writer.start()
    bets, pg_cpu, xacts = metered(
        lambda: run(
            web,
            "/api/betting/bet",
            script="betting_bet.lua",
            script_env={"BETTING_TOKENS": ",".join(tokens), "BETTING_EVENT_ID": HOT_EVENT},
        )
    )
    writer.join()
    versus("bet", "POST /api/betting/bet (one event)", bets)
    idle = HotOddsWriter(delay=0)  # the same changes with no bet in flight
    idle.start()
    idle.join()
    report.compare(
        "hot_odds_change_p50_ms",
        percentile(writer.latencies, 50),
        percentile(idle.latencies, 50),
        "ms",
        "  odds change of the hot event during bets, p50",
    )
    report.compare(
        "hot_odds_change_max_ms",
        max(writer.latencies, default=math.nan),
        max(idle.latencies, default=math.nan),
        "ms",
        "  odds change of the hot event during bets, max",
    )
    report.check(
        not writer.errors and not idle.errors,
        f"odds changes failed: {(writer.errors + idle.errors)[:3]}",
    )
    report.figure(
        "bet_db",
        {"postgres_cpu_ms_per_bet": pg_cpu, "transactions_per_bet": xacts},
        f"  PostgreSQL backend CPU {pg_cpu:.2f} ms/bet; {xacts:.2f} transactions/bet"
        f" (web + database {bets.server_cpu_ms_per_request + pg_cpu:.2f} ms/bet)",
    )
    report.target("bet_rps", bets.rate >= 500, ">= 500 bets/s on one event")
    report.target("bet_p99", bets.p99_ms <= 60, "p99 <= 60 ms")
    report.target("bet_cpu", bets.server_cpu_ms_per_request <= 3, "<= 3 ms server CPU per bet")
    accepted = bets.requests - bets.non_2xx
    stored = Bet.objects.filter(event_id=HOT_EVENT).count()
    # wrk stops counting at its deadline; requests still in flight may land after it.
    report.check(
        accepted <= stored <= accepted + CLIENTS, f"{stored} bets stored, {accepted} answered 201"
    )
    odd = Bet.objects.exclude(status=BetStatus.PENDING, coefficient__in=HotOddsWriter.ODDS).count()
    report.check(odd == 0, f"{odd} bets not pending at one of the event's coefficients")

    events_uncached, pg_cpu, _ = metered(lambda: run(uncached, events_path, headers=header))
    versus("events_uncached", "GET /events?limit=200 uncached", events_uncached)
    report.figure(
        "events_uncached_postgres_cpu_ms", pg_cpu, f"  PostgreSQL CPU {pg_cpu:.2f} ms/req"
    )
    report.target(
        "events_uncached_cpu",
        events_uncached.server_cpu_ms_per_request <= 10.8,
        "uncached <= 10.8 ms CPU/request (the public peer's)",
    )
    events = run(web, events_path, headers=header)
    versus("events", "GET /events?limit=200 (brief cache)", events)
    report.target("events_rps", events.rate >= 1500, ">= 1500 req/s")


# --- gRPC -------------------------------------------------------------------------------------


async def grpc_get_load(address: str, event_id: str) -> Any:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LineProviderStub(channel)
        await stub.GetEvent(pb.GetEventRequest(id=event_id))

        async def call(index: int) -> None:
            await stub.GetEvent(pb.GetEventRequest(id=event_id))

        return await run_concurrently(call, concurrency=CLIENTS, total=GRPC_CALLS)


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def watch_load(address: str, staff: str) -> dict[str, Any]:
    """WATCHERS subscribers; WATCH_RATE odds changes/s; latency from the UpdateOdds call start."""
    auth = (("authorization", f"Bearer {staff}"),)
    sent_at: dict[tuple[str, str], float] = {}
    latencies: list[float] = []
    problems: list[str] = []
    received = [0] * WATCHERS
    total = int(WATCH_RATE * WATCH_SECONDS)
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    ready = asyncio.Event()
    ready_count = 0

    async def subscriber(index: int) -> None:
        nonlocal ready_count
        stub = pb_grpc.LineProviderStub(channels[index % len(channels)])
        stream = stub.WatchEvents(pb.WatchEventsRequest())
        cursor = None
        async for item in stream:
            if item.HasField("snapshot_end"):
                cursor = item.snapshot_end.sequence
                ready_count += 1
                if ready_count == WATCHERS:
                    ready.set()
            elif item.HasField("change"):
                change = item.change
                if cursor is not None and change.sequence != cursor + 1:
                    problems.append(f"subscriber {index}: {cursor} -> {change.sequence}")
                cursor = change.sequence
                key = (change.event.id, change.event.coefficient)
                if key in sent_at:
                    latencies.append(time.perf_counter() - sent_at[key])
                received[index] += 1
                if received[index] >= total:
                    stream.cancel()
                    return

    subscribers = [asyncio.create_task(subscriber(i)) for i in range(WATCHERS)]
    await asyncio.wait_for(ready.wait(), 60)
    writer = pb_grpc.LineProviderStub(channels[0])

    async def change(index: int) -> None:
        event_id = f"open-{index % 20}"
        coefficient = f"{2 + index // 20}.{index % 100:02d}"
        sent_at[(event_id, coefficient)] = time.perf_counter()
        await writer.UpdateOdds(
            pb.UpdateOddsRequest(id=event_id, coefficient=coefficient), metadata=auth
        )

    writes = await run_at_rate(change, rate=WATCH_RATE, seconds=WATCH_SECONDS)
    _, pending = await asyncio.wait(subscribers, timeout=30)
    for task in pending:
        task.cancel()
    for channel in channels:
        await channel.close(None)
    return {
        "writes": writes,
        "latencies": latencies,
        "problems": problems,
        "missing": sum(max(0, total - count) for count in received),
        "expected": total * WATCHERS,
    }


# --- settlement -------------------------------------------------------------------------------


def bulk_pending_bets(event_id: str, count: int, user_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "insert into betting_bet (user_id, event_id, amount, coefficient, potential_payout,"
            " status, payout, created_at, settled_at)"
            " select %s, %s, 10.00, 1.90, 19.00, 'pending', null, now(), null"
            " from generate_series(1, %s)",
            [user_id, event_id, count],
        )
        cursor.execute("analyze betting_bet")


def pending(event_id: str) -> int:
    return Bet.objects.filter(event_id=event_id, status=BetStatus.PENDING).count()


async def settle_via_worker(address: str, staff: str, event_id: str) -> float:
    auth = (("authorization", f"Bearer {staff}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LineProviderStub(channel)
        await stub.FinishEvent(
            pb.FinishEventRequest(id=event_id, outcome=pb.OUTCOME_WIN), metadata=auth
        )
    returned = time.perf_counter()
    deadline = returned + 120
    while time.perf_counter() < deadline:
        if await asyncio.to_thread(pending, event_id) == 0:
            return time.perf_counter() - returned
        await asyncio.sleep(0.02)
    raise RuntimeError("settlement did not finish in 120 s")


def raw_update_seconds(event_id: str) -> float:
    with connection.cursor() as cursor:
        started = time.perf_counter()
        cursor.execute(
            "update betting_bet set status = 'won', payout = potential_payout, settled_at = now()"
            " where event_id = %s and status = 'pending'",
            [event_id],
        )
        elapsed = time.perf_counter() - started
        cursor.execute(
            "update betting_bet set status = 'pending', payout = null, settled_at = null"
            " where event_id = %s",
            [event_id],
        )
    with connection.cursor() as cursor:
        cursor.execute("vacuum analyze betting_bet")
    return elapsed


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    if connection.vendor != "postgresql" or not settings.CELERY_BROKER_URL:
        sys.exit("bench/betting.py needs DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL")
    call_command("migrate", verbosity=0)
    report = Report("betting")
    reset()
    tokens, staff = seed()
    report.figure(
        "sizes",
        {
            "server": "granian WSGI, 2 workers (bench.harness.web_server_args)",
            "http_seconds": HTTP_SECONDS,
            "connections": CLIENTS,
            "open_events": OPEN_EVENTS,
            "grpc_calls": GRPC_CALLS,
            "settle_bets": SETTLE_BETS,
            "watchers": WATCHERS,
            "watch_rate": WATCH_RATE,
            "watch_seconds": WATCH_SECONDS,
        },
    )
    quiet = {"LOG_LEVEL": "WARNING"}
    web_env = {
        **quiet,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "DATABASE_POOL": "true",
        "DATABASE_POOL_MAX": "8",
    }
    bare_port, web_port, uncached_port = free_port(), free_port(), free_port()
    with (
        process(web_server_args(bare_port, app="bench.bare_django:wsgi"), env=quiet) as bare,
        process(web_server_args(web_port), env=web_env) as web,
        process(
            web_server_args(uncached_port), env={**web_env, "BETTING_EVENTS_CACHE_SECONDS": "0"}
        ) as uncached,
    ):
        for port in (bare_port, web_port, uncached_port):
            wait_for_port(port)
        http_phases(
            report,
            bare=Server(bare_port, bare.pid),
            web=Server(web_port, web.pid),
            uncached=Server(uncached_port, uncached.pid),
            tokens=tokens,
        )

    grpc_port, bare_grpc_port = free_port(), free_port()
    line_provider = [sys.executable, "manage.py", "run_line_provider", "--port", str(grpc_port)]
    bare_grpc = [sys.executable, "bench/betting.py", "--bare-grpc", str(bare_grpc_port)]
    grpc_env = {**quiet, "DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": web_env["DJANGO_SECRET_KEY"]}
    with (
        process(line_provider, env=grpc_env),
        process(bare_grpc, env=quiet),
        process(celery_worker_args(), env=grpc_env),
    ):
        for port in (grpc_port, bare_grpc_port):
            wait_for_port(port)
        grpc_phases(report, grpc_port=grpc_port, bare_port=bare_grpc_port, staff=staff)
    report.finish()


def grpc_phases(report: Report, *, grpc_port: int, bare_port: int, staff: str) -> None:
    # 3. gRPC GetEvent vs bare server
    asyncio.run(grpc_get_load(f"127.0.0.1:{bare_port}", "bare"))
    bare_stats = asyncio.run(grpc_get_load(f"127.0.0.1:{bare_port}", "bare"))
    get_stats = asyncio.run(grpc_get_load(f"127.0.0.1:{grpc_port}", "open-7"))
    report.compare(
        "grpc_get_cps",
        get_stats.rate,
        bare_stats.rate,
        "calls/s",
        "gRPC GetEvent (concurrency 16)",
    )
    report.compare(
        "grpc_get_p99_ms", get_stats.p99_ms, bare_stats.p99_ms, "ms", "gRPC GetEvent p99"
    )
    report.target("grpc_get_cps", get_stats.rate >= 1500, ">= 1500 calls/s")
    report.target("grpc_get_p99", get_stats.p99_ms <= 20, "p99 <= 20 ms")
    report.check(get_stats.errors == 0, f"{get_stats.errors} failed GetEvent calls")

    # 4. WatchEvents
    watch = asyncio.run(watch_load(f"127.0.0.1:{grpc_port}", staff))
    delivery_p99 = percentile([value * 1000 for value in watch["latencies"]], 99)
    delivery_p50 = percentile([value * 1000 for value in watch["latencies"]], 50)
    report.figure(
        "watch",
        {
            "subscribers": WATCHERS,
            "changes": watch["writes"].count,
            "change_rate": watch["writes"].rate,
            "deliveries": len(watch["latencies"]),
            "expected_deliveries": watch["expected"],
            "delivery_p50_ms": delivery_p50,
            "delivery_p99_ms": delivery_p99,
            "gaps": len(watch["problems"]),
            "missing": watch["missing"],
        },
        f"WatchEvents {WATCHERS} subscribers, {watch['writes'].rate:.1f} changes/s:"
        f" {len(watch['latencies'])}/{watch['expected']} deliveries,"
        f" p50 {delivery_p50:.1f} ms, p99 {delivery_p99:.1f} ms, gaps {len(watch['problems'])}",
    )
    report.target("watch_p99", delivery_p99 <= 100, "delivery p99 <= 100 ms")
    report.check(not watch["problems"], f"gaps/duplicates: {watch['problems'][:5]}")
    report.check(watch["missing"] == 0, f"{watch['missing']} deliveries missing")
    report.check(watch["writes"].errors == 0, f"{watch['writes'].errors} failed UpdateOdds")

    # 5. settlement of SETTLE_BETS pending bets
    services.event_create(
        event_id="settle-bulk",
        name="Bulk settlement",
        coefficient=Decimal("1.90"),
        deadline=deadline_in(1),
        actor_id=None,
        via="bench",
    )
    owner = UserFactory.create(username=f"bulk-{uuid.uuid4().hex[:10]}")
    bulk_pending_bets("settle-bulk", SETTLE_BETS, owner.pk)
    raw = raw_update_seconds("settle-bulk")
    settle = asyncio.run(settle_via_worker(f"127.0.0.1:{grpc_port}", staff, "settle-bulk"))
    report.compare(
        "settle_seconds", settle, raw, "s", f"settle {SETTLE_BETS} bets (FinishEvent→last)"
    )
    report.target("settle_seconds", settle <= 3, "<= 3 s")
    won = Bet.objects.filter(
        event_id="settle-bulk", status=BetStatus.WON, payout=Decimal("19.00")
    ).count()
    report.check(won == SETTLE_BETS, f"{won}/{SETTLE_BETS} bets won with the right payout")
    audits = AuditEntry.objects.filter(subject="bet", subject_id="settle-bulk").count()
    again = services.event_bets_settle(event_id="settle-bulk")
    from betting.tasks import settle_event

    settle_event.delay("settle-bulk")  # a redelivery through the real worker
    time.sleep(2)
    audits_after = AuditEntry.objects.filter(subject="bet", subject_id="settle-bulk").count()
    report.figure(
        "redelivery_rows",
        again,
        f"  redelivered settlement changed {again} rows (audit entries {audits} -> {audits_after})",
    )
    report.check(again == 0 and audits_after == audits == 1, "redelivery changed rows")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-grpc":
        asyncio.run(bare_grpc_serve(int(sys.argv[2])))
    else:
        main()
