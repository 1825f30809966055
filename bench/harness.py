"""Shared benchmark helpers: bounded load loops, percentiles, ratio lines, JSON results, charts.

Every benchmark prints absolute figures and the ratio to a baseline measured in the same run,
saves its figures under bench/results/<name>.json (and a PNG chart when it has a curve), and
exits non-zero when a correctness check of the run fails.
"""

import asyncio
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MAX_SECONDS_PER_LOOP = float(os.environ.get("BENCH_MAX_SECONDS", "120"))


def percentile(samples: list[float], pct: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class LatencyStats:
    count: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @classmethod
    def of(cls, latencies_s: list[float], seconds: float, errors: int = 0) -> "LatencyStats":
        ms = [value * 1000 for value in latencies_s]
        return cls(
            count=len(ms),
            seconds=seconds,
            p50_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            mean_ms=statistics.fmean(ms) if ms else math.nan,
            errors=errors,
        )


async def run_concurrently(
    call: Callable[[int], Awaitable[None]],
    *,
    concurrency: int,
    total: int,
    max_seconds: float = MAX_SECONDS_PER_LOOP,
) -> LatencyStats:
    """Run `call(i)` `total` times from `concurrency` workers; stops early at `max_seconds`."""
    latencies: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal next_index, errors
        while next_index < total and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await call(index)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LatencyStats.of(latencies, time.perf_counter() - started, errors)


async def run_at_rate(
    call: Callable[[int], Awaitable[None]], *, rate: float, seconds: float
) -> LatencyStats:
    """Open-loop load: start `rate` calls per second for `seconds` (bounded), whatever the
    latency, so queueing shows up in the percentiles instead of lowering the offered load."""
    seconds = min(seconds, MAX_SECONDS_PER_LOOP)
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    interval = 1.0 / rate

    async def one(index: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            await call(index)
        except Exception:
            errors += 1
            return
        latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    tasks = []
    for index in range(total):
        delay = began + index * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return LatencyStats.of(latencies, time.perf_counter() - began, errors)


def ratio_line(label: str, value: float, baseline: float, unit: str) -> str:
    ratio = value / baseline if baseline else math.nan
    return f"{label:<46} {value:>12,.1f} {unit:<8} baseline {baseline:>12,.1f}  ratio {ratio:6.2f}"


@dataclass
class Report:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def figure(self, key: str, value: Any, line: str | None = None) -> None:
        self.figures[key] = value
        if line:
            print(line, flush=True)

    def compare(self, key: str, value: float, baseline: float, unit: str, label: str) -> None:
        self.figures[key] = {"value": value, "baseline": baseline, "unit": unit}
        self.figures[key]["ratio"] = value / baseline if baseline else None
        print(ratio_line(label, value, baseline, unit), flush=True)

    def target(self, key: str, ok: bool, text: str) -> None:
        self.figures.setdefault("targets", {})[key] = {"met": ok, "target": text}
        print(f"  target {text}: {'met' if ok else 'MISSED'}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.failures.append(text)
            print(f"  CORRECTNESS FAILURE: {text}", flush=True)

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        payload: dict[str, Any] = {
            "name": self.name,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "figures": self.figures,
            "failures": self.failures,
        }
        path.write_text(json.dumps(payload, indent=2, default=str))
        return path

    def finish(self) -> None:
        print(f"results: {self.save().relative_to(ROOT)}")
        if self.failures:
            sys.exit(1)


def chart(
    name: str, offered: list[float], achieved: list[float], p50: list[float], p99: list[float]
) -> Path:
    """Throughput and latency against offered load, as the assignments ask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(offered, achieved, marker="o")
    left.plot(offered, offered, linestyle="--", color="grey", label="offered")
    left.set(xlabel="offered load (req/s)", ylabel="achieved (req/s)", title="throughput")
    left.legend()
    right.plot(offered, p50, marker="o", label="p50")
    right.plot(offered, p99, marker="o", label="p99")
    right.set(xlabel="offered load (req/s)", ylabel="latency (ms)", title="latency")
    right.legend()
    fig.suptitle(name)
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def process(args: list[str], *, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child process that is always stopped (SIGTERM, then SIGKILL) when the block ends."""
    child = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def celery_worker_args(
    *, loglevel: str = "WARNING", concurrency: int | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    """`celery worker` on the default queue, quiet towards other workers: solo pool unless a
    concurrency is given, no gossip or mingle (tests and benchmarks start and kill it at will)."""
    pool = ["--concurrency", str(concurrency)] if concurrency else ["--pool", "solo"]
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config",
        "worker",
        "-Q",
        "quintet.default",
        *pool,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


@dataclass
class WrkResult:
    """One `wrk` run: throughput, latency percentiles (ms), failures, and the server's CPU time
    (user + system, its whole process tree, from /proc) spent per request."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_ms_per_request: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def line(self, label: str) -> str:
        return (
            f"{label:<46} {self.rate:>10,.1f} req/s  p50 {self.p50_ms:6.1f} ms  "
            f"p99 {self.p99_ms:6.1f} ms  cpu {self.server_cpu_ms_per_request:5.2f} ms/req"
            + (f"  non-2xx {self.non_2xx}" if self.non_2xx else "")
            + (f"  socket errors {self.socket_errors}" if self.socket_errors else "")
        )


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    for unit in ("us", "ms", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _WRK_UNITS[unit]
    return float(text)


WRK_LUA = ROOT / "bench" / "wrk"


def wrk(
    url: str,
    *,
    server_pids: list[int],
    seconds: float = 10,
    connections: int = 16,
    threads: int = 2,
    headers: dict[str, str] | None = None,
    script: str | None = None,
    script_env: dict[str, str] | None = None,
    rate: int | None = None,
) -> WrkResult:
    """Drive `url` with the C load generator `wrk` (Debian package `wrk`; `wrk2`'s `-R` when
    `rate` is given and available) for `seconds` (bounded by BENCH_MAX_SECONDS) and read the
    CPU time the server processes spent meanwhile from /proc. `script` names a Lua file in
    bench/wrk/ (request bodies, methods); its inputs come from `script_env`."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    seconds = min(seconds, MAX_SECONDS_PER_LOOP)
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    if script:
        args += ["-s", str(WRK_LUA / script)]
    if rate:
        args += ["-R", str(rate)]
    cpu_before = sum(cpu_seconds(pid) for pid in server_pids)
    done = subprocess.run(
        [*args, url],
        capture_output=True,
        text=True,
        env={**os.environ, **(script_env or {})},
        timeout=seconds + 60,
        check=True,
    )
    cpu = sum(cpu_seconds(pid) for pid in server_pids) - cpu_before
    out = done.stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    took = re.search(r"requests in ([\d.]+)(m?s|us|m)\b", out)
    assert took
    span = float(took.group(1)) * {"s": 1.0, "ms": 0.001, "us": 1e-6, "m": 60.0}[took.group(2)]
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=requests,
        seconds=span,
        p50_ms=_wrk_ms(percentiles.get("50", "nan")),
        p99_ms=_wrk_ms(percentiles.get("99", "nan")),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        server_cpu_ms_per_request=cpu * 1000 / requests if requests else math.nan,
    )


def web_server_args(
    port: int, *, workers: int = 2, app: str = "config.wsgi:application", interface: str = "wsgi"
) -> list[str]:
    """The production HTTP server (granian, chosen by bench/http_servers.py; docs/benchmarks.md)
    on 127.0.0.1:`port`. `interface="asgi"` with `app="config.asgi:application"` for the
    WebSocket/webhook side."""
    return [
        str(Path(sys.executable).parent / "granian"),
        "--interface",
        interface,
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        *(
            ["--blocking-threads", os.environ.get("WEB_THREADS", "2"), "--no-ws"]
            if interface == "wsgi"
            else []
        ),
    ]
