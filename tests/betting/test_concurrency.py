"""Races on PostgreSQL row locks: placement against a concurrent FinishEvent."""

import asyncio
import threading
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from betting import services
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import Bet, BetStatus
from common.exceptions import PreconditionFailed
from tests.betting.factories import event_create
from tests.factories import StaffFactory, UserFactory, token_for

pytestmark = [pytest.mark.needs_postgres, pytest.mark.timeout(90)]

PLACERS = 8


def place_until_closed(
    *, user_id: int, event_id: str, start: threading.Barrier, accepted: list[int]
) -> list[str]:
    """Place bets back to back until the event refuses; returns the order of outcomes."""
    outcomes: list[str] = []
    start.wait()
    try:
        for _ in range(2000):
            try:
                placement = services.bet_place(
                    user_id=user_id, event_id=event_id, amount=Decimal("1.00")
                )
            except PreconditionFailed:
                outcomes.append("closed")
                if outcomes.count("closed") >= 3:
                    break
                continue
            accepted.append(placement.bet.pk)
            outcomes.append("accepted")
    finally:
        connection.close()
    return outcomes


@pytest.mark.parametrize("round_", range(3))
async def test_no_bet_slips_in_after_a_concurrent_finish_event(
    stub: pb_grpc.LineProviderStub, round_: int
) -> None:
    staff = await sync_to_async(StaffFactory.create)()
    auth = (("authorization", f"Bearer {await sync_to_async(token_for)(staff)}"),)
    event = await sync_to_async(event_create)(coefficient="2.00")
    users = [await sync_to_async(UserFactory.create)() for _ in range(PLACERS)]
    start = threading.Barrier(PLACERS)
    accepted: list[int] = []
    outcomes: list[list[str]] = []

    def placer(user_id: int) -> None:
        outcomes.append(
            place_until_closed(user_id=user_id, event_id=event.id, start=start, accepted=accepted)
        )

    # Plain threads: the loop's default executor has fewer workers than placers + barrier.
    placers = [threading.Thread(target=placer, args=(user.pk,)) for user in users]
    for thread in placers:
        thread.start()
    for _ in range(6000):  # until some bets are in, so the finish lands mid-stream
        if len(accepted) >= 20:
            break
        await asyncio.sleep(0.005)
    finished = await stub.FinishEvent(
        pb.FinishEventRequest(id=event.id, outcome=pb.OUTCOME_WIN), metadata=auth
    )
    assert finished.state == pb.EVENT_STATE_FINISHED_WIN
    for thread in placers:
        await asyncio.to_thread(thread.join, 60)
    assert len(outcomes) == PLACERS
    for sequence in outcomes:
        # Once a placer saw the event closed, it never got a bet accepted again.
        first_closed = sequence.index("closed")
        assert "accepted" not in sequence[first_closed:]

    def bets() -> tuple[set[int], int, set[int]]:
        placed = set(Bet.objects.filter(event_id=event.id).values_list("id", flat=True))
        pending = Bet.objects.filter(status=BetStatus.PENDING).count()
        won = set(Bet.objects.filter(status=BetStatus.WON).values_list("id", flat=True))
        return placed, pending, won

    placed, pending, won = await sync_to_async(bets)()
    assert placed == set(accepted)
    assert pending == 0
    assert won == placed
