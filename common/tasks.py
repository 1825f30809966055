"""Platform periodic tasks (Celery beat)."""

from celery import shared_task

from common import console_publisher, services


@shared_task(name="common.api_tokens_purge")
def api_tokens_purge() -> int:
    """Expired API tokens deleted; returns the count (common.services.api_tokens_purge_expired)."""
    return services.api_tokens_purge_expired()


@shared_task(name="common.console_publish", ignore_result=True)
def console_publish() -> bool:
    """One console tick (`console_publisher.console_tick`): every panel sampled and published
    once, under the publisher lock; True when this run sampled, False when another tick held
    the lock or had just run. Scheduled every CONSOLE_SAMPLE_SECONDS with `expires`, so ticks
    that waited in the queue longer than that are dropped instead of piling up."""
    return console_publisher.console_tick()
