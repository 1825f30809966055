"""`manage.py warehouse_produce`: publish seeded, spec-exact movement envelopes."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from warehouse.queue import broker_url, envelopes_publish
from warehouse.simulator import Simulation


class Command(BaseCommand):
    help = "Publish simulated movement envelopes (departure + arrival per movement)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--movements", type=int, default=100)
        parser.add_argument("--warehouses", type=int, default=5)
        parser.add_argument("--products", type=int, default=20)
        parser.add_argument("--initial-stock", type=int, default=0)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--duplicate-rate", type=float, default=0.0)
        parser.add_argument("--poison-rate", type=float, default=0.0)
        parser.add_argument("--shuffle", action="store_true")
        parser.add_argument("--url", default=None, help="broker URL (WAREHOUSE_BROKER_URL)")
        parser.add_argument("--queue", default=None)
        parser.add_argument(
            "--rate", type=float, default=0.0, help="messages per second (0: as fast as possible)"
        )
        parser.add_argument(
            "--movement-seed", type=int, default=None, help="fresh movements, same ids"
        )
        parser.add_argument("--skip-initial", action="store_true", help="no initial-stock phase")

    def handle(self, *args: Any, **options: Any) -> None:
        simulation = Simulation(
            seed=options["seed"],
            warehouses=options["warehouses"],
            products=options["products"],
            movements=options["movements"],
            initial_stock=options["initial_stock"],
            duplicate_rate=options["duplicate_rate"],
            poison_rate=options["poison_rate"],
            shuffle=options["shuffle"],
            movement_seed=options["movement_seed"],
        )
        initial = [] if options["skip_initial"] else simulation.initial_bodies()
        bodies = initial + simulation.movement_bodies()
        sent = envelopes_publish(
            bodies, url=options["url"], queue_name=options["queue"], rate=options["rate"]
        )
        self.stdout.write(f"published {sent} messages to {options['url'] or broker_url()}")
        self.stdout.write("warehouses (source → warehouse_id):")
        for index, warehouse_id in enumerate(simulation.warehouse_ids):
            self.stdout.write(f"  {simulation.source(index)}  {warehouse_id}")
        self.stdout.write("products (product_id):")
        for product_id in simulation.product_ids:
            self.stdout.write(f"  {product_id}")
        first_warehouse, first_product = simulation.warehouse_ids[0], simulation.product_ids[0]
        self.stdout.write(
            f"try: curl -s http://127.0.0.1:{settings.HTTP_PORT}/api/warehouses/"
            f"{first_warehouse}/products/{first_product}"
        )
