"""Platform baseline: GET /health through the whole middleware stack on uvicorn, against a bare
ASGI app answering the same JSON on the same server, 16 concurrent keep-alive clients."""

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import Report, free_port, process, run_concurrently, wait_for_port

REQUESTS = int(os.environ.get("BENCH_PLATFORM_REQUESTS", "4000"))


async def measure(port: int) -> tuple[float, float, int]:
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as client:

        async def call(_: int) -> None:
            async with client.get("/health") as response:
                response.raise_for_status()
                await response.read()

        stats = await run_concurrently(call, concurrency=16, total=REQUESTS)
    return stats.rate, stats.p99_ms, stats.errors


def serve(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning"]


def main() -> None:
    report = Report("core_http")
    env = {"DJANGO_SETTINGS_MODULE": "config.settings"}
    bare_port, django_port = free_port(), free_port()
    with process(serve("bench.bare_asgi:app", bare_port), env=env):
        wait_for_port(bare_port)
        bare_rate, bare_p99, _ = asyncio.run(measure(bare_port))
    with process(serve("config.asgi:application", django_port), env=env):
        wait_for_port(django_port)
        rate, p99, errors = asyncio.run(measure(django_port))
    report.compare("health_rps", rate, bare_rate, "req/s", "GET /health throughput (16 clients)")
    report.compare("health_p99_ms", p99, bare_p99, "ms", "GET /health p99")
    report.check(errors == 0, f"{errors} failed /health requests")
    report.finish()


if __name__ == "__main__":
    main()
