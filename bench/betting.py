# ruff: noqa: E402
"""Betting benchmark against the real services (PostgreSQL, Redis, RabbitMQ).

1. POST /api/betting/bet, 16 concurrent clients; baseline: GET /api/auth/me (a trivial
   authenticated view) on the same uvicorn server (BENCH_BETTING_WEB_WORKERS workers).
2. GET /api/betting/events?limit=200 with 200 open events, 16 clients; same baseline.
3. gRPC GetEvent at concurrency 16 against `manage.py run_line_provider`; baseline: a bare
   grpc.aio server returning a constant Event (this file with --bare-grpc), same run.
4. Settle BENCH_BETTING_SETTLE_BETS (100k) pending bets: time from FinishEvent returning to the
   last bet settled by a real Celery worker; baseline: one raw SQL UPDATE of the same rows;
   a redelivered settlement must change 0 rows.
5. WatchEvents: 100 subscribers, 50 odds changes/s: delivery p99 and no gaps/duplicates.

Run: flock /tmp/quintet-bench.lock .venv/bin/python bench/betting.py
"""

import asyncio
import os
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import aiohttp
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
    celery_worker_args,
    free_port,
    percentile,
    process,
    run_at_rate,
    run_concurrently,
    wait_for_port,
)
from betting import services
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Bet, BetStatus
from tests.factories import StaffFactory, UserFactory, token_for

WEB_WORKERS = int(os.environ.get("BENCH_BETTING_WEB_WORKERS", "2"))
BETS = int(os.environ.get("BENCH_BETTING_BETS", "4000"))
EVENT_GETS = int(os.environ.get("BENCH_BETTING_EVENT_GETS", "4000"))
GRPC_CALLS = int(os.environ.get("BENCH_BETTING_GRPC_CALLS", "10000"))
SETTLE_BETS = int(os.environ.get("BENCH_BETTING_SETTLE_BETS", "100000"))
WATCHERS = int(os.environ.get("BENCH_BETTING_WATCHERS", "100"))
WATCH_RATE = float(os.environ.get("BENCH_BETTING_WATCH_RATE", "50"))
WATCH_SECONDS = float(os.environ.get("BENCH_BETTING_WATCH_SECONDS", "10"))
OPEN_EVENTS = 200
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


# --- HTTP -------------------------------------------------------------------------------------


async def http_load(
    port: int, tokens: list[str], total: int, method: str, path: str, body: Any = None
) -> Any:
    sessions = [
        aiohttp.ClientSession(
            f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Token {token}"},
            connector=aiohttp.TCPConnector(limit=1),
        )
        for token in tokens
    ]
    statuses: dict[int, int] = {}
    try:

        async def call(index: int) -> None:
            session = sessions[index % len(sessions)]
            payload = body(index) if callable(body) else body
            async with session.request(method, path, json=payload) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status >= 400:
                    raise RuntimeError(f"HTTP {response.status}")

        stats = await run_concurrently(call, concurrency=CLIENTS, total=total)
    finally:
        for session in sessions:
            await session.close()
    return stats, statuses


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
            "web_workers": WEB_WORKERS,
            "bets": BETS,
            "event_gets": EVENT_GETS,
            "grpc_calls": GRPC_CALLS,
            "settle_bets": SETTLE_BETS,
            "watchers": WATCHERS,
            "watch_rate": WATCH_RATE,
            "watch_seconds": WATCH_SECONDS,
            "clients": CLIENTS,
        },
    )
    web_port, grpc_port, bare_port = free_port(), free_port(), free_port()
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
    web = [
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--port",
        str(web_port),
        "--workers",
        str(WEB_WORKERS),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    line_provider = [sys.executable, "manage.py", "run_line_provider", "--port", str(grpc_port)]
    bare = [sys.executable, "bench/betting.py", "--bare-grpc", str(bare_port)]
    worker = celery_worker_args()
    grpc_env = {**quiet, "DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": web_env["DJANGO_SECRET_KEY"]}
    with (
        process(web, env=web_env),
        process(line_provider, env=grpc_env),
        process(bare, env=quiet),
        process(worker, env=grpc_env),
    ):
        for port in (web_port, grpc_port, bare_port):
            wait_for_port(port)

        # 1. bets vs trivial authenticated view
        asyncio.run(http_load(web_port, tokens, 200, "GET", "/api/auth/me"))
        me, _ = asyncio.run(http_load(web_port, tokens, BETS, "GET", "/api/auth/me"))
        bets, bet_statuses = asyncio.run(
            http_load(
                web_port,
                tokens,
                BETS,
                "POST",
                "/api/betting/bet",
                body=lambda i: {"event_id": f"open-{i % OPEN_EVENTS}", "amount": "10.00"},
            )
        )
        report.compare("bet_rps", bets.rate, me.rate, "req/s", "POST /bet throughput (16 clients)")
        report.compare("bet_p99_ms", bets.p99_ms, me.p99_ms, "ms", "POST /bet p99")
        report.figure(
            "bet_p50_ms",
            bets.p50_ms,
            f"  POST /bet p50 {bets.p50_ms:.1f} ms; statuses {bet_statuses}",
        )
        report.target("bet_rps", bets.rate >= 400, ">= 400 bets/s")
        report.target("bet_p99", bets.p99_ms <= 60, "p99 <= 60 ms")
        report.check(bets.errors == 0, f"{bets.errors} failed bet placements")
        stored = Bet.objects.count()
        report.check(stored == bets.count, f"{stored} bets stored, {bets.count} accepted")

        # 2. GET events
        events, _ = asyncio.run(
            http_load(
                web_port, tokens, EVENT_GETS, "GET", f"/api/betting/events?limit={OPEN_EVENTS}"
            )
        )
        report.compare(
            "events_rps", events.rate, me.rate, "req/s", "GET /events (200 open) throughput"
        )
        report.compare("events_p99_ms", events.p99_ms, me.p99_ms, "ms", "GET /events p99")
        report.target("events_rps", events.rate >= 1000, ">= 1000 req/s")
        report.check(events.errors == 0, f"{events.errors} failed GET /events")

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
            f"  redelivered settlement changed {again} rows"
            f" (audit entries {audits} -> {audits_after})",
        )
        report.check(again == 0 and audits_after == audits == 1, "redelivery changed rows")
    report.finish()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-grpc":
        asyncio.run(bare_grpc_serve(int(sys.argv[2])))
    else:
        main()
