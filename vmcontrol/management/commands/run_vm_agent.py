"""The VM agent (one, or a simulated fleet with --count)."""

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from common.parsers import INT64_MAX
from common.signals import run_until_signal
from vmcontrol.agent import AgentFleet, AgentIdentity, FleetStats, client_tls_context
from vmcontrol.management.options import (
    OptionValuesCommand,
    disk_option,
    identifier_option,
    integer_option,
    seconds_option,
    text_option,
)
from vmcontrol.protocol import (
    MAX_CPU_CORES,
    MAX_NAME_LENGTH,
    MAX_RAM_MB,
    MAX_SECRET_LENGTH,
    MAX_TOKEN_LENGTH,
)


class Command(OptionValuesCommand):
    help = "Run a VM agent (or --count simulated agents) that dials the vmcontrol server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", type=identifier_option(max_length=253), default="127.0.0.1")
        parser.add_argument(
            "--port",
            type=integer_option(min_value=1, max_value=65535),
            default=settings.VMCONTROL_PORT,
        )
        parser.add_argument(
            "--vm-id",
            type=integer_option(min_value=1, max_value=INT64_MAX),
            help="registered VM id (with --token)",
        )
        parser.add_argument(
            "--token",
            type=identifier_option(max_length=MAX_TOKEN_LENGTH),
            help="the token shown once at registration (may start with '-')",
        )
        parser.add_argument(
            "--name", type=text_option(max_length=MAX_NAME_LENGTH), default="agent-1"
        )
        parser.add_argument(
            "--cpu", type=integer_option(min_value=1, max_value=MAX_CPU_CORES), default=2
        )
        parser.add_argument(
            "--ram", type=integer_option(min_value=1, max_value=MAX_RAM_MB), default=2048, help="MB"
        )
        parser.add_argument("--disk", action="append", type=disk_option, help="NAME:SIZE_GB")
        parser.add_argument(
            "--enroll-secret",
            type=text_option(max_length=MAX_SECRET_LENGTH, allow_empty=True),
            default=settings.VMCONTROL_ENROLL_SECRET,
            help="self-enroll agents that have no token yet",
        )
        parser.add_argument(
            "--count",
            type=integer_option(min_value=1, max_value=1_000_000),
            default=1,
            help="simulate this many agents",
        )
        parser.add_argument("--state-file", type=Path, help="JSON file keeping enrolled tokens")
        parser.add_argument("--stats-file", type=Path, help="write fleet counters every second")
        parser.add_argument(
            "--ramp", type=seconds_option(), default=0.0, help="seconds to spread connects"
        )
        parser.add_argument("--ignore-commands", action="store_true")
        parser.add_argument("--backoff-base", type=seconds_option(), default=0.5)
        parser.add_argument("--backoff-cap", type=seconds_option(), default=10.0)
        parser.add_argument(
            "--duration", type=seconds_option(), default=0.0, help="stop after N seconds"
        )
        parser.add_argument(
            "--tls",
            action=argparse.BooleanOptionalAction,
            default=settings.VMCONTROL_AGENT_TLS,
            help="dial over TLS and verify the server (env VMCONTROL_AGENT_TLS)",
        )
        parser.add_argument(
            "--ca-file",
            type=Path,
            default=Path(settings.VMCONTROL_AGENT_CA_FILE)
            if settings.VMCONTROL_AGENT_CA_FILE
            else None,
            help="PEM CA bundle the server certificate must chain to; implies --tls "
            "(env VMCONTROL_AGENT_CA_FILE; default: the system trust store)",
        )
        parser.add_argument(
            "--tls-server-name",
            type=identifier_option(max_length=253),
            default=settings.VMCONTROL_AGENT_TLS_SERVER_NAME or None,
            help="host name the certificate must carry when it is not --host "
            "(env VMCONTROL_AGENT_TLS_SERVER_NAME)",
        )

    def _tls(self, options: dict[str, Any]) -> ssl.SSLContext | None:
        ca_file: Path | None = options["ca_file"]
        if not options["tls"] and ca_file is None:
            return None
        if ca_file is not None and not ca_file.is_file():
            raise CommandError(f"--ca-file {ca_file}: no such file")
        try:
            return client_tls_context(ca_file)
        except (OSError, ssl.SSLError) as error:
            raise CommandError(f"--ca-file {ca_file}: not a PEM CA bundle ({error})") from None

    def handle(self, *args: Any, **options: Any) -> None:
        tls = self._tls(options)
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
                        "disks": [
                            {"name": disk.name, "size_gb": disk.size_gb}
                            for disk in options["disk"] or []
                        ]
                        or [{"name": "root", "size_gb": 20}],
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
            tls=tls,
            server_hostname=options["tls_server_name"],
        )
        run_until_signal(lambda stop: self._main(fleet, options, stop))

    async def _main(self, fleet: AgentFleet, options: dict[str, Any], stop: asyncio.Event) -> None:
        if options["duration"]:
            asyncio.get_running_loop().call_later(options["duration"], stop.set)
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
