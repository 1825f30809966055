"""Row locks of the betting app (select_for_update), always taken in the same order:
the event row first, then the global change-sequence row."""

from django.db.models import QuerySet

from betting.models import ChangeSequence, Event


def event_for_update(*, event_id: str) -> QuerySet[Event]:
    """Placement and finishing both lock the event row, so no bet can be inserted after a
    finish commits (and a finish waits for in-flight placements)."""
    return Event.objects.select_for_update().filter(pk=event_id)


def change_sequence_next() -> int:
    """Take the next global sequence number; the row lock is held until commit, so numbers
    commit in order and without gaps."""
    counter, _ = ChangeSequence.objects.select_for_update().get_or_create(id=1)
    counter.value += 1
    counter.save(update_fields=["value"])
    return counter.value
