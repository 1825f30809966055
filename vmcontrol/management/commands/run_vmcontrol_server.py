"""The VM agent TCP server (also started by `manage.py runall`)."""

import asyncio
import gc
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from common.heartbeat import process_heartbeat_start
from common.metrics import metrics_server_start
from common.signals import run_until_signal
from vmcontrol import services
from vmcontrol.consumers import application
from vmcontrol.server import serve


class Command(BaseCommand):
    help = "Serve VM agents over TCP (line-delimited JSON) until SIGINT/SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.VMCONTROL_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        process_heartbeat_start("tcp")
        if settings.METRICS_PORT:
            metrics_server_start(settings.METRICS_PORT)
        # Thousands of long-lived connection objects make full collections stall the event loop
        # for a heartbeat-visible time; freeze what startup allocated and collect less often.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

        def started(bound: int) -> None:
            self.stdout.write(f"vmcontrol listening on {host}:{bound}", ending="\n")
            self.stdout.flush()

        async def main(stop: asyncio.Event) -> None:
            await serve(stop, app=application, host=host, port=port, started=started)

        try:
            run_until_signal(main)
        except services.LeaseHeld as held:
            raise CommandError(held.message) from None
