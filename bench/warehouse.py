"""warehouse: drain pre-loaded movement messages from RabbitMQ into PostgreSQL with one
consumer process, against a set-based SQL batch insert of the same rows; then stock GET latency
at a fixed rate while ingesting, and a stepped load curve (PNG chart).

Needs DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (RabbitMQ); REDIS_URL is used for the cache
when set. Sizes: BENCH_WAREHOUSE_WAREHOUSES x BENCH_WAREHOUSE_PRODUCTS pairs get initial stock
(one arrival each), then movements (two messages each) up to BENCH_WAREHOUSE_MESSAGES in total.
"""

import asyncio
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import aiohttp
import django

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import close_old_connections, connection  # noqa: E402

from bench.harness import (  # noqa: E402
    LatencyStats,
    Report,
    chart,
    free_port,
    process,
    run_at_rate,
    wait_for_port,
)
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock  # noqa: E402
from warehouse.queue import connection_open, envelopes_publish, movement_queue  # noqa: E402
from warehouse.schemas import envelope_parse  # noqa: E402
from warehouse.selectors import stock_mismatches  # noqa: E402
from warehouse.simulator import Simulation  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_WAREHOUSE_MESSAGES", "100000"))
WAREHOUSES = int(os.environ.get("BENCH_WAREHOUSE_WAREHOUSES", "50"))
PRODUCTS = int(os.environ.get("BENCH_WAREHOUSE_PRODUCTS", "1000"))
READ_RATE = float(os.environ.get("BENCH_WAREHOUSE_READ_RATE", "500"))
INGEST_RATE = float(os.environ.get("BENCH_WAREHOUSE_INGEST_RATE", "2000"))
LOAD_SECONDS = float(os.environ.get("BENCH_WAREHOUSE_LOAD_SECONDS", "12"))
STEP_SECONDS = float(os.environ.get("BENCH_WAREHOUSE_STEP_SECONDS", "5"))
STEPS = [100.0, 250.0, 500.0, 1000.0, 1500.0, 2000.0]
WEB_WORKERS = int(os.environ.get("BENCH_WAREHOUSE_WEB_WORKERS", "2"))
DRAIN_LIMIT_SECONDS = 240.0
QUEUE = "warehouse.bench"
LIVE_QUEUE = "warehouse.bench.live"
ROOT = Path(__file__).resolve().parent.parent


def _reset_tables() -> None:
    tables = [m._meta.db_table for m in (LedgerEntry, Stock, DeadLetter, ConsumerHeartbeat)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)}")
        cursor.execute("DROP TABLE IF EXISTS bench_wh_ledger, bench_wh_stock")


def _purge(queue_name: str) -> None:
    with connection_open() as conn:
        bound = movement_queue(queue_name)(conn.channel())
        bound.declare()
        bound.purge()


def _queue_depth(queue_name: str) -> int:
    with connection_open() as conn:
        declared = movement_queue(queue_name)(conn.channel()).queue_declare(passive=True)
        return int(declared.message_count)


def _consumer_command(queue_name: str) -> list[str]:
    return [sys.executable, "manage.py", "run_warehouse_consumer", "--queue", queue_name]


def _count_ledger() -> int:
    close_old_connections()
    return LedgerEntry.objects.count()


def _wait_consumer_ready(limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not ConsumerHeartbeat.objects.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("consumer did not start")
        time.sleep(0.05)


def drain(report: Report, bodies: list[bytes]) -> float:
    _purge(QUEUE)
    started = time.perf_counter()
    envelopes_publish(bodies, queue_name=QUEUE)
    publish_seconds = time.perf_counter() - started
    report.figure(
        "preload_publish_rate",
        len(bodies) / publish_seconds,
        f"pre-loaded {len(bodies):,} messages into RabbitMQ in {publish_seconds:.1f} s",
    )
    env = {"WAREHOUSE_HEARTBEAT_SECONDS": "0.5", "LOG_LEVEL": "WARNING"}
    with process(_consumer_command(QUEUE), env=env):
        _wait_consumer_ready()
        began = time.perf_counter()
        deadline = time.monotonic() + DRAIN_LIMIT_SECONDS
        while (stored := _count_ledger()) < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.1)
        seconds = time.perf_counter() - began
    report.check(stored == len(bodies), f"stored {stored} of {len(bodies)} messages")
    duplicates = sum(LedgerEntry.objects.values_list("duplicates", flat=True))
    report.check(duplicates == 0, f"{duplicates} unexpected duplicates")
    report.check(DeadLetter.objects.count() == 0, "unexpected dead letters")
    report.check(stock_mismatches() == [], "stock != sum(ledger) after the drain")
    return stored / seconds


