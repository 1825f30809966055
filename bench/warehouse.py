"""warehouse: drain pre-loaded movement messages from RabbitMQ into PostgreSQL with one consumer
process, against the fastest correct SQL for the same rows; then stock GET latency at a paced
1,000 req/s while ingesting, against a bare Django view; then a stepped load curve (PNG chart).

1. Drain: BENCH_WAREHOUSE_MESSAGES spec-exact messages (an initial-stock arrival for each of
   WAREHOUSES x PRODUCTS pairs, then movements of two messages) are published, then one
   `run_warehouse_consumer` process drains them. Printed: msg/s, and the CPU time per message
   of the consumer process and of the PostgreSQL backends serving it (from /proc).
2. Baseline: the same rows, already parsed, in batches of WAREHOUSE_BATCH_SIZE, one transaction
   each: binary COPY into a temporary staging table, one INSERT ... SELECT into a ledger copy
   with the dedupe (ON CONFLICT on the idempotency key DO NOTHING) and one stock upsert of the
   summed deltas of the inserted rows. No queue, no validation: the floor the consumer's SQL
   path can reach. Printed with the consumer's ratio to it.
3. Stock GET while ingesting: the production HTTP server (`bench.harness.web_server_args`,
   granian WSGI) answers random stock GETs paced by wrk (bench/wrk/warehouse_paced.lua:
   16 connections x 62.5 req/s) while a producer publishes BENCH_WAREHOUSE_INGEST_RATE msg/s
   and a consumer ingests them; the baseline is the bare Django view (`bench.bare_django:wsgi`
   /bare) on the same server at the same pace during the same ingest. Printed: achieved rate,
   p50/p99 and server CPU per request, and the p99 ratio.
4. Stepped load on the stock GET (no ingest): throughput and p50/p99 against offered load.

Needs PostgreSQL, RabbitMQ and Redis (defaults: this session's resources; override with
DATABASE_URL, CELERY_BROKER_URL, REDIS_URL). Run under `flock /tmp/quintet-bench.lock`.
BENCH_WAREHOUSE_PARTS=drain runs parts 1 and 2 only (into bench/results/warehouse-drain.json).
"""

import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quintet_h2")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/12")
os.environ.setdefault("CACHE_KEY_PREFIX", "h2")
os.environ.setdefault("CHANNEL_LAYER_PREFIX", "h2")
os.environ.setdefault("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/h_h2")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import close_old_connections, connection, transaction  # noqa: E402

from bench.harness import (  # noqa: E402
    Report,
    WrkResult,
    chart,
    cpu_seconds,
    free_port,
    process,
    wait_for_port,
    web_server_args,
    wrk,
)
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock  # noqa: E402
from warehouse.queue import connection_open, envelopes_publish, movement_queue  # noqa: E402
from warehouse.schemas import envelope_parse  # noqa: E402
from warehouse.selectors import stock_mismatches  # noqa: E402
from warehouse.simulator import Simulation  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_WAREHOUSE_MESSAGES", "100000"))
WAREHOUSES = int(os.environ.get("BENCH_WAREHOUSE_WAREHOUSES", "50"))
PRODUCTS = int(os.environ.get("BENCH_WAREHOUSE_PRODUCTS", "1000"))
READ_RATE = float(os.environ.get("BENCH_WAREHOUSE_READ_RATE", "1000"))
INGEST_RATE = float(os.environ.get("BENCH_WAREHOUSE_INGEST_RATE", "2000"))
LOAD_SECONDS = float(os.environ.get("BENCH_WAREHOUSE_LOAD_SECONDS", "12"))
STEP_SECONDS = float(os.environ.get("BENCH_WAREHOUSE_STEP_SECONDS", "5"))
STEPS = [100.0, 250.0, 500.0, 1000.0, 1500.0, 2000.0]
WEB_WORKERS = int(os.environ.get("BENCH_WAREHOUSE_WEB_WORKERS", "2"))
# "drain" runs parts 1-2 only (saved as bench/results/warehouse-drain.json, so a partial run
# never replaces the full report).
PARTS = set(os.environ.get("BENCH_WAREHOUSE_PARTS", "drain,reads").split(","))
CONNECTIONS, THREADS = 16, 2
DRAIN_LIMIT_SECONDS = 240.0
QUEUE = "warehouse.bench"
LIVE_QUEUE = "warehouse.bench.live"
ROOT = Path(__file__).resolve().parent.parent
LEDGER_COLUMNS = (
    ("movement_id", "uuid"),
    ("event", "text"),
    ("warehouse_id", "uuid"),
    ("product_id", "uuid"),
    ("quantity", "integer"),
    ("delta", "bigint"),
    ("occurred_at", "timestamptz"),
    ("source", "text"),
    ("envelope_id", "uuid"),
    ("sent_at", "timestamptz"),
    ("fingerprint", "text"),
    ("duplicates", "integer"),
    ("recorded_at", "timestamptz"),
    ("message_key", "text"),
)


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


