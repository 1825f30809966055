"""`manage.py warehouse_verify_stock [--rebuild]`: check stock == Σ ledger (exit 1 if not)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from warehouse.selectors import stock_mismatches
from warehouse.services import stock_rebuild


class Command(BaseCommand):
    help = "Verify (and optionally rebuild) every stock balance from the ledger."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rebuild", action="store_true", help="recompute stock first")

    def handle(self, *args: Any, rebuild: bool, **options: Any) -> None:
        if rebuild:
            self.stdout.write(f"rebuilt {stock_rebuild()} stock rows from the ledger")
        mismatches = stock_mismatches()
        for mismatch in mismatches[:20]:
            self.stderr.write(str(mismatch))
        if mismatches:
            raise CommandError(f"{len(mismatches)} stock rows differ from the ledger")
        self.stdout.write("ok: stock == sum(ledger)")
