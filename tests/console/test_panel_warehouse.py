"""warehouse's console panel: its sample after real batches through the ingest pipeline (stored,
duplicate, dead-lettered, a balance gone short), and the replay action with its refusals."""

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import connection

from common.console import ConsolePanel, PanelSample, console_panel
from common.exceptions import NotFound, PreconditionFailed
from common.heartbeat import console_flush
from common.parsers import InvalidValue
from tests.factories import StaffFactory
from tests.warehouse.factories import body
from warehouse import selectors, services
from warehouse.models import DeadLetter, LedgerEntry, Stock
from warehouse.schemas import envelope_build

pytestmark = pytest.mark.django_db(transaction=True)


def panel() -> ConsolePanel:
    found = console_panel("warehouse")
    assert found is not None, "WarehouseConfig.ready registers the panel"
    return found


def numbers(sample: PanelSample) -> dict[str, Any]:
    return {number["key"]: number["value"] for number in sample["numbers"]}


def counters(sample: PanelSample) -> dict[str, int]:
    return {key: counter["value"] for key, counter in sample["counters"].items()}


def sample_now() -> PanelSample:
    console_flush()
    return panel().sample()


def movement(*, event: str, quantity: int, place: dict[str, uuid.UUID] | None = None) -> bytes:
    """A spec-exact envelope sent 1.5 s ago (producer clock) at `place` (a fresh pair by
    default)."""
    place = place or {"warehouse_id": uuid.uuid4(), "product_id": uuid.uuid4()}
    return body(
        envelope_build(
            envelope_id=uuid.uuid4(),
            source="WH-0001",
            event=event,
            movement_id=uuid.uuid4(),
            quantity=quantity,
            timestamp=datetime(2025, 2, 18, 12, 0, tzinfo=UTC),
            sent_millis=int((time.time() - 1.5) * 1000),
            **place,
        )
    )


def test_the_panel_shows_ingest_duplicates_dead_letters_and_shortage(settings: Any) -> None:
    settings.WAREHOUSE_STRICT_STOCK = False
    before = counters(sample_now())
    arrival = movement(event="arrival", quantity=10)
    departure = movement(event="departure", quantity=15)
    result = services.movements_ingest(
        bodies=[arrival, departure, arrival, b"{not json"], keys=["k1", "k2", "k3", "k4"]
    )
    assert result.outcomes == ["stored", "stored", "duplicate", "malformed"]

    sample = sample_now()

    after = counters(sample)
    assert after["warehouse.messages"] - before["warehouse.messages"] == 4
    assert after["warehouse.duplicates"] - before["warehouse.duplicates"] == 1
    shown = numbers(sample)
    assert (shown["ledger_rows"], shown["dead_letters"], shown["short"]) == (2, 1, 1)
    assert 1.0 <= shown["lag"] < 120
    letter = DeadLetter.objects.get()
    reason, short = sample["attention"]
    assert reason["text"].startswith("1 dead letter(s) malformed, newest ")
    assert reason["link"] == "/admin/warehouse/deadletter/?reason__exact=malformed"
    stock = Stock.objects.get(balance=-15)
    assert short["text"].startswith("stock short by 15: product ")
    assert short["link"] == f"/admin/warehouse/stock/{stock.pk}/change/"
    [table] = sample["tables"]
    [row] = table["rows"]
    assert row["cells"][:2] == [f"#{letter.pk}", "malformed"]
    assert row["link"] == f"/admin/warehouse/deadletter/{letter.pk}/change/"
    assert row["actions"] == [{"action": "replay", "label": "Replay", "params": {"id": letter.pk}}]


def test_replay_action_stores_a_dead_letter_once_its_cause_is_gone(settings: Any) -> None:
    settings.WAREHOUSE_STRICT_STOCK = True
    staff = StaffFactory.create()
    place = {"warehouse_id": uuid.uuid4(), "product_id": uuid.uuid4()}
    refused = services.movements_ingest(
        bodies=[movement(event="departure", quantity=5, place=place)]
    )
    assert refused.outcomes == ["insufficient_stock"]
    services.movements_ingest(bodies=[movement(event="arrival", quantity=10, place=place)])
    letter = DeadLetter.objects.get()
    replay = panel().actions["replay"].run

    line = replay(params={"id": letter.pk}, user=staff)

    assert line == f"Dead letter #{letter.pk} replayed: stored."
    assert LedgerEntry.objects.count() == 2
    assert Stock.objects.get(**place).balance == 5
    assert numbers(sample_now())["dead_letters"] == 0
    with pytest.raises(PreconditionFailed):
        replay(params={"id": letter.pk}, user=staff)
    assert LedgerEntry.objects.count() == 2
    with pytest.raises(NotFound):
        replay(params={"id": letter.pk + 1000}, user=staff)
    with pytest.raises(InvalidValue):
        replay(params={"id": True}, user=staff)


def test_replaying_a_letter_that_still_fails_answers_and_keeps_it_waiting() -> None:
    staff = StaffFactory.create()
    services.movements_ingest(bodies=[b"[1, 2"], keys=["broken"])
    letter = DeadLetter.objects.get()

    line = panel().actions["replay"].run(params={"id": letter.pk}, user=staff)

    assert line.startswith(f"Dead letter #{letter.pk} failed again: malformed (")
    assert numbers(sample_now())["dead_letters"] == 1


def test_ledger_rows_are_counted_exactly_only_up_to_a_bound() -> None:
    place = {"warehouse_id": uuid.uuid4(), "product_id": uuid.uuid4()}
    services.movements_ingest(
        bodies=[movement(event="arrival", quantity=1, place=place) for _ in range(3)]
    )
    assert selectors.console_ledger_rows(exact_up_to=3) == (3, True)
    assert selectors.console_ledger_rows(exact_up_to=2) == (3, False)


@pytest.mark.needs_postgres
def test_a_large_ledger_is_read_from_the_planner_estimate_without_counting() -> None:
    place = {"warehouse_id": uuid.uuid4(), "product_id": uuid.uuid4()}
    services.movements_ingest(
        bodies=[movement(event="arrival", quantity=1, place=place) for _ in range(5)]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {LedgerEntry._meta.db_table}")
    LedgerEntry.objects.filter(pk=LedgerEntry.objects.order_by("pk")[0].pk).delete()
    # The estimate (5, from ANALYZE) is over twice the bound: it is used, the delete unseen.
    assert selectors.console_ledger_rows(exact_up_to=2) == (5, False)
