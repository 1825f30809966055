"""Redis outage under load: the web process keeps answering while its Redis dies and restarts.

A uvicorn web process (2 workers) on PostgreSQL uses a throwaway redis-server of its own for
cache, throttles and channel layer. `wrk` (16 connections) drives an authenticated, throttled
and cached read (`GET /api/betting/events`) for three equal phases: Redis up, Redis killed,
Redis restarted empty. Each phase prints throughput, p99 and the count of non-2xx answers; the
ratio compares the outage and recovery phases with the healthy one. The run fails if any
phase has a non-2xx answer (the policy: degrade, never 500).

Needs DATABASE_URL (PostgreSQL) and `wrk` and `redis-server` on the PATH.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, Report, cpu_seconds, free_port, process, wait_for_port

PHASE_SECONDS = int(os.environ.get("BENCH_OUTAGE_PHASE_SECONDS", "8"))


def _redis(port: int) -> list[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def _manage(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _token(env: dict[str, str]) -> str:
    script = (
        "from django.contrib.auth import get_user_model;"
        "from knox.models import AuthToken;"
        "u, _ = get_user_model().objects.get_or_create(username='outage-bench');"
        "print(AuthToken.objects.create(user=u)[1])"
    )
    return _manage("shell", "-c", script, env=env).strip().splitlines()[-1]


def _wrk(url: str, token: str, seconds: int, server_pid: int) -> dict[str, float]:
    cpu_before = cpu_seconds(server_pid)
    output = subprocess.run(
        [
            "wrk",
            "-t2",
            "-c16",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Token {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p99_text = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    assert p99_text is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99_text.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    socket_errors = sum(int(value) for value in errors.groups()) if errors else 0
    total = float(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return {
        "rate": rate,
        "server_cpu_ms_per_request": (cpu_seconds(server_pid) - cpu_before) * 1000 / total,
        "p99_ms": float(p99_text.group(1)) * scale,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors,
    }


def main() -> None:
    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url.startswith("postgres") or not shutil.which("wrk"):
        sys.exit("bench/redis_outage.py needs DATABASE_URL (PostgreSQL) and wrk")
    report = Report("redis_outage")
    redis_port, web_port = free_port(), free_port()
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", ""),
        "API_THROTTLE_USER": "1000000/min",
        "LOG_LEVEL": "ERROR",
    }
    _manage("migrate", "--noinput", "-v", "0", env=env)
    token = _token(env)
    web = [
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(web_port),
        "--workers", "2", "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{web_port}/api/betting/events"
    phases: dict[str, dict[str, float]] = {}
    redis = subprocess.Popen(_redis(redis_port), stdout=subprocess.DEVNULL)
    try:
        wait_for_port(redis_port)
        with process(web, env=env) as server:
            wait_for_port(web_port)
            _wrk(url, token, 2, server.pid)  # warm-up
            phases["healthy"] = _wrk(url, token, PHASE_SECONDS, server.pid)
            redis.kill()
            redis.wait()
            phases["redis_down"] = _wrk(url, token, PHASE_SECONDS, server.pid)
            redis = subprocess.Popen(_redis(redis_port), stdout=subprocess.DEVNULL)
            wait_for_port(redis_port)
            time.sleep(0.5)
            phases["redis_restarted_empty"] = _wrk(url, token, PHASE_SECONDS, server.pid)
    finally:
        redis.kill()
        redis.wait()
    healthy = phases["healthy"]
    for name, figures in phases.items():
        report.figure(
            f"{name}",
            figures,
            f"{name:>22}: {figures['rate']:8.1f} req/s, p99 {figures['p99_ms']:6.1f} ms, "
            f"server CPU {figures['server_cpu_ms_per_request']:.2f} ms/request, "
            f"non-2xx {figures['non_2xx']}, socket errors {figures['socket_errors']}",
        )
    for name in ("redis_down", "redis_restarted_empty"):
        report.compare(
            f"{name}_rps", phases[name]["rate"], healthy["rate"], "req/s", f"{name} throughput"
        )
    report.check(
        all(figures["non_2xx"] == 0 for figures in phases.values()),
        "non-2xx answers while Redis was down or restarting",
    )
    report.finish()


if __name__ == "__main__":
    main()