def baseline(bodies: list[bytes]) -> float:
    """The same rows through plain set-based SQL: one multi-row INSERT of the ledger rows and one
    aggregated stock upsert per 1,000 rows, one transaction each (no queue, no ORM, no dedup)."""
    envelopes = [envelope_parse(body) for body in bodies]
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_wh_ledger (LIKE warehouse_ledgerentry INCLUDING ALL)")
        cursor.execute("CREATE TABLE bench_wh_stock (LIKE warehouse_stock INCLUDING ALL)")
    started = time.perf_counter()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for offset in range(0, len(envelopes), 1000):
        chunk = envelopes[offset : offset + 1000]
        rows: list[Any] = []
        deltas: dict[tuple[uuid.UUID, uuid.UUID], int] = {}
        for env in chunk:
            rows += [
                env.movement_id,
                env.event,
                env.warehouse_id,
                env.product_id,
                env.quantity,
                env.delta,
                env.timestamp,
                env.source,
                env.id,
                env.time,
                env.fingerprint,
                0,
                now,
                "",
            ]
            pair = (env.warehouse_id, env.product_id)
            deltas[pair] = deltas.get(pair, 0) + env.delta
        values = ", ".join(["(" + ", ".join(["%s"] * 14) + ")"] * len(chunk))
        stock_rows: list[Any] = []
        for (w, p), delta in sorted(deltas.items()):
            stock_rows += [w, p, delta, now]
        stock_values = ", ".join(["(%s, %s, %s, %s)"] * len(deltas))
        with connection.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "INSERT INTO bench_wh_ledger (movement_id, event, warehouse_id, product_id, "
                "quantity, delta, occurred_at, source, envelope_id, sent_at, fingerprint, "
                f"duplicates, recorded_at, message_key) VALUES {values}",
                rows,
            )
            cursor.execute(
                "INSERT INTO bench_wh_stock (warehouse_id, product_id, balance, updated_at) "
                f"VALUES {stock_values} ON CONFLICT (warehouse_id, product_id) DO UPDATE SET "
                "balance = bench_wh_stock.balance + excluded.balance",
                stock_rows,
            )
            cursor.execute("COMMIT")
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_wh_ledger, bench_wh_stock")
    return len(envelopes) / seconds


async def read_load(
    port: int, pairs: list[tuple[str, str]], rate: float, seconds: float
) -> LatencyStats:
    rng = random.Random(7)
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", connector=connector, timeout=timeout
    ) as client:

        async def call(_: int) -> None:
            warehouse_id, product_id = rng.choice(pairs)
            async with client.get(f"/api/warehouses/{warehouse_id}/products/{product_id}") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")

        return await run_at_rate(call, rate=rate, seconds=seconds)


