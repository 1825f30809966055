"""The VM agent (one, or a simulated fleet with --count)."""

import asyncio
import contextlib
import json
import resource
import signal
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from vmcontrol.agent import AgentFleet, AgentIdentity, FleetStats


def _disk(value: str) -> dict[str, Any]:
    name, _, size = value.partition(":")
    if not name or not size.isdigit():
        raise CommandError(f"--disk wants NAME:SIZE_GB, got {value!r}")
    return {"name": name, "size_gb": int(size)}


class Command(BaseCommand):
    help = "Run a VM agent (or --count simulated agents) that dials the vmcontrol server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.VMCONTROL_PORT)
        parser.add_argument("--vm-id", type=int, help="registered VM id (with --token)")
        parser.add_argument("--token", help="the token shown once at registration")
        parser.add_argument("--name", default="agent-1")
        parser.add_argument("--cpu", type=int, default=2)
        parser.add_argument("--ram", type=int, default=2048, help="MB")
        parser.add_argument("--disk", action="append", type=_disk, help="NAME:SIZE_GB")
        parser.add_argument(
            "--enroll-secret",
            default=settings.VMCONTROL_ENROLL_SECRET,
            help="self-enroll agents that have no token yet",
        )
        parser.add_argument("--count", type=int, default=1, help="simulate this many agents")
        parser.add_argument("--state-file", type=Path, help="JSON file keeping enrolled tokens")
        parser.add_argument("--stats-file", type=Path, help="write fleet counters every second")
        parser.add_argument("--ramp", type=float, default=0.0, help="seconds to spread connects")
        parser.add_argument("--ignore-commands", action="store_true")
        parser.add_argument("--backoff-base", type=float, default=0.5)
        parser.add_argument("--backoff-cap", type=float, default=10.0)
        parser.add_argument("--duration", type=float, default=0.0, help="stop after N seconds")

    def handle(self, *args: Any, **options: Any) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(hard, max(soft, options["count"] + 256))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        identities = None
        if options["token"]:
            identities = [
                AgentIdentity(
                    name=options["name"],
                    vm_id=options["vm_id"],
                    token=options["token"],
                    inventory={
                        "cpu_cores": options["cpu"],
                        "ram_mb": options["ram"],
                        "disks": options["disk"] or [{"name": "root", "size_gb": 20}],
                    },
                )
            ]
        fleet = AgentFleet(
            options["host"],
            options["port"],
            count=options["count"],
            state_file=options["state_file"],
            enroll_secret=options["enroll_secret"],
            identities=identities,
            answer_commands=not options["ignore_commands"],
            backoff_base=options["backoff_base"],
            backoff_cap=options["backoff_cap"],
        )
        asyncio.run(self._main(fleet, options))

    async def _main(self, fleet: AgentFleet, options: dict[str, Any]) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if options["duration"]:
            loop.call_later(options["duration"], stop.set)
        reporter = asyncio.create_task(self._report(fleet.stats, options["stats_file"], stop))
        await fleet.run(stop, ramp_seconds=options["ramp"])
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        self._write_stats(fleet.stats, options["stats_file"], final=True)

    async def _report(self, stats: FleetStats, path: Path | None, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            self._write_stats(stats, path, final=False)
            if path is None and options_verbose(stats):
                self.stdout.write(json.dumps(stats.counters()))

    def _write_stats(self, stats: FleetStats, path: Path | None, *, final: bool) -> None:
        if path is None:
            return
        payload = stats.counters()
        payload["final"] = final
        if final:
            payload["rtts"] = stats.rtts
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)


def options_verbose(stats: FleetStats) -> bool:
    # One line every ten seconds is enough for a person watching a console.
    return int(time.time()) % 10 == 0
