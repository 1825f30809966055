"""The consumer heartbeat that `/readyz` checks (`selectors.consumer_heartbeat_check`)."""

import os
from datetime import datetime

from django.utils import timezone

from warehouse.models import ConsumerHeartbeat


def consumer_heartbeat_beat(*, name: str, started_at: datetime) -> None:
    """Record that consumer `name` (`queue.consumer_name`: host:queue:pid) is alive now;
    `started_at` is when it started (aware). One upsert, idempotent, no lock beyond the row's
    own."""
    ConsumerHeartbeat.objects.update_or_create(
        name=name, defaults={"beat_at": timezone.now(), "started_at": started_at}
    )


def consumer_heartbeat_clear(*, name: str) -> None:
    """A cleanly stopped consumer is not stale: forget it. Idempotent (nothing to delete is
    fine)."""
    ConsumerHeartbeat.objects.filter(name=name).delete()


def consumer_heartbeats_prune(*, prefix: str) -> list[str]:
    """Forget the heartbeats named `<prefix><pid>` (`queue.consumer_name`: this host's copies)
    whose process no longer runs on this host: a copy killed without clearing its own. Names
    of other hosts, or without a pid after `prefix`, are never touched. Returns the names
    removed. One query, plus one delete when there is something to remove."""
    names = ConsumerHeartbeat.objects.filter(name__startswith=prefix).values_list("name", flat=True)
    gone = [
        name
        for name in names
        if name[len(prefix) :].isdigit() and not _running(int(name[len(prefix) :]))
    ]
    if gone:
        ConsumerHeartbeat.objects.filter(name__in=gone).delete()
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True
