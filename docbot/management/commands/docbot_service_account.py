"""The operator's door to the docbot service identity: create it, issue or rotate its token."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from docbot import services


class Command(BaseCommand):
    help = (
        "Create the docbot service identity if missing and print a new non-expiring token for "
        "DOCBOT_SERVICE_TOKEN. --rotate revokes every token of the identity first (and removes "
        "a password someone set on it)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--rotate",
            action="store_true",
            help="revoke all its tokens, reset the zero-setup token key, remove any password",
        )

    def handle(self, *args: Any, rotate: bool, **options: Any) -> None:
        try:
            token = services.service_account_rotate() if rotate else services.service_token_issue()
        except services.ServiceAccountRefused as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(token)
        if rotate:
            self.stderr.write(
                "All earlier tokens of the docbot service account are revoked; restart the bot "
                "processes (and the web processes, for webhooks) with the new token."
            )
