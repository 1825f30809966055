# ruff: noqa: E402
"""The production HTTP server, chosen by measurement (issue 14): the same Django project under
uvicorn (ASGI, the old path), gunicorn gthread (threaded WSGI), granian WSGI and granian ASGI,
two workers each, side by side in one run, driven by `wrk` (16 connections) from a separate
process, against the real services (PostgreSQL, Redis).

For each server: a bare Django view (`bench/bare_django.py`, no middleware: the baseline every
figure is divided by), `GET /health` (the whole middleware stack, no dependency) and
`GET /api/auth/me` (token auth, throttling, metrics, one indexed query): throughput, p50/p99,
the server's CPU time per request (its process tree, from /proc), and how that CPU split over
the two workers (both cores must be busy: a worker share far from 50 % leaves one idle).

Run: flock /tmp/quintet-bench.lock .venv/bin/python bench/http_servers.py
(DATABASE_URL must name PostgreSQL, REDIS_URL Redis; BENCH_HTTP_SECONDS per measurement.)
"""

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django

django.setup()

from django.conf import settings

from bench.harness import (
    Report,
    cpu_seconds,
    free_port,
    process,
    wait_for_port,
    web_server_args,
    wrk,
)
from tests.factories import UserFactory, token_for

SECONDS = float(os.environ.get("BENCH_HTTP_SECONDS", "8"))
WARMUP_SECONDS = 2.0
BIN = Path(sys.executable).parent
# Production settings: no DEBUG (so static files and errors take the production path), no SSL
# redirect on plain loopback HTTP.
SERVER_ENV = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-" + "x" * 50),
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "DJANGO_SECURE_COOKIES": "false",
}


def servers(wsgi_app: str, asgi_app: str, port: int) -> dict[str, list[str]]:
    return {
        "uvicorn (ASGI)": [
            str(BIN / "uvicorn"),
            asgi_app,
            "--port",
            str(port),
            "--workers",
            "2",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        "gunicorn gthread (WSGI)": [
            str(BIN / "gunicorn"),
            wsgi_app,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "8",
            "--log-level",
            "warning",
        ],
        "granian (WSGI)": web_server_args(port, app=wsgi_app),
        "granian (ASGI)": web_server_args(port, app=asgi_app, interface="asgi"),
    }


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def measure(
    name: str, apps: tuple[str, str], paths: list[tuple[str, dict[str, str]]]
) -> dict[str, Any]:
    port = free_port()
    command = servers(*apps, port)[name]
    results: dict[str, Any] = {}
    with process(command, env=SERVER_ENV) as server:
        wait_for_port(port)
        time.sleep(1.0)
        workers = children(server.pid)
        for path, headers in paths:
            url = f"http://127.0.0.1:{port}{path}"
            wrk(url, server_pids=[server.pid], seconds=WARMUP_SECONDS, headers=headers)
            before = [cpu_seconds(pid) for pid in workers]
            result = wrk(url, server_pids=[server.pid], seconds=SECONDS, headers=headers)
            spent = [cpu_seconds(pid) - was for pid, was in zip(workers, before, strict=True)]
            shares = [s / sum(spent) * 100 if sum(spent) else 0.0 for s in spent]
            print(
                result.line(f"{name} {path}")
                + f"  workers {'/'.join(f'{s:.0f}%' for s in shares)}",
                flush=True,
            )
            results[path] = {
                "rps": result.rate,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "cpu_ms_per_request": result.server_cpu_ms_per_request,
                "worker_cpu_shares_pct": shares,
                "non_2xx": result.non_2xx + result.socket_errors,
            }
    return results


def main() -> None:
    if not settings.DATABASE_IS_POSTGRES or not settings.REDIS_URL:
        raise SystemExit("run against the real services: DATABASE_URL=postgres://…, REDIS_URL")
    report = Report("http_servers")
    token = token_for(UserFactory.create(username=f"bench-{uuid.uuid4().hex[:12]}"))
    auth = {"Authorization": f"Token {token}"}
    table: dict[str, dict[str, Any]] = {}
    for name in servers("", "", 0):
        bare = measure(name, ("bench.bare_django:wsgi", "bench.bare_django:asgi"), [("/bare", {})])
        full = measure(
            name,
            ("config.wsgi:application", "config.asgi:application"),
            [("/health", {}), ("/api/auth/me", auth)],
        )
        table[name] = {**bare, **full}
    print()
    print(
        f"{'server':<26} {'bare':>9} {'/health':>9} {'ratio':>6} {'/me':>9} {'ratio':>6} "
        f"{'cpu/me':>8}"
    )
    for name, rows in table.items():
        bare_rps = rows["/bare"]["rps"]
        print(
            f"{name:<26} {bare_rps:>9,.0f} {rows['/health']['rps']:>9,.0f} "
            f"{rows['/health']['rps'] / bare_rps:>6.2f} {rows['/api/auth/me']['rps']:>9,.0f} "
            f"{rows['/api/auth/me']['rps'] / bare_rps:>6.2f} "
            f"{rows['/api/auth/me']['cpu_ms_per_request']:>6.2f}ms"
        )
        for path, row in rows.items():
            report.check(row["non_2xx"] == 0, f"{name} {path}: {row['non_2xx']} failed requests")
    report.figure("servers", table)
    best = max(table, key=lambda name: table[name]["/api/auth/me"]["rps"])
    report.figure("fastest_for_api", best, f"fastest for authenticated REST: {best}")
    chosen = table["granian (WSGI)"]["/api/auth/me"]
    report.target(
        "authenticated_trivial_view",
        chosen["rps"] >= 1500,
        f"authenticated trivial view >= 1,500 req/s on granian WSGI ({chosen['rps']:,.0f})",
    )
    shares = chosen["worker_cpu_shares_pct"]
    report.check(
        len(shares) == 2 and min(shares) >= 30,
        f"both workers busy under load (CPU shares {shares})",
    )
    report.finish()


if __name__ == "__main__":
    main()
