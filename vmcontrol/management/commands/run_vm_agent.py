"""The VM agent (one, or a simulated fleet with --count).

Logs go to stderr, one line per event: for people by default (`2025-06-01 12:00:00 INFO
authorized as VM 7 on 127.0.0.1:9100 [vmcontrol_agent_authorized]`), as JSON lines with
`--json` (or LOG_FORMAT=json). `-v 0` keeps warnings and errors only, `-v 2` adds debug lines.
The exit status says how it ended (`EXIT_STATUSES`, also in `--help`).
"""

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import ssl
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings
from django.core.management.base import CommandError, CommandParser, DjangoHelpFormatter

from common.parsers import INT64_MAX
from common.signals import run_until_signal
from vmcontrol.agent import AgentFleet, AgentIdentity, FleetStats, client_tls_context
from vmcontrol.management.options import (
    OptionValuesCommand,
    disk_option,
    identifier_option,
    integer_option,
    seconds_option,
    server_option,
    text_option,
)
from vmcontrol.protocol import (
    MAX_CPU_CORES,
    MAX_NAME_LENGTH,
    MAX_RAM_MB,
    MAX_SECRET_LENGTH,
    MAX_TOKEN_LENGTH,
)

EXIT_CREDENTIALS_REFUSED = 3
EXIT_STATUSES = f"""exit status:
  0  stopped by SIGINT/SIGTERM, or at the end of --duration
  1  could not start (e.g. a missing or bad --ca-file), or stopped by a second signal
  2  a bad option
  {EXIT_CREDENTIALS_REFUSED}  the server refused the credentials --auth-attempts times in a row (a
     wrong, revoked or rotated token, a wrong enrollment secret, or neither given): fix them
     rather than restarting the agent in a loop. With --count: any simulated agent gave up.
  Network failures are never fatal: the agent reconnects with backoff until stopped."""

TEXTS = {
    "vmcontrol_agent_connected": "connected to {host}:{port}",
    "vmcontrol_agent_enrolled": "enrolled as VM {vm_id} ({name})",
    "vmcontrol_agent_authorized": "authorized as VM {vm_id} on {host}:{port}",
    "vmcontrol_agent_logged_out": "VM {vm_id} logged out by the server ({reason})",
    "vmcontrol_agent_command": "VM {vm_id} ran {command}: {outcome}",
    "vmcontrol_agent_reconnecting": (
        "{reason}; reconnecting in {delay_seconds} s to {next_server} (attempt {attempt})"
    ),
    "vmcontrol_agent_auth_failed": (
        "VM {vm_id}: credentials refused ({error}), attempt {attempt} of {attempts}"
    ),
    "vmcontrol_agent_giving_up": (
        "VM {vm_id}: giving up after {attempts} refusals; check --vm-id and --token "
        "(or --enroll-secret)"
    ),
    "vmcontrol_agent_tls_refused": "TLS: {error} ({host}:{port})",
    "vmcontrol_agent_summary": (
        "{authorized}/{agents} authorized; heartbeats answered in the last {seconds} s: "
        "{pongs}{round_trip}"
    ),
    "vmcontrol_agent_stopped": "stopped",
    "shutdown_requested": "{signal}: stopping",
    "shutdown_forced": "{signal} again: stopping now",
}
"""The human line of each event the agent logs (the JSON lines carry the fields instead)."""


def _outcome(fields: dict[str, Any]) -> str:
    if not fields.get("ok"):
        return f"failed {fields.get('error')}"
    specs = fields.get("inventory") or {}
    disks = ", ".join(f"{d['name']} {d['size_gb']} GB" for d in specs.get("disks", [])) or "none"
    return f"now {specs.get('cpu_cores')} CPU, {specs.get('ram_mb')} MB RAM, disks {disks}"


def _human_text(event: str, fields: dict[str, Any]) -> str:
    if event == "vmcontrol_agent_command":
        fields = {**fields, "outcome": _outcome(fields)}
    if event == "vmcontrol_agent_summary":
        rtt = fields.get("round_trip_ms")
        round_trip = f" (round trip median {rtt['median']} ms, max {rtt['max']} ms)" if rtt else ""
        fields = {**fields, "round_trip": round_trip}
    template = TEXTS.get(event)
    if template is None:
        return " ".join([event, *(f"{key}={value}" for key, value in fields.items())])
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError):
        return " ".join([event, *(f"{key}={value}" for key, value in fields.items())])


def human_renderer(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    """`2025-06-01 12:00:00 WARNING <sentence> [<event>]` (UTC), then any traceback."""
    stamp = str(event_dict.pop("timestamp", ""))
    try:
        when = datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    level = str(event_dict.pop("level", "info")).upper()
    event = str(event_dict.pop("event", ""))
    exception = event_dict.pop("exception", None)
    for key in ("logger", "logger_name", "request_id", "session_id"):
        event_dict.pop(key, None)
    line = f"{when} {level:<7} {_human_text(event, event_dict)} [{event}]"
    return f"{line}\n{exception}" if exception else line


def log_formatter(*, json_lines: bool) -> logging.Formatter:
    """One line per record: JSON (`event`, `level`, `timestamp` and the fields) or human."""
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else human_renderer
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    )


