"""Platform periodic tasks (Celery beat)."""

from celery import shared_task

from common import services


@shared_task(name="common.api_tokens_purge")
def api_tokens_purge() -> int:
    """Expired API tokens deleted; returns the count (common.services.api_tokens_purge_expired)."""
    return services.api_tokens_purge_expired()
