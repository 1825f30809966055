"""Settlement: the pending bets of a finished or cancelled event paid out (or not) in one
set-based UPDATE, each owner told on `betting.bets.<user id>`; plus the periodic reconciler."""

from decimal import Decimal
from typing import Any, TypedDict

import structlog
from django.db import transaction
from django.db.models import Count, F, Sum
from django.utils import timezone
from prometheus_client import Counter

from betting import schemas
from betting.models import AuditEntry, Bet, BetStatus, Event, EventState
from betting.services.audit import audit_append
from realtime.services import publish

logger = structlog.get_logger(__name__)

BETS_TOPIC_PREFIX = "betting.bets"

BETS_SETTLED = Counter("betting_bets_settled_total", "Bets settled", ["status"])

#: The bet status and payout (an expression over the bet row) each final event state gives.
SETTLEMENT_BY_STATE: dict[str, tuple[str, Any]] = {
    EventState.FINISHED_WIN: (BetStatus.WON, F("potential_payout")),
    EventState.FINISHED_LOSE: (BetStatus.LOST, Decimal("0.00")),
    EventState.CANCELLED: (BetStatus.VOID, F("amount")),
}


class BetsSettledMessage(TypedDict):
    """What one owner is told on `betting.bets.<user id>` when their bets of an event settle."""

    type: str  # "bets.settled"
    event_id: str
    status: str  # a `BetStatus` value
    bets: int  # how many of their bets settled
    payout: str  # their total payout, 2 decimal places


@transaction.atomic
def event_bets_settle(*, event_id: str, via: str = "task") -> int:
    """Settle every pending bet of a finished/cancelled event with one set-based UPDATE
    (`WHERE event = X AND status = pending`): won bets pay `potential_payout`, lost ones 0,
    void ones their stake. Idempotent: a repeat changes 0 rows (as does an unknown or still
    open event). Returns the number of bets settled; audits the batch and notifies each owner
    after commit (`BetsSettledMessage`). Raises nothing of its own."""
    event = Event.objects.filter(pk=event_id).first()
    if event is None or event.state not in SETTLEMENT_BY_STATE:
        return 0
    status, payout = SETTLEMENT_BY_STATE[event.state]
    now = timezone.now()
    settled = Bet.objects.filter(event_id=event_id, status=BetStatus.PENDING).update(
        status=status, payout=payout, settled_at=now
    )
    if not settled:
        return 0
    BETS_SETTLED.labels(status).inc(settled)
    audit_append(
        subject=AuditEntry.Subject.BET,
        subject_id=event_id,
        action=f"settled_{status}",
        actor_id=None,
        via=via,
        data={"event_id": event_id, "status": status, "bets": settled, "at": now.isoformat()},
    )
    per_user = (
        Bet.objects.filter(event_id=event_id, status=status, settled_at=now)
        .values("user_id")
        .annotate(bets=Count("id"), payout=Sum("payout"))
        .order_by("user_id")
    )
    for row in per_user:
        message: BetsSettledMessage = {
            "type": "bets.settled",
            "event_id": event_id,
            "status": status,
            "bets": row["bets"],
            "payout": schemas.money_format(row["payout"]),
        }
        publish(f"{BETS_TOPIC_PREFIX}.{row['user_id']}", message)
    logger.info("bets_settled", event_id=event_id, status=status, bets=settled, via=via)
    return settled


def settlements_reconcile() -> int:
    """Settle every finished/cancelled event that still has pending bets (periodic safety net
    for lost or failed settlement tasks, every BETTING_RECONCILE_SECONDS). Each event settles
    in its own transaction; idempotent. Returns the number of bets settled."""
    event_ids = list(
        Bet.objects.filter(status=BetStatus.PENDING)
        .exclude(event__state=EventState.NEW)
        .values_list("event_id", flat=True)
        .distinct()
    )
    return sum(event_bets_settle(event_id=event_id, via="reconciler") for event_id in event_ids)
