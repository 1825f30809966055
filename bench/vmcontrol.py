"""vmcontrol benchmark against a bare asyncio JSON-lines server measured in the same run.

1. Hold: N agents (`manage.py run_vm_agent --count N`, a separate process) heartbeat every 5 s
   for HOLD seconds: heartbeat p99, server memory per agent (RSS delta / agents), false offline.
2. Restart storm: the server is killed and started again; time until 99 % re-authorized.
3. Command round trip at M agents: PATCH on a separate uvicorn web process → Redis channel
   layer → agent consumer → agent → database → reply, p99.
The baseline is a bare asyncio server answering the same JSON lines (hello/auth/ping) with no
Django, Channels or database, driven by the very same agent process.

Sizes: VMC_BENCH_AGENTS (5000), VMC_BENCH_HOLD (60 s), VMC_BENCH_CMD_AGENTS (1000),
VMC_BENCH_COMMANDS (300). Run it under the bench lock against the real services.
"""

import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
    LatencyStats,
    Report,
    free_port,
    percentile,
    rss_kib,
    wait_for_port,
)

AGENTS = int(os.environ.get("VMC_BENCH_AGENTS", "5000"))
HOLD = float(os.environ.get("VMC_BENCH_HOLD", "60"))
CMD_AGENTS = int(os.environ.get("VMC_BENCH_CMD_AGENTS", "1000"))
COMMANDS = int(os.environ.get("VMC_BENCH_COMMANDS", "300"))
HEARTBEAT = 5.0
RAMP = float(os.environ.get("VMC_BENCH_RAMP", "10"))
WORK = ROOT / "var" / "bench-vmcontrol"


# --- the baseline: a bare asyncio JSON-lines server -----------------------------------------


