"""Celery interfaces of betting: each takes ids and calls one service."""

from celery import shared_task
from django.db import OperationalError

from betting import services


@shared_task(
    name="betting.settle_event",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def settle_event(event_id: str) -> int:
    """Settle the event's pending bets; a redelivery changes 0 rows."""
    return services.event_bets_settle(event_id=event_id)


@shared_task(name="betting.reconcile_settlements", acks_late=True)
def reconcile_settlements() -> int:
    return services.settlements_reconcile()
