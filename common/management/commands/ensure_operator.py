"""Create the first operator: from DJANGO_SUPERUSER_USERNAME/PASSWORD when set, else a demo
operator whose generated password is printed once."""

import secrets
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from common import services


class Command(BaseCommand):
    help = "Create the first operator account unless it exists."

    def handle(self, *args: Any, **options: Any) -> None:
        username = settings.DJANGO_SUPERUSER_USERNAME or "operator"
        password = settings.DJANGO_SUPERUSER_PASSWORD or secrets.token_urlsafe(12)
        if not services.operator_ensure(username=username, password=password):
            self.stdout.write(f"Operator {username!r} exists.")
            return
        if settings.DJANGO_SUPERUSER_PASSWORD:
            self.stdout.write(self.style.SUCCESS(f"Created operator {username!r}."))
        else:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Created demo operator {username!r} with password {password!r} "
                    "(shown once; change it in /admin/)."
                )
            )