def _database_backend_pids() -> list[int]:
    """PostgreSQL backends of this database other than this process's own (the consumer's)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return [row[0] for row in cursor.fetchall()]


def _own_backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


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
    with process(_consumer_command(QUEUE), env=env) as consumer:
        _wait_consumer_ready()
        backends = _database_backend_pids()
        cpu_before = cpu_seconds(consumer.pid), sum(cpu_seconds(pid) for pid in backends)
        began = time.perf_counter()
        deadline = time.monotonic() + DRAIN_LIMIT_SECONDS
        while (stored := _count_ledger()) < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = time.perf_counter() - began
        consumer_cpu = cpu_seconds(consumer.pid) - cpu_before[0]
        database_cpu = sum(cpu_seconds(pid) for pid in backends) - cpu_before[1]
    report.figure(
        "drain_cpu_us_per_message",
        {"consumer": consumer_cpu / stored * 1e6, "postgresql": database_cpu / stored * 1e6},
        f"drain CPU per message: consumer process {consumer_cpu / stored * 1e6:.1f} us, "
        f"PostgreSQL backends {database_cpu / stored * 1e6:.1f} us",
    )
    report.check(stored == len(bodies), f"stored {stored} of {len(bodies)} messages")
    duplicates = sum(LedgerEntry.objects.values_list("duplicates", flat=True))
    report.check(duplicates == 0, f"{duplicates} unexpected duplicates")
    report.check(DeadLetter.objects.count() == 0, "unexpected dead letters")
    report.check(stock_mismatches() == [], "stock != sum(ledger) after the drain")
    return stored / seconds


def baseline(report: Report, bodies: list[bytes], batch: int) -> float:
    """The same rows through the fastest correct SQL (see the module docstring, step 2)."""
    import psycopg

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for body in bodies:
        env = envelope_parse(body)
        rows.append(
            (
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
                env.time,
                uuid.uuid4().hex,
            )
        )
    names = ", ".join(name for name, _ in LEDGER_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_wh_ledger (LIKE warehouse_ledgerentry INCLUDING ALL)")
        cursor.execute("CREATE TABLE bench_wh_stock (LIKE warehouse_stock INCLUDING ALL)")
        columns = ", ".join(f"{name} {kind}" for name, kind in LEDGER_COLUMNS)
        cursor.execute(f"CREATE TEMP TABLE bench_wh_stage ({columns}) ON COMMIT DELETE ROWS")
    backend = _own_backend_pid()
    cpu_before = time.process_time(), cpu_seconds(backend)
    started = time.perf_counter()
    for offset in range(0, len(rows), batch):
        with transaction.atomic(), psycopg.Cursor(connection.connection) as cursor:
            with cursor.copy(f"COPY bench_wh_stage ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([kind for _, kind in LEDGER_COLUMNS])
                for row in rows[offset : offset + batch]:
                    copy.write_row(row)
            cursor.execute(
                f"WITH inserted AS (INSERT INTO bench_wh_ledger ({names}) "
                f"SELECT {names} FROM bench_wh_stage "
                "ON CONFLICT (movement_id, event) DO NOTHING "
                "RETURNING warehouse_id, product_id, delta) "
                "INSERT INTO bench_wh_stock (warehouse_id, product_id, balance, updated_at) "
                "SELECT warehouse_id, product_id, sum(delta), %s FROM inserted "
                "GROUP BY warehouse_id, product_id ORDER BY warehouse_id, product_id "
                "ON CONFLICT (warehouse_id, product_id) DO UPDATE SET "
                "balance = bench_wh_stock.balance + excluded.balance, "
                "updated_at = excluded.updated_at",
                [now],
            )
    seconds = time.perf_counter() - started
    python_cpu = time.process_time() - cpu_before[0]
    database_cpu = cpu_seconds(backend) - cpu_before[1]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM bench_wh_ledger), "
            "(SELECT sum(delta) FROM bench_wh_ledger) = (SELECT sum(balance) FROM bench_wh_stock)"
        )
        count, balanced = cursor.fetchone()
        cursor.execute("DROP TABLE bench_wh_ledger, bench_wh_stock, bench_wh_stage")
    report.check(count == len(rows) and balanced, "baseline: ledger or stock wrong")
    report.figure(
        "baseline_cpu_us_per_message",
        {"python": python_cpu / len(rows) * 1e6, "postgresql": database_cpu / len(rows) * 1e6},
        f"baseline CPU per row: Python (COPY) {python_cpu / len(rows) * 1e6:.1f} us, "
        f"PostgreSQL backend {database_cpu / len(rows) * 1e6:.1f} us",
    )
    return len(rows) / seconds


def _paced(
    url: str, paths: Path, rate: float, seconds: float, pids: list[int], connections: int
) -> WrkResult:
    """wrk at a paced `rate` (bench/wrk/warehouse_paced.lua), `connections` connections."""
    return wrk(
        url,
        server_pids=pids,
        seconds=seconds,
        connections=connections,
        threads=THREADS,
        script="warehouse_paced.lua",
        script_env={
            "WH_PATHS": str(paths),
            "WH_RATE_PER_CONNECTION": str(rate / connections),
            "WH_CONNECTIONS_PER_THREAD": str(connections // THREADS),
        },
    )


def _live_producer(movements: int) -> list[str]:
    # The produce command in its own process (same seed => same warehouse and product ids,
    # fresh movement ids).
    return [
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
        str(movements),
        "--rate",
        str(INGEST_RATE),
        "--queue",
        LIVE_QUEUE,
    ]


def reads_under_ingest(report: Report, simulation: Simulation) -> None:
    pairs = [(w, p) for w in simulation.warehouse_ids for p in simulation.product_ids]
    stock_paths = ROOT / "var" / f"bench-warehouse-paths-{os.getpid()}.txt"
    sample = pairs[:: max(1, len(pairs) // 20000)]
    stock_paths.write_text("".join(f"/api/warehouses/{w}/products/{p}\n" for w, p in sample))
    bare_paths = ROOT / "var" / f"bench-warehouse-bare-{os.getpid()}.txt"
    bare_paths.write_text("/bare\n")
    _purge(LIVE_QUEUE)
    web_env = {
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "LOG_LEVEL": "WARNING",
        "DATABASE_POOL": "true",
        "DATABASE_POOL_MAX": "8",
    }
    port, bare_port = free_port(), free_port()
    live_movements = int(INGEST_RATE * (2 * LOAD_SECONDS + 8) / 2)
    bare_args = web_server_args(bare_port, workers=WEB_WORKERS, app="bench.bare_django:wsgi")
    try:
        with (
            process(web_server_args(port, workers=WEB_WORKERS), env=web_env) as web,
            process(bare_args, env=web_env) as bare,
            process(_consumer_command(LIVE_QUEUE), env={"LOG_LEVEL": "WARNING"}),
        ):
            wait_for_port(port)
            wait_for_port(bare_port)
            url, bare_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
            _paced(url, stock_paths, 200, 2, [web.pid], CONNECTIONS)  # warm connections, cache
            with process(_live_producer(live_movements), env={"LOG_LEVEL": "WARNING"}):
                time.sleep(2.5)
                began, stored_before = time.perf_counter(), _count_ledger()
                stock = _paced(url, stock_paths, READ_RATE, LOAD_SECONDS, [web.pid], CONNECTIONS)
                ingested = (_count_ledger() - stored_before) / (time.perf_counter() - began)
                base = _paced(
                    bare_url, bare_paths, READ_RATE, LOAD_SECONDS, [bare.pid], CONNECTIONS
                )
            print(base.line("baseline: bare Django view /bare, same pace"), flush=True)
            print(stock.line(f"stock GET while ingesting {ingested:,.0f} msg/s"), flush=True)
            report.compare(
                "stock_get_p99", stock.p99_ms, base.p99_ms, "ms", "stock GET p99 vs bare /bare p99"
            )
            report.figure(
                "stock_get_under_ingest",
                {
                    "offered": READ_RATE,
                    "achieved": stock.rate,
                    "p50_ms": stock.p50_ms,
                    "p99_ms": stock.p99_ms,
                    "cpu_ms_per_request": stock.server_cpu_ms_per_request,
                    "non_2xx": stock.non_2xx,
                    "ingest_msg_s": ingested,
                    "bare": {
                        "achieved": base.rate,
                        "p50_ms": base.p50_ms,
                        "p99_ms": base.p99_ms,
                        "cpu_ms_per_request": base.server_cpu_ms_per_request,
                    },
                },
            )
            report.target(
                "stock_get_p99",
                stock.p99_ms <= 25 and stock.rate >= 0.95 * READ_RATE,
                f"stock GET p99 <= 25 ms at {READ_RATE:,.0f} req/s while ingesting",
            )
            report.check(stock.non_2xx == 0 and base.non_2xx == 0, "failed GETs under ingest")
            deadline = time.monotonic() + 60
            while _queue_depth(LIVE_QUEUE) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # the last batch commits before its ack empties the queue
            report.check(_queue_depth(LIVE_QUEUE) == 0, "live ingest did not drain in 60 s")
            report.check(DeadLetter.objects.count() == 0, "dead letters during the live ingest")

            achieved, p50, p99 = [], [], []
            for rate in STEPS:
                step = _paced(url, stock_paths, rate, STEP_SECONDS, [web.pid], CONNECTIONS)
                achieved.append(step.rate)
                p50.append(step.p50_ms)
                p99.append(step.p99_ms)
                print(step.line(f"  step {rate:>6.0f} req/s offered"), flush=True)
            report.figure(
                "steps",
                [
                    {"offered": o, "achieved": a, "p50_ms": m, "p99_ms": n}
                    for o, a, m, n in zip(STEPS, achieved, p50, p99, strict=True)
                ],
            )
            print(f"chart: {chart('warehouse', STEPS, achieved, p50, p99).relative_to(ROOT)}")
    finally:
        stock_paths.unlink(missing_ok=True)
        bare_paths.unlink(missing_ok=True)


def main() -> None:
    if connection.vendor != "postgresql" or not settings.CELERY_BROKER_URL:
        sys.exit("bench/warehouse.py needs DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL")
    call_command("migrate", verbosity=0)
    report = Report("warehouse" if "reads" in PARTS else "warehouse-drain")
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
    batch = settings.WAREHOUSE_BATCH_SIZE
    report.figure(
        "sizes",
        {
            "messages": len(bodies),
            "warehouses": WAREHOUSES,
            "products": PRODUCTS,
            "initial_stock_messages": pairs_count,
            "movements": movements,
            "batch_size": batch,
            "prefetch": settings.WAREHOUSE_PREFETCH,
            "linger_ms": settings.WAREHOUSE_LINGER_MS,
            "web_workers": WEB_WORKERS,
        },
        f"sizes: {len(bodies):,} messages = {pairs_count:,} initial-stock arrivals "
        f"({WAREHOUSES} warehouses x {PRODUCTS} products) + {movements:,} movements x 2; "
        f"batch {batch}, prefetch {settings.WAREHOUSE_PREFETCH}, "
        f"linger {settings.WAREHOUSE_LINGER_MS} ms",
    )

    consumer_rate = drain(report, bodies)
    baseline_rate = baseline(report, bodies, batch)
    report.compare(
        "drain_rate",
        consumer_rate,
        baseline_rate,
        "msg/s",
        "consumer drain RabbitMQ -> PostgreSQL (vs COPY + INSERT ... SELECT baseline)",
    )
    report.target("drain_rate", consumer_rate >= 10_000, "drain >= 10,000 msg/s")
    if "reads" in PARTS:
        reads_under_ingest(report, simulation)
    report.check(stock_mismatches() == [], "stock != sum(ledger) at the end")
    report.finish()


if __name__ == "__main__":
    main()
