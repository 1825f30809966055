"""Dead letters: replaying one through the ingest pipeline (staff, from the API or the admin)."""

from django.db import transaction
from django.utils import timezone

from common.exceptions import NotFound, PreconditionFailed
from warehouse.models import DeadLetter
from warehouse.services.ingest import replay_one


@transaction.atomic
def dead_letter_replay(*, dead_letter_id: int) -> DeadLetter:
    """Run a dead letter's raw body through the pipeline again and return the updated row.

    On success (`stored` or `duplicate`) it is marked replayed (`replayed_at`,
    `replay_outcome`); otherwise it stays with the new reason and detail. An unexpected failure
    of the pipeline is rolled back alone and recorded as outcome `error` (logged), never
    raised; a lost database is raised. Locks the dead letter row (select_for_update) for the
    transaction, so two concurrent replays of it run one after the other.

    Raises `NotFound` for an unknown id and `PreconditionFailed` (`already_replayed`) when it
    was replayed successfully before: replaying twice never applies the event twice."""
    dead_letter = DeadLetter.objects.select_for_update().filter(pk=dead_letter_id).first()
    if dead_letter is None:
        raise NotFound("No such dead letter.")
    if dead_letter.replay_outcome in ("stored", "duplicate"):
        raise PreconditionFailed("Already replayed.", code="already_replayed")
    result = replay_one(dead_letter.body, dead_letter_id=dead_letter_id)
    outcome = result.outcomes[0]
    dead_letter.replayed_at = timezone.now()
    dead_letter.replay_outcome = outcome
    fields = ["replayed_at", "replay_outcome"]
    if result.problems:
        dead_letter.reason = outcome
        dead_letter.detail = result.problems[0].detail[:500]
        fields += ["reason", "detail"]
    dead_letter.save(update_fields=fields)
    return dead_letter
