from celery import shared_task

from realtime import services


@shared_task(name="realtime.tickets_purge")
def tickets_purge() -> int:
    return services.tickets_purge()
