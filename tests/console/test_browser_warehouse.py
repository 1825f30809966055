"""warehouse on the console in real headless Chromium: messages published to the real queue
(RabbitMQ with CELERY_BROKER_URL, kombu's filesystem queue embedded) reach the real consumer and
the page shows them within 3 s without a reload: a departure without stock becomes a dead letter,
an arrival is stored and its copy counted as a duplicate; "Replay" on the dead letter stores it."""

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from playwright.sync_api import expect

from tests.console.conftest import ConsolePage
from tests.warehouse.factories import body
from warehouse import queue
from warehouse.models import DeadLetter, LedgerEntry, Stock
from warehouse.schemas import envelope_build

pytestmark = pytest.mark.timeout(120)
WITHIN_MS = 3000


def movement(*, event: str, quantity: int, place: dict[str, uuid.UUID]) -> bytes:
    return body(
        envelope_build(
            envelope_id=uuid.uuid4(),
            source="WH-0042",
            event=event,
            movement_id=uuid.uuid4(),
            quantity=quantity,
            timestamp=datetime(2025, 2, 18, 12, 0, tzinfo=UTC),
            sent_millis=int(time.time() * 1000),
            **place,
        )
    )


def total(view: ConsolePage, panel: str, key: str) -> int:
    return int(view.counter_total(panel, key).get_attribute("data-value") or 0)


@contextmanager
def warehouse_scenario(view: ConsolePage, queue_dir: Path) -> Iterator[dict[str, Any]]:
    """Messages arrive, one is a dead letter, it is replayed from the page; yields what the
    panel showed, the consumer still running."""
    name = f"warehouse.console.{uuid.uuid4().hex[:12]}"
    url = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
    with override_settings(
        WAREHOUSE_BROKER_URL=url,
        WAREHOUSE_QUEUE=name,
        WAREHOUSE_QUEUE_DIR=str(queue_dir),
        WAREHOUSE_STRICT_STOCK=True,
        WAREHOUSE_HEARTBEAT_SECONDS=0.2,
    ):
        consumer = queue.MovementConsumer(batch_size=10, linger_ms=50)
        halt = threading.Event()
        thread = threading.Thread(target=consumer.run_blocking, args=(halt,), daemon=True)
        thread.start()
        try:
            yield from _messages_arrive_and_one_is_replayed(view)
        finally:
            halt.set()
            thread.join(timeout=15)
            if url.startswith("amqp"):
                with queue.connection_open(url) as conn:
                    queue.movement_queue(name)(conn.channel()).delete()


def _messages_arrive_and_one_is_replayed(view: ConsolePage) -> Iterator[dict[str, Any]]:
    place = {"warehouse_id": uuid.uuid4(), "product_id": uuid.uuid4()}
    ledger_rows = view.number("warehouse", "ledger_rows")
    waiting = view.number("warehouse", "dead_letters")
    expect(ledger_rows).to_have_text("0")
    expect(view.number("warehouse", "consumers")).to_have_text("1", timeout=WITHIN_MS)
    messages = total(view, "warehouse", "warehouse.messages")
    duplicates = total(view, "warehouse", "warehouse.duplicates")

    # More leaves than ever arrived (strict stock): refused, a dead letter.
    queue.envelopes_publish([movement(event="departure", quantity=5, place=place)])

    expect(waiting).to_have_text("1", timeout=WITHIN_MS)
    letter = DeadLetter.objects.get()
    row = view.row("warehouse", "dead_letters", str(letter.pk))
    expect(row).to_contain_text("insufficient_stock", timeout=WITHIN_MS)
    expect(row.locator("a")).to_have_attribute(
        "href", f"/admin/warehouse/deadletter/{letter.pk}/change/"
    )
    expect(view.attention("warehouse").first).to_contain_text("1 dead letter(s) insufficient_stock")

    # The stock arrives; the same message published twice is one event and a duplicate.
    arrival = movement(event="arrival", quantity=10, place=place)
    queue.envelopes_publish([arrival, arrival])

    expect(ledger_rows).to_have_text("1", timeout=WITHIN_MS)
    counter = view.counter_total("warehouse", "warehouse.duplicates")
    expect(counter).to_have_attribute("data-value", str(duplicates + 1), timeout=WITHIN_MS)
    expect(view.counter_total("warehouse", "warehouse.messages")).to_have_attribute(
        "data-value", str(messages + 3), timeout=WITHIN_MS
    )
    shown = {
        "ledger rows": ledger_rows.inner_text(),
        "dead letter row": row.inner_text(),
        "consumer lag (s)": view.number("warehouse", "lag").inner_text(),
        "messages counted": total(view, "warehouse", "warehouse.messages") - messages,
        "duplicates counted": total(view, "warehouse", "warehouse.duplicates") - duplicates,
    }

    view.action("warehouse", "replay", row=f"dead_letters/{letter.pk}").click()

    expect(view.flash("warehouse")).to_have_text(f"Dead letter #{letter.pk} replayed: stored.")
    expect(ledger_rows).to_have_text("2", timeout=WITHIN_MS)
    expect(waiting).to_have_text("0", timeout=WITHIN_MS)
    expect(row).to_have_count(0)
    assert LedgerEntry.objects.count() == 2
    assert Stock.objects.get(**place).balance == 5
    shown["after replay"] = view.flash("warehouse").inner_text()
    yield shown


def test_messages_and_a_dead_letter_show_live_and_the_dead_letter_is_replayed_from_the_page(
    console_page: ConsolePage, tmp_path: Path
) -> None:
    console_page.page.evaluate("window.__notReloaded = true")
    with warehouse_scenario(console_page, tmp_path / "queue"):
        assert console_page.page.evaluate("window.__notReloaded") is True