async def _echo_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            frame = json.loads(line)
            kind = frame.get("type")
            if kind == "hello":
                reply = {"type": "welcome", "session_id": "-", "heartbeat_interval": HEARTBEAT}
            elif kind == "auth":
                reply = {"type": "auth_ok", "vm_id": frame.get("vm_id")}
            elif kind == "ping":
                reply = {"type": "pong"}
            else:
                reply = frame
            if "id" in frame:
                reply["id"] = frame["id"]
            writer.write(json.dumps(reply).encode() + b"\n")
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _echo_main(port: int) -> None:
    server = await asyncio.start_server(_echo_handle, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


# --- helpers --------------------------------------------------------------------------------


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "VMCONTROL_HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT),
        "VMCONTROL_AUTH_TIMEOUT_SECONDS": "60",
        "VMCONTROL_SERVER_NAME": "bench-vmcontrol",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def _spawn(args: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=ROOT, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@contextmanager
def _child(args: list[str], **env: str) -> Iterator[subprocess.Popen[bytes]]:
    child = _spawn(args, **env)
    try:
        yield child
    finally:
        _stop(child)


def _stop(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if child.poll() is None:
        child.send_signal(sig)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _server_args(kind: str, port: int) -> list[str]:
    if kind == "echo":
        return [sys.executable, "bench/vmcontrol.py", "--echo-server", str(port)]
    return [
        sys.executable,
        "manage.py",
        "run_vmcontrol_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _stats(path: Path) -> dict[str, Any]:
    for _ in range(50):
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _wait_for(path: Path, predicate: Any, limit: float) -> float | None:
    """Seconds until predicate(stats) holds, polling every 0.1 s; None past `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        stats = _stats(path)
        if stats and predicate(stats):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _prepare_vms(count: int) -> Path:
    """Register `count` VMs in bulk and write the fleet's state file."""
    from django.db import connection

    from vmcontrol.models import AgentSession, AuditEvent, Command, Disk, VirtualMachine
    from vmcontrol.services import token_generate

    Command.objects.all().delete()
    AgentSession.objects.all().delete()
    Disk.objects.all().delete()
    VirtualMachine.objects.all().delete()
    AuditEvent.objects.all().delete()
    tokens = [token_generate() for _ in range(count)]
    vms = VirtualMachine.objects.bulk_create(
        [
            VirtualMachine(name=f"bench-{i}", cpu_cores=2, ram_mb=2048, token_hash=hashed)
            for i, (_, hashed) in enumerate(tokens)
        ],
        batch_size=1000,
    )
    connection.close()
    inventory = {"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]}
    rows = [
        {"name": vm.name, "vm_id": vm.pk, "token": raw, "inventory": inventory}
        for vm, (raw, _) in zip(vms, tokens, strict=True)
    ]
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "fleet.json"
    path.write_text(json.dumps(rows))
    return path


def _fleet(state: Path, stats: Path, count: int, port: int, ramp: float) -> list[str]:
    return [
        sys.executable,
        "manage.py",
        "run_vm_agent",
        "--port",
        str(port),
        "--count",
        str(count),
        "--state-file",
        str(state),
        "--stats-file",
        str(stats),
        "--ramp",
        str(ramp),
    ]


def _db_offline_counts(since: float, until: float) -> tuple[int, int]:
    from datetime import UTC, datetime

    from django.db import connection

    from vmcontrol.models import AgentSession, VirtualMachine

    start = datetime.fromtimestamp(since, UTC)
    end = datetime.fromtimestamp(until, UTC)
    timed_out = AgentSession.objects.filter(
        end_reason="heartbeat_timeout", ended_at__gte=start, ended_at__lte=end
    ).count()
    not_authorized = VirtualMachine.objects.exclude(status="authorized").count()
    connection.close()
    return timed_out, not_authorized


# --- phases ---------------------------------------------------------------------------------


def hold_and_storm(kind: str, state: Path) -> dict[str, Any]:
    """Hold AGENTS for HOLD seconds, then kill and restart the server."""
    port = free_port()
    stats_path = WORK / f"stats-{kind}.json"
    stats_path.unlink(missing_ok=True)
    result: dict[str, Any] = {}
    server = _spawn(_server_args(kind, port))
    try:
        wait_for_port(port, timeout=60)
        time.sleep(1.0)
        rss_before = rss_kib(server.pid)
        fleet = _spawn(_fleet(state, stats_path, AGENTS, port, RAMP))
        try:
            took = _wait_for(stats_path, lambda s: s["authorized_now"] >= AGENTS, 120 + RAMP)
            result["connect_all_s"] = took
            if took is None:
                result["error"] = f"only {_stats(stats_path).get('authorized_now')} authorized"
                return result
            time.sleep(3)
            hold_start = time.time()
            before = _stats(stats_path)
            rss_peak = rss_kib(server.pid)
            deadline = time.monotonic() + HOLD
            while time.monotonic() < deadline:
                time.sleep(1)
                rss_peak = max(rss_peak, rss_kib(server.pid))
            hold_end = time.time()
            after = _stats(stats_path)
            result["rss_before_kib"] = rss_before
            result["rss_held_kib"] = rss_peak
            result["kib_per_agent"] = (rss_peak - rss_before) / AGENTS
            result["agent_disconnects_in_hold"] = after["disconnects"] - before["disconnects"]
            if kind == "real":
                timed_out, not_authorized = _db_offline_counts(hold_start, hold_end)
                result["heartbeat_timeouts_in_hold"] = timed_out
                result["vms_not_authorized_at_end"] = not_authorized
            result["false_offline"] = result["agent_disconnects_in_hold"] + result.get(
                "heartbeat_timeouts_in_hold", 0
            )

            # Restart storm: kill -9, start again on the same port.
            auths_before = _stats(stats_path)["auths"]
            server.kill()
            server.wait()
            server = _spawn(_server_args(kind, port))
            need = auths_before + int(AGENTS * 0.99)
            took = _wait_for(stats_path, lambda s: s["auths"] >= need, 90)
            result["storm_99pct_s"] = took
        finally:
            _stop(fleet)
        final = _stats(stats_path)
        rtts = [rtt for at, rtt in final.get("rtts", []) if hold_start <= at <= hold_end]
        stats = LatencyStats.of(rtts, hold_end - hold_start)
        result["pings_in_hold"] = stats.count
        result["heartbeat_p50_ms"] = stats.p50_ms
        result["heartbeat_p99_ms"] = stats.p99_ms
    finally:
        _stop(server)
    return result


async def _echo_round_trips(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    for i in range(count):
        started = time.perf_counter()
        writer.write(json.dumps({"type": "result", "id": str(i), "ok": True}).encode() + b"\n")
        await reader.readline()
        samples.append(time.perf_counter() - started)
    writer.close()
    return samples


async def _patch_round_trips(
    base: str, token: str, vm_ids: list[int], count: int, concurrency: int
) -> tuple[list[float], list[tuple[int, int]], int]:
    import httpx

    samples: list[float] = []
    expected: list[tuple[int, int]] = []
    errors = 0
    queue = list(range(count))
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Token {token}"}, timeout=30
    ) as client:

        async def worker(offset: int) -> None:
            nonlocal errors
            while queue:
                i = queue.pop()
                vm_id = vm_ids[(i * concurrency + offset) % len(vm_ids)]
                ram = 1024 + random.randrange(1, 60000)
                started = time.perf_counter()
                response = await client.patch(f"/api/vmcontrol/vms/{vm_id}", json={"ram_mb": ram})
                elapsed = time.perf_counter() - started
                if response.status_code != 200 or response.json()["ram_mb"] != ram:
                    errors += 1
                    continue
                samples.append(elapsed)
                expected.append((vm_id, ram))

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples, expected, errors


def commands(state: Path) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import connection
    from knox.models import AuthToken

    from vmcontrol.models import VirtualMachine

    result: dict[str, Any] = {}
    echo_port = free_port()
    with _child(_server_args("echo", echo_port)):
        wait_for_port(echo_port)
        echo = asyncio.run(_echo_round_trips(echo_port, COMMANDS))
    result["echo_round_trip_p99_ms"] = percentile([s * 1000 for s in echo], 99)

    rows = json.loads(state.read_text())[:CMD_AGENTS]
    small = WORK / "fleet-commands.json"
    small.write_text(json.dumps(rows))
    staff, _ = User.objects.get_or_create(username="bench-staff", defaults={"is_staff": True})
    _, token = AuthToken.objects.create(user=staff)
    connection.close()
    port, web_port = free_port(), free_port()
    stats_path = WORK / "stats-commands.json"
    stats_path.unlink(missing_ok=True)
    web_args = [
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(web_port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with (
        _child(_server_args("real", port)),
        _child(web_args),
    ):
        wait_for_port(port, timeout=60)
        wait_for_port(web_port, timeout=60)
        with _child(_fleet(small, stats_path, CMD_AGENTS, port, 3)):
            took = _wait_for(stats_path, lambda s: s["authorized_now"] >= CMD_AGENTS, 90)
            if took is None:
                result["error"] = "fleet did not authorize"
                return result
            time.sleep(2)
            vm_ids = [row["vm_id"] for row in rows]
            base = f"http://127.0.0.1:{web_port}"
            asyncio.run(_patch_round_trips(base, token, vm_ids, 20, 1))  # warm up
            for concurrency in (1, 8):
                samples, expected, errors = asyncio.run(
                    _patch_round_trips(base, token, vm_ids, COMMANDS, concurrency)
                )
                stats = LatencyStats.of(samples, sum(samples))
                key = f"c{concurrency}"
                result[f"{key}_count"] = stats.count
                result[f"{key}_errors"] = errors
                result[f"{key}_p50_ms"] = stats.p50_ms
                result[f"{key}_p99_ms"] = stats.p99_ms
                last = dict(expected)
                stored = dict(
                    VirtualMachine.objects.filter(pk__in=last).values_list("pk", "ram_mb")
                )
                connection.close()
                result[f"{key}_stored_mismatches"] = sum(
                    1 for vm_id, ram in last.items() if stored.get(vm_id) != ram
                )
    return result


def main() -> None:
    _raise_nofile()
    _django()
    report = Report("vmcontrol")
    report.figure(
        "sizes",
        {"agents": AGENTS, "hold_s": HOLD, "cmd_agents": CMD_AGENTS, "commands": COMMANDS},
        f"sizes: {AGENTS} agents, {HEARTBEAT:.0f} s heartbeats, hold {HOLD:.0f} s; "
        f"{COMMANDS} commands at {CMD_AGENTS} agents",
    )
    state = _prepare_vms(AGENTS)
    echo = hold_and_storm("echo", state)
    print("echo:", json.dumps(echo), flush=True)
    real = hold_and_storm("real", state)
    print("vmcontrol:", json.dumps(real), flush=True)
    report.figure("echo", echo)
    report.figure("vmcontrol", real)
    for part in (echo, real):
        report.check("error" not in part, f"phase failed: {part.get('error')}")
    if "error" not in real and "error" not in echo:
        report.compare(
            "heartbeat_p99_ms",
            real["heartbeat_p99_ms"],
            echo["heartbeat_p99_ms"],
            "ms",
            f"heartbeat p99 ({AGENTS} agents)",
        )
        report.target("heartbeat_p99", real["heartbeat_p99_ms"] <= 50, "heartbeat p99 ≤ 50 ms")
        report.compare(
            "kib_per_agent",
            real["kib_per_agent"],
            echo["kib_per_agent"],
            "KiB",
            "server memory per agent",
        )
        report.target("memory", real["kib_per_agent"] <= 30, "≤ 30 KB server memory per agent")
        report.compare(
            "false_offline",
            real["false_offline"],
            echo["false_offline"],
            "",
            "false offline during hold",
        )
        report.target("false_offline", real["false_offline"] == 0, "no false offline")
        storm, storm_base = real.get("storm_99pct_s"), echo.get("storm_99pct_s")
        report.compare(
            "storm_99pct_s",
            storm if storm is not None else float("nan"),
            storm_base if storm_base is not None else float("nan"),
            "s",
            f"restart storm: 99 % of {AGENTS} re-authorized",
        )
        report.target("storm", storm is not None and storm <= 30, "≥ 99 % re-authorized in 30 s")
    cmd = commands(state)
    print("commands:", json.dumps(cmd), flush=True)
    report.figure("commands", cmd)
    report.check("error" not in cmd, f"command phase failed: {cmd.get('error')}")
    if "error" not in cmd:
        for concurrency in (1, 8):
            key = f"c{concurrency}"
            report.compare(
                f"command_{key}_p99_ms",
                cmd[f"{key}_p99_ms"],
                cmd["echo_round_trip_p99_ms"],
                "ms",
                f"command round trip p99, {concurrency} in flight",
            )
            report.check(cmd[f"{key}_errors"] == 0, f"{cmd[f'{key}_errors']} commands failed")
            report.check(
                cmd[f"{key}_stored_mismatches"] == 0,
                f"{cmd[f'{key}_stored_mismatches']} acknowledged changes not stored",
            )
        report.target("command", cmd["c1_p99_ms"] <= 100, "command round trip p99 ≤ 100 ms")
    report.finish()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        asyncio.run(_echo_main(int(sys.argv[2])))
    else:
        main()