@contextlib.contextmanager
def agent_logging(*, json_lines: bool, verbosity: int) -> Iterator[None]:
    """For the command's lifetime: every record at the chosen level goes to stderr in the
    chosen form (the process's other handlers, such as the error queue, stay)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(json_lines=json_lines))
    consoles = [
        h
        for h in root.handlers
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
    ]
    level = root.level
    for console in consoles:
        root.removeHandler(console)
    root.addHandler(handler)
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    try:
        yield
    finally:
        root.removeHandler(handler)
        for console in consoles:
            root.addHandler(console)
        root.setLevel(level)


logger = structlog.get_logger("vmcontrol.agent")


class _HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, with the exit statuses kept as written."""


class Command(OptionValuesCommand):
    help = "Run a VM agent (or --count simulated agents) that dials the vmcontrol server."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", EXIT_STATUSES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", type=identifier_option(max_length=253), default="127.0.0.1")
        parser.add_argument(
            "--port",
            type=integer_option(min_value=1, max_value=65535),
            default=settings.VMCONTROL_PORT,
        )
        parser.add_argument(
            "--server",
            action="append",
            type=server_option,
            default=[],
            metavar="HOST:PORT",
            help="another copy of the server (repeatable): when a connection fails or ends the "
            "agent dials the next one in turn; a --count fleet starts spread over all of them",
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
        parser.add_argument(
            "--auth-attempts",
            type=integer_option(min_value=1, max_value=1000),
            default=3,
            help="refusals of the credentials in a row before giving up with exit status "
            f"{EXIT_CREDENTIALS_REFUSED} (default 3)",
        )
        parser.add_argument(
            "--json",
            action=argparse.BooleanOptionalAction,
            default=settings.LOG_FORMAT == "json",
            help="log JSON lines for machines instead of lines for people (default: "
            "LOG_FORMAT=json)",
        )
        parser.add_argument(
            "--summary-every",
            type=seconds_option(),
            default=30.0,
            help="seconds between heartbeat summaries at INFO (0: none; default 30)",
        )
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
            max_auth_failures=options["auth_attempts"],
            more_servers=options["server"],
        )
        with agent_logging(json_lines=options["json"], verbosity=options["verbosity"]):
            run_until_signal(lambda stop: self._main(fleet, options, stop))
            gave_up = fleet.stats.gave_up
            if gave_up:
                # Not a CommandError: its one-line report on stderr would break JSON lines.
                raise SystemExit(EXIT_CREDENTIALS_REFUSED)

    async def _main(self, fleet: AgentFleet, options: dict[str, Any], stop: asyncio.Event) -> None:
        if options["duration"]:
            asyncio.get_running_loop().call_later(options["duration"], stop.set)
        reporter = asyncio.create_task(self._report(fleet, options, stop))
        await fleet.run(stop, ramp_seconds=options["ramp"])
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        self._write_stats(fleet.stats, options["stats_file"], final=True)
        logger.info("vmcontrol_agent_stopped", **fleet.stats.counters())

    async def _report(
        self, fleet: AgentFleet, options: dict[str, Any], stop: asyncio.Event
    ) -> None:
        """Every second: the stats file; every --summary-every seconds: one INFO summary."""
        every: float = options["summary_every"]
        summary = _Summary(fleet)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            self._write_stats(fleet.stats, options["stats_file"], final=False)
            if every and summary.due(every):
                logger.info("vmcontrol_agent_summary", **summary.take())

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


class _Summary:
    """What changed since the last summary: heartbeats answered and their round trips."""

    def __init__(self, fleet: AgentFleet) -> None:
        self.fleet = fleet
        self.since = time.monotonic()
        self.pongs = fleet.stats.pongs
        self.rtts_seen = len(fleet.stats.rtts)

    def due(self, every: float) -> bool:
        return time.monotonic() - self.since >= every

    def take(self) -> dict[str, Any]:
        stats = self.fleet.stats
        now = time.monotonic()
        rtts = [rtt for _, rtt in stats.rtts[self.rtts_seen :]]
        fields: dict[str, Any] = {
            "agents": len(self.fleet.agents),
            "authorized": stats.authorized_now,
            "pongs": stats.pongs - self.pongs,
            "seconds": round(now - self.since),
            "round_trip_ms": {
                "median": round(statistics.median(rtts) * 1000, 1),
                "max": round(max(rtts) * 1000, 1),
            }
            if rtts
            else None,
            "disconnects": stats.disconnects,
            "commands": stats.commands,
        }
        self.since, self.pongs, self.rtts_seen = now, stats.pongs, len(stats.rtts)
        return fields
