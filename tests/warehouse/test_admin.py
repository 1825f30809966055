"""The warehouse admin over a real socket, as an operator's browser uses it: the ledger, stock
and heartbeats cannot be written (stock = Σ ledger holds), stock shows the `short` flag, and a
dead letter is replayed from its own page through the ingest service."""

import json

import pytest
from django.utils import timezone

from tests.admin_http import AdminSession
from tests.conftest import LiveServer
from tests.factories import StaffFactory
from tests.warehouse.factories import body, example_pair
from warehouse import selectors, services
from warehouse.models import DeadLetter, LedgerEntry, Stock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def operator(asgi_server: LiveServer) -> AdminSession:
    return AdminSession(asgi_server.http_url, StaffFactory.create(is_superuser=True).username)


def test_ledger_stock_and_heartbeats_refuse_every_write(operator: AdminSession) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    entry = LedgerEntry.objects.first()
    stock = Stock.objects.first()
    assert entry is not None and stock is not None
    attempts = {
        "/admin/warehouse/ledgerentry/add/": {"event": "arrival", "quantity": "5"},
        f"/admin/warehouse/ledgerentry/{entry.pk}/delete/": {"post": "yes"},
        "/admin/warehouse/stock/add/": {"balance": "5"},
        f"/admin/warehouse/stock/{stock.pk}/delete/": {"post": "yes"},
        f"/admin/warehouse/stock/{stock.pk}/change/": {"balance": "999"},
        "/admin/warehouse/deadletter/add/": {"reason": "malformed"},
        "/admin/warehouse/consumerheartbeat/add/": {"name": "forged"},
    }
    for path, data in attempts.items():
        response = operator.post_form(path, data, page="/admin/warehouse/")
        assert response.status_code == 403, path
    bulk_delete = operator.post_form(
        "/admin/warehouse/stock/",
        {"action": "delete_selected", "_selected_action": [stock.pk], "post": "yes"},
    )
    assert bulk_delete.status_code in {200, 302}
    assert Stock.objects.filter(pk=stock.pk).exists()
    assert LedgerEntry.objects.count() == 2
    assert selectors.stock_mismatches() == []


def test_stock_shows_the_short_flag(operator: AdminSession) -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body(departure)])  # a departure before any arrival
    page = operator.get("/admin/warehouse/stock/").text
    assert "column-short" in page
    assert 'alt="True"' in page


def test_a_dead_letter_is_replayed_from_its_own_page(operator: AdminSession) -> None:
    departure, _ = example_pair()
    letter = DeadLetter.objects.create(
        received_at=timezone.now(), body=json.dumps(departure), reason="error"
    )
    page = operator.get(f"/admin/warehouse/deadletter/{letter.pk}/change/")
    assert page.status_code == 200
    assert f"/admin/warehouse/deadletter/{letter.pk}/replay/" in page.text
    response = operator.post_form(
        f"/admin/warehouse/deadletter/{letter.pk}/replay/",
        {},
        page=f"/admin/warehouse/deadletter/{letter.pk}/change/",
    )
    assert response.status_code == 302
    assert any("stored" in message for message in operator.messages(response))
    letter.refresh_from_db()
    assert letter.replay_outcome == "stored" and letter.replayed_at is not None
    assert LedgerEntry.objects.filter(movement_id=departure["data"]["movement_id"]).exists()
    again = operator.post_form(
        f"/admin/warehouse/deadletter/{letter.pk}/replay/",
        {},
        page=f"/admin/warehouse/deadletter/{letter.pk}/change/",
    )
    assert any("replayed" in message for message in operator.messages(again))
    assert LedgerEntry.objects.count() == 1
    missing = operator.post_form(
        f"/admin/warehouse/deadletter/{10**9}/replay/", {}, page="/admin/warehouse/"
    )
    assert missing.status_code == 404
