"""Serve the betting line provider over gRPC until SIGINT/SIGTERM."""

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from betting.grpc.server import serve


class Command(BaseCommand):
    help = "Serve betting.v1.LineProvider (gRPC, plus grpc.health.v1) on GRPC_PORT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.GRPC_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        asyncio.run(self._main(host, port))

    async def _main(self, host: str, port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def bound(actual: int) -> None:
            self.stdout.write(f"betting line provider serving gRPC on {host}:{actual}", ending="\n")
            self.stdout.flush()

        await serve(stop, host=host, port=port, on_bound=bound)
