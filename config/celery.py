"""The Celery app: RabbitMQ when CELERY_BROKER_URL is set, eager in-process execution otherwise."""

import os
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init, worker_process_shutdown
from django_structlog.celery.steps import DjangoStructLogInitStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("quintet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(DjangoStructLogInitStep)
app.autodiscover_tasks()


@worker_init.connect
@worker_process_init.connect
def _worker_heartbeat(**kwargs: Any) -> None:
    """The console's heartbeat in the worker and in each prefork child (which runs the tasks
    and so holds their `console_count` increments)."""
    from common.heartbeat import process_heartbeat_start

    process_heartbeat_start("worker")


@worker_process_shutdown.connect
def _worker_heartbeat_stop(**kwargs: Any) -> None:
    """A prefork child leaves through `os._exit` (no `atexit`): remove its record here."""
    from common.heartbeat import process_heartbeat_stop

    process_heartbeat_stop()


@beat_init.connect
def _beat_heartbeat(**kwargs: Any) -> None:
    from common.heartbeat import process_heartbeat_start

    process_heartbeat_start("beat")
