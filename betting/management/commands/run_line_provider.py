"""Serve the betting line provider over gRPC until SIGINT/SIGTERM."""

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from betting.grpc.server import serve
from betting.grpc.transport import configured_mode


class Command(BaseCommand):
    help = "Serve betting.v1.LineProvider (gRPC, plus grpc.health.v1) on GRPC_PORT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.GRPC_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        try:
            asyncio.run(self._main(host, port))
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None

    async def _main(self, host: str, port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def bound(actual: int) -> None:
            self.stdout.write(
                f"betting line provider serving gRPC on {host}:{actual} ({configured_mode()})",
                ending="\n",
            )
            self.stdout.flush()

        await serve(stop, host=host, port=port, on_bound=bound)