def main() -> None:
    if connection.vendor != "postgresql" or not settings.CELERY_BROKER_URL:
        sys.exit("bench/warehouse.py needs DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL")
    call_command("migrate", verbosity=0)
    report = Report("warehouse")
    _reset_tables()

    pairs_count = WAREHOUSES * PRODUCTS
    movements = max(1, (MESSAGES - pairs_count) // 2)
    simulation = Simulation(
        seed=42,
        warehouses=WAREHOUSES,
        products=PRODUCTS,
        movements=movements,
        initial_stock=1000,
    )
    bodies = simulation.initial_bodies() + simulation.movement_bodies()
    report.figure(
        "sizes",
        {
            "messages": len(bodies),
            "warehouses": WAREHOUSES,
            "products": PRODUCTS,
            "initial_stock_messages": pairs_count,
            "movements": movements,
            "batch_size": settings.WAREHOUSE_BATCH_SIZE,
            "prefetch": settings.WAREHOUSE_PREFETCH,
            "linger_ms": settings.WAREHOUSE_LINGER_MS,
            "web_workers": WEB_WORKERS,
        },
        f"sizes: {len(bodies):,} messages = {pairs_count:,} initial-stock arrivals "
        f"({WAREHOUSES} warehouses x {PRODUCTS} products) + {movements:,} movements x 2; "
        f"batch {settings.WAREHOUSE_BATCH_SIZE}, prefetch {settings.WAREHOUSE_PREFETCH}, "
        f"linger {settings.WAREHOUSE_LINGER_MS} ms",
    )

    consumer_rate = drain(report, bodies)
    baseline_rate = baseline(bodies)
    report.compare(
        "drain_rate",
        consumer_rate,
        baseline_rate,
        "msg/s",
        "consumer drain RabbitMQ -> PostgreSQL (vs set-based SQL insert)",
    )
    report.target("drain_rate", consumer_rate >= 5000, ">= 5,000 msg/s (stretch 10,000)")

    pairs = [(str(w), str(p)) for w in simulation.warehouse_ids for p in simulation.product_ids]
    _purge(LIVE_QUEUE)
    live_movements = int(INGEST_RATE * (LOAD_SECONDS + 3) / 2)
    # The live producer is the produce command in its own process (same seed => same warehouse
    # and product ids, fresh movement ids), so it does not share a GIL with the HTTP client.
    live_producer = [
        sys.executable,
        "manage.py",
        "warehouse_produce",
        "--seed",
        "42",
        "--movement-seed",
        "1",
        "--skip-initial",
        "--warehouses",
        str(WAREHOUSES),
        "--products",
        str(PRODUCTS),
        "--movements",
        str(live_movements),
        "--rate",
        str(INGEST_RATE),
        "--queue",
        LIVE_QUEUE,
    ]

    port = free_port()
    web_env = {
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "LOG_LEVEL": "WARNING",
        # Each uvicorn worker would otherwise keep one connection per thread-pool thread.
        "DATABASE_POOL": "true",
        "DATABASE_POOL_MAX": "8",
    }
    web = [
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--port",
        str(port),
        "--workers",
        str(WEB_WORKERS),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with (
        process(web, env=web_env),
        process(_consumer_command(LIVE_QUEUE), env={"LOG_LEVEL": "WARNING"}),
    ):
        wait_for_port(port)
        asyncio.run(read_load(port, pairs, 100, 2))  # warm both workers' connections
        with process(live_producer, env={"LOG_LEVEL": "WARNING"}):
            time.sleep(2.5)
            ingest_began, stored_began = time.perf_counter(), _count_ledger()
            stats = asyncio.run(read_load(port, pairs, READ_RATE, LOAD_SECONDS))
            ingested = (_count_ledger() - stored_began) / (time.perf_counter() - ingest_began)
        report.figure(
            "stock_get_under_ingest",
            {
                "offered": READ_RATE,
                "achieved": stats.rate,
                "p50_ms": stats.p50_ms,
                "p99_ms": stats.p99_ms,
                "errors": stats.errors,
                "ingest_msg_s": ingested,
            },
            f"stock GET at {READ_RATE:.0f} req/s while ingesting {ingested:,.0f} msg/s: "
            f"p50 {stats.p50_ms:.1f} ms, p99 {stats.p99_ms:.1f} ms, "
            f"achieved {stats.rate:.0f} req/s, errors {stats.errors}",
        )
        report.target("stock_get_p99", stats.p99_ms <= 25, "stock GET p99 <= 25 ms at 500 req/s")
        report.check(stats.errors == 0, f"{stats.errors} failed stock GETs under ingest")
        deadline = time.monotonic() + 60
        while _queue_depth(LIVE_QUEUE) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # the last batch commits before its ack empties the queue
        report.check(_queue_depth(LIVE_QUEUE) == 0, "live ingest did not drain in 60 s")
        report.check(DeadLetter.objects.count() == 0, "dead letters during the live ingest")

        achieved, p50, p99 = [], [], []
        for rate in STEPS:
            step = asyncio.run(read_load(port, pairs, rate, STEP_SECONDS))
            achieved.append(step.rate)
            p50.append(step.p50_ms)
            p99.append(step.p99_ms)
            print(
                f"  step {rate:>6.0f} req/s offered: achieved {step.rate:7.0f} req/s, "
                f"p50 {step.p50_ms:7.1f} ms, p99 {step.p99_ms:7.1f} ms, errors {step.errors}",
                flush=True,
            )
        report.figure(
            "steps",
            [
                {"offered": o, "achieved": a, "p50_ms": m, "p99_ms": n}
                for o, a, m, n in zip(STEPS, achieved, p50, p99, strict=True)
            ],
        )
        print(f"chart: {chart('warehouse', STEPS, achieved, p50, p99).relative_to(ROOT)}")
    report.check(stock_mismatches() == [], "stock != sum(ledger) at the end")
    report.finish()


if __name__ == "__main__":
    main()
