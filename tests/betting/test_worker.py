"""A real Celery worker on RabbitMQ killed in the middle of a settlement."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from bench.harness import celery_worker_args
from betting.models import Bet, BetStatus
from betting.tasks import reconcile_settlements
from config.celery import app as celery_app
from tests.betting.factories import bet_place, event_create
from tests.factories import UserFactory

pytestmark = [
    pytest.mark.needs_postgres,
    pytest.mark.needs_broker,
    pytest.mark.timeout(120),
    pytest.mark.django_db(transaction=True),
]

ROOT = Path(__file__).resolve().parents[2]


def conninfo() -> str:
    db = settings.DATABASES["default"]
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgresql://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def start_worker() -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": conninfo().replace("postgresql://", "postgres://"),
    }
    return subprocess.Popen(
        celery_worker_args(extra=("--without-heartbeat",)),
        cwd=ROOT,
        env=env,
    )


def wait_until(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def settlement_blocked(admin: psycopg.Connection) -> bool:
    row = admin.execute(
        "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
        " and query ilike 'UPDATE \"betting_bet\"%%'"
    ).fetchone()
    return bool(row and row[0])


@pytest.fixture
def purged_queue() -> Iterator[None]:
    celery_app.control.purge()
    yield
    celery_app.control.purge()


@pytest.mark.parametrize("recovery", ["redelivery", "reconciler"])
def test_worker_killed_mid_settlement_is_recovered(purged_queue: None, recovery: str) -> None:
    event = event_create(coefficient="1.50")
    users = [UserFactory.create() for _ in range(5)]
    for n in range(40):
        bet_place(user=users[n % 5], event=event, amount="2.00")
    blocker_id = Bet.objects.order_by("id").values_list("id", flat=True).first()
    with psycopg.connect(conninfo(), autocommit=True) as admin, psycopg.connect(conninfo()) as hold:
        # Hold one bet row so the worker's settlement UPDATE is caught mid-statement.
        hold.execute("select id from betting_bet where id = %s for update", [blocker_id])
        worker = start_worker()
        try:
            from betting import services

            services.event_finish(event_id=event.id, outcome="win", actor_id=None, via="test")
            wait_until(lambda: settlement_blocked(admin), 60, "the worker to start settling")
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        hold.rollback()
        wait_until(lambda: not settlement_blocked(admin), 30, "the killed UPDATE to roll back")
    assert Bet.objects.filter(status=BetStatus.PENDING).count() == 40

    if recovery == "redelivery":
        worker = start_worker()
        try:
            wait_until(
                lambda: not Bet.objects.filter(status=BetStatus.PENDING).exists(),
                60,
                "the redelivered settlement",
            )
        finally:
            worker.terminate()
            worker.wait(timeout=20)
    else:
        celery_app.control.purge()  # the message is lost for good: only the reconciler is left
        assert reconcile_settlements.apply().get() == 40
    assert Bet.objects.filter(status=BetStatus.WON, payout="3.00").count() == 40
    assert reconcile_settlements.apply().get() == 0
