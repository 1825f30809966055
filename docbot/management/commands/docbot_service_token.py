from typing import Any

from django.core.management.base import BaseCommand

from docbot import services


class Command(BaseCommand):
    help = "Issue a knox token of the docbot service user (put it in DOCBOT_SERVICE_TOKEN)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(services.service_token_issue())
