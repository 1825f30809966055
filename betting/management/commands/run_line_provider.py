"""Serve the betting line provider over gRPC until SIGINT/SIGTERM.

The first signal stops taking calls and gives the ones in flight a grace period
(`serve`: `server.stop(grace=2)`); a second one cancels at once (`run_until_signal`)."""

import asyncio
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from betting.grpc.server import serve
from betting.grpc.transport import configured_mode
from common.heartbeat import process_heartbeat_start
from common.signals import run_until_signal


class Command(BaseCommand):
    help = "Serve betting.v1.LineProvider (gRPC, plus grpc.health.v1) on GRPC_PORT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.GRPC_PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        process_heartbeat_start("grpc")

        def bound(actual: int) -> None:
            self.stdout.write(
                f"betting line provider serving gRPC on {host}:{actual} ({configured_mode()})",
                ending="\n",
            )
            self.stdout.flush()

        async def main(stop: asyncio.Event) -> None:
            await serve(stop, host=host, port=port, on_bound=bound)

        try:
            run_until_signal(main)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
