"""Generate this installation's secrets once, into the shared `secrets` volume.

Run by the compose service `secrets` before anything else starts. A secret that already exists
is kept (so restarts and upgrades keep their passwords); one that the environment sets is
written from the environment instead of generated. Files are world-readable inside a volume
that only this compose project's containers mount (PostgreSQL and the app read them as
different users).
"""

import os
import secrets
import sys
from pathlib import Path

NAMES = {
    "django_secret_key": "DJANGO_SECRET_KEY",
    "postgres_password": "POSTGRES_PASSWORD",
    "redis_password": "REDIS_PASSWORD",
    "rabbitmq_password": "RABBITMQ_PASSWORD",
    "metrics_bearer_token": "METRICS_BEARER_TOKEN",
    "telegram_webhook_secret": "TELEGRAM_WEBHOOK_SECRET",
    "vmcontrol_enroll_secret": "VMCONTROL_ENROLL_SECRET",
    "flower_password": "FLOWER_PASSWORD",
}


def main(directory: str) -> None:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, variable in NAMES.items():
        path = folder / name
        given = os.environ.get(variable, "")
        if path.exists() and not given:
            continue
        path.write_text(given or secrets.token_urlsafe(32))
        path.chmod(0o644)
        print(f"secret {name}: {'from the environment' if given else 'generated'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/run/quintet-secrets")
