"""`manage.py run_warehouse_consumer`: the movement consumer as its own process.

SIGTERM/SIGINT (`common.signals.run_until_signal`): the batch in hand is committed and acked,
the heartbeat is cleared and the connection closed, then the process exits; a second signal
cancels the wait."""

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from common.heartbeat import process_heartbeat_start
from common.metrics import metrics_server_start
from common.signals import run_until_signal
from warehouse.queue import MovementConsumer, consumer_run


class Command(BaseCommand):
    help = "Consume warehouse movement messages in batches (one transaction per batch)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default=None, help="broker URL (WAREHOUSE_BROKER_URL)")
        parser.add_argument("--queue", default=None)
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--prefetch", type=int, default=None)
        parser.add_argument("--linger-ms", type=int, default=None)
        parser.add_argument("--name", default=None, help="heartbeat name (default host:queue:pid)")

    def handle(self, *args: Any, **options: Any) -> None:
        process_heartbeat_start("consumer")
        consumer = MovementConsumer(
            url=options["url"],
            queue_name=options["queue"],
            batch_size=options["batch_size"],
            prefetch=options["prefetch"],
            linger_ms=options["linger_ms"],
            name=options["name"],
        )
        metrics_server_start(settings.METRICS_PORT, settings.BIND_HOST)

        async def main(stop: asyncio.Event) -> None:
            await consumer_run(stop, consumer)

        run_until_signal(main)
