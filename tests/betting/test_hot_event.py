"""One hot event on real PostgreSQL (issue 14 item 3): placements hold the event row in share
mode, so sixteen of them run at once; finishing and odds changes take it exclusively, so they
wait for the placements in flight, and no bet lands after a finish commits."""

import threading
import time
from decimal import Decimal

import pytest
from django.db import connection, transaction

from betting import services
from betting.models import AuditEntry, Bet, BetStatus, Event
from common.exceptions import PreconditionFailed
from tests.betting.factories import event_create
from tests.factories import UserFactory

pytestmark = [
    pytest.mark.needs_postgres,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]

PLACERS = 16


def _lock_waiters() -> int:
    """How many other backends of this database wait for a lock (row or advisory)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid() and wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


def _until_lock_waiters(count: int) -> None:
    for _ in range(6000):
        if _lock_waiters() >= count:
            return
        time.sleep(0.01)
    pytest.fail(f"never saw {count} backends waiting for a lock")


def _settlement_audits(event_id: str) -> list[int]:
    return [
        entry.data["bets"]
        for entry in AuditEntry.objects.filter(subject=AuditEntry.Subject.BET, subject_id=event_id)
    ]


@pytest.mark.parametrize("writer", ["finish", "odds"])
def test_sixteen_open_placements_do_not_wait_a_writer_waits_for_them_and_later_bets_for_it(
    writer: str,
) -> None:
    event = event_create(coefficient="2.00")
    users = [UserFactory.create() for _ in range(PLACERS)]
    # Every placer stops inside its still-open transaction, holding the event shared: the
    # barrier is only reached by all if no placement waits for another one.
    all_placed = threading.Barrier(PLACERS + 1, timeout=90)
    release = threading.Event()
    placed: dict[int, Bet] = {}
    late: list[object] = []
    errors: list[BaseException] = []

    def placer(user_id: int) -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    # A placement queued behind another fails here instead of hanging.
                    cursor.execute("SET LOCAL lock_timeout = '60s'")
                placement = services.bet_place(
                    user_id=user_id, event_id=event.id, amount=Decimal("1.00")
                )
                placed[user_id] = placement.bet
                all_placed.wait()
                assert release.wait(90)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            all_placed.abort()
        finally:
            connection.close()

    def write() -> None:
        try:
            if writer == "finish":
                services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
            else:
                services.event_odds_update(
                    event_id=event.id, coefficient=Decimal("3.00"), actor_id=None, via="test"
                )
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    def place_late(user_id: int) -> None:
        try:
            late.append(
                services.bet_place(user_id=user_id, event_id=event.id, amount=Decimal("1.00"))
            )
        except PreconditionFailed as refused:
            late.append(refused)
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=placer, args=(user.pk,)) for user in users]
    for thread in threads:
        thread.start()
    try:
        all_placed.wait()
    except threading.BrokenBarrierError:
        pytest.fail(f"placements waited for each other: {errors!r}")
    assert len(placed) == PLACERS
    assert Bet.objects.filter(event_id=event.id).count() == 0  # all sixteen still uncommitted

    writing = threading.Thread(target=write)
    writing.start()
    _until_lock_waiters(1)  # the writer waits for the sixteen
    # A placement arriving now queues behind the waiting writer instead of overtaking it.
    latecomer = threading.Thread(target=place_late, args=(UserFactory.create().pk,))
    latecomer.start()
    _until_lock_waiters(2)
    assert writing.is_alive() and latecomer.is_alive()
    release.set()
    for thread in [*threads, writing, latecomer]:
        thread.join(90)
    assert not errors

    bets = list(Bet.objects.filter(event_id=event.id))
    sixteen = [bet for bet in bets if bet.pk in {held.pk for held in placed.values()}]
    assert len(sixteen) == PLACERS
    assert {bet.coefficient for bet in sixteen} == {Decimal("2.00")}
    if writer == "finish":
        # The latecomer saw the finish: refused, and nothing else was placed.
        assert [getattr(outcome, "code", None) for outcome in late] == ["event_closed"]
        assert len(bets) == PLACERS
        assert {(bet.status, bet.payout) for bet in bets} == {(BetStatus.WON, Decimal("2.00"))}
        assert _settlement_audits(event.id) == [PLACERS]
        assert services.event_bets_settle(event_id=event.id) == 0
    else:
        # The latecomer's bet carries the new odds; the sixteen keep the ones they locked.
        (after,) = late
        assert isinstance(after, services.Placement)
        assert after.bet.coefficient == Decimal("3.00")
        assert Event.objects.get(pk=event.id).coefficient == Decimal("3.00")
        assert {bet.status for bet in bets} == {BetStatus.PENDING}


@pytest.mark.parametrize("round_", range(3))
def test_a_finish_racing_sixteen_placers_leaves_no_bet_after_it_and_settles_each_once(
    round_: int,
) -> None:
    event = event_create(coefficient="1.50")
    users = [UserFactory.create() for _ in range(PLACERS)]
    start = threading.Barrier(PLACERS, timeout=60)
    accepted: list[tuple[int, float]] = []  # (bet id, monotonic time its placement began)
    outcomes: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def placer(user_id: int) -> None:
        sequence = outcomes.setdefault(user_id, [])
        try:
            start.wait()
            for _ in range(5000):
                began = time.monotonic()
                try:
                    placement = services.bet_place(
                        user_id=user_id, event_id=event.id, amount=Decimal("2.00")
                    )
                except PreconditionFailed:
                    sequence.append("closed")
                    if sequence.count("closed") >= 3:
                        break
                    continue
                accepted.append((placement.bet.pk, began))
                sequence.append("accepted")
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=placer, args=(user.pk,)) for user in users]
    for thread in threads:
        thread.start()
    for _ in range(12000):  # until bets flow, so the finish lands mid-stream
        if len(accepted) >= 100:
            break
        time.sleep(0.005)
    services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
    committed = time.monotonic()  # the finish (and its settlement, eager here) has committed
    for thread in threads:
        thread.join(120)
    assert not errors
    assert all(sequence.count("closed") == 3 for sequence in outcomes.values())

    # A placement that began after the finish committed was refused, by every placer.
    assert [bet_id for bet_id, began in accepted if began >= committed] == []
    for sequence in outcomes.values():
        assert "accepted" not in sequence[sequence.index("closed") :]
    # Every accepted bet, and no other, settled exactly once: won, paid, counted once.
    bets = list(Bet.objects.filter(event_id=event.id))
    assert {bet.pk for bet in bets} == {bet_id for bet_id, _ in accepted}
    assert {(bet.status, bet.payout) for bet in bets} == {(BetStatus.WON, Decimal("3.00"))}
    assert all(bet.settled_at is not None for bet in bets)
    assert sum(_settlement_audits(event.id)) == len(bets)
    assert services.event_bets_settle(event_id=event.id) == 0
