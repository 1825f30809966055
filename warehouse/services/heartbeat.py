"""The consumer heartbeat that `/readyz` checks (`selectors.consumer_heartbeat_check`)."""

from datetime import datetime

from django.utils import timezone

from warehouse.models import ConsumerHeartbeat


def consumer_heartbeat_beat(*, name: str, started_at: datetime) -> None:
    """Record that consumer `name` (host:queue) is alive now; `started_at` is when it started
    (aware). One upsert, idempotent, no lock beyond the row's own."""
    ConsumerHeartbeat.objects.update_or_create(
        name=name, defaults={"beat_at": timezone.now(), "started_at": started_at}
    )


def consumer_heartbeat_clear(*, name: str) -> None:
    """A cleanly stopped consumer is not stale: forget it. Idempotent (nothing to delete is
    fine)."""
    ConsumerHeartbeat.objects.filter(name=name).delete()
