"""`manage.py run_warehouse_consumer`: the movement consumer as its own process.

SIGTERM/SIGINT: the batch in hand is committed and acked, then the process exits."""

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from common.metrics import metrics_server_start
from warehouse.queue import MovementConsumer, consumer_run


class Command(BaseCommand):
    help = "Consume warehouse movement messages in batches (one transaction per batch)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default=None, help="broker URL (WAREHOUSE_BROKER_URL)")
        parser.add_argument("--queue", default=None)
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--prefetch", type=int, default=None)
        parser.add_argument("--linger-ms", type=int, default=None)
        parser.add_argument("--name", default=None, help="heartbeat name (default host:queue)")

    def handle(self, *args: Any, **options: Any) -> None:
        consumer = MovementConsumer(
            url=options["url"],
            queue_name=options["queue"],
            batch_size=options["batch_size"],
            prefetch=options["prefetch"],
            linger_ms=options["linger_ms"],
            name=options["name"],
        )
        metrics_server_start(settings.METRICS_PORT, settings.BIND_HOST)
        asyncio.run(self._main(consumer))

    async def _main(self, consumer: MovementConsumer) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await consumer_run(stop, consumer)
