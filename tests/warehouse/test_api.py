"""The HTTP interface over a real uvicorn socket."""

import time
import uuid

import httpx
import pytest
from django.test import override_settings

from tests.factories import StaffFactory, UserFactory, auth_header
from tests.warehouse.factories import ARRIVAL, DEPARTURE, body, envelope, example_pair
from warehouse import services
from warehouse.models import DeadLetter, LedgerEntry

MOVEMENT = f"/api/movements/{DEPARTURE['data']['movement_id']}"
SENDER = DEPARTURE["data"]["warehouse_id"]
RECEIVER = ARRIVAL["data"]["warehouse_id"]
PRODUCT = DEPARTURE["data"]["product_id"]


def test_the_assignment_movement_is_served_without_a_token(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    response = http.get(MOVEMENT)
    assert response.status_code == 200
    assert response.json() == {
        "movement_id": DEPARTURE["data"]["movement_id"],
        "product_id": PRODUCT,
        "status": "completed",
        "sender": {"warehouse_id": SENDER, "source": "WH-3322"},
        "receiver": {"warehouse_id": RECEIVER, "source": "WH-3423"},
        "departed_at": "2025-02-18T12:12:56+00:00",
        "arrived_at": "2025-02-18T14:34:56+00:00",
        "elapsed_seconds": 8520,
        "quantity_sent": 100,
        "quantity_received": 100,
        "quantity_difference": 0,
    }


def test_stock_of_both_warehouses_is_served_without_a_token(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    sender = http.get(f"/api/warehouses/{SENDER}/products/{PRODUCT}").json()
    receiver = http.get(f"/api/warehouses/{RECEIVER}/products/{PRODUCT}").json()
    assert (sender["quantity"], sender["balance"], sender["short"]) == (0, -100, True)
    assert (receiver["quantity"], receiver["balance"], receiver["short"]) == (100, 100, False)
    assert {"warehouse_id", "product_id", "updated_at"} <= set(receiver)


def test_unknown_ids_are_404_and_malformed_ids_400(http: httpx.Client) -> None:
    assert http.get(f"/api/movements/{uuid.uuid4()}").status_code == 404
    response = http.get("/api/movements/not-a-uuid")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_uuid"
    assert http.get(f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}").status_code == 404
    assert http.get(f"/api/warehouses/x/products/{uuid.uuid4()}").status_code == 400


def test_public_reads_can_be_switched_off(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    with override_settings(WAREHOUSE_PUBLIC_READS=False):
        assert http.get(MOVEMENT).status_code == 401
        user = UserFactory.create()
        assert http.get(MOVEMENT, headers=auth_header(user)).status_code == 200


def test_a_committed_change_is_visible_within_one_second(http: httpx.Client) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair = {"warehouse_id": warehouse_id, "product_id": product_id}
    url = f"/api/warehouses/{warehouse_id}/products/{product_id}"
    assert http.get(url).status_code == 404  # the miss is cached too
    services.movements_ingest(bodies=[body(envelope(event="arrival", quantity=7, **pair))])
    assert http.get(url).json()["quantity"] == 7  # cached now
    services.movements_ingest(bodies=[body(envelope(event="arrival", quantity=5, **pair))])
    committed = time.monotonic()
    while http.get(url).json()["quantity"] != 12:
        assert time.monotonic() - committed < 1.0, "change not visible within 1 s"
        time.sleep(0.02)


def test_history_and_stock_list_need_a_token_and_filter(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    assert http.get("/api/movements").status_code == 401
    headers = auth_header(UserFactory.create())
    history = http.get("/api/movements", params={"warehouse_id": SENDER}, headers=headers)
    assert history.status_code == 200
    assert [row["event"] for row in history.json()["results"]] == ["departure"]
    since = http.get("/api/movements", params={"since": "2025-02-18T13:00:00Z"}, headers=headers)
    assert [row["event"] for row in since.json()["results"]] == ["arrival"]
    stock = http.get(f"/api/warehouses/{RECEIVER}/products", headers=headers).json()
    assert stock["count"] == 1 and stock["results"][0]["quantity"] == 100


def test_ingest_endpoint_is_staff_only_and_runs_the_pipeline(http: httpx.Client) -> None:
    departure, arrival = example_pair()
    payload = [departure, arrival, departure, {"specversion": "1.0"}]
    assert http.post("/api/movements/ingest", json=payload).status_code == 401
    user_headers = auth_header(UserFactory.create())
    assert http.post("/api/movements/ingest", json=payload, headers=user_headers).status_code == 403
    staff = auth_header(StaffFactory.create())
    response = http.post("/api/movements/ingest", json=payload, headers=staff)
    assert response.status_code == 200
    assert response.json()["outcomes"] == ["stored", "stored", "duplicate", "malformed"]
    assert LedgerEntry.objects.count() == 2
    assert http.post("/api/movements/ingest", json={"a": 1}, headers=staff).status_code == 400


def test_dead_letters_are_listed_and_replayed_by_staff_only(http: httpx.Client) -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body({**departure, "type": "wrong"}), body(departure)])
    letter = DeadLetter.objects.get()
    user_headers = auth_header(UserFactory.create())
    assert http.get("/api/dead-letters", headers=user_headers).status_code == 403
    staff = auth_header(StaffFactory.create())
    listed = http.get("/api/dead-letters", params={"reason": "malformed"}, headers=staff).json()
    assert [row["id"] for row in listed["results"]] == [letter.pk]
    replay = http.post(f"/api/dead-letters/{letter.pk}/replay", headers=staff)
    assert replay.status_code == 200
    assert replay.json()["replay_outcome"] == "malformed"
    assert http.post("/api/dead-letters/999999/replay", headers=staff).status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/movements/{movement_id}",
        "/api/warehouses/{warehouse_id}/products/{product_id}",
        "/api/warehouses/{warehouse_id}/products",
        "/api/movements",
        "/api/movements/ingest",
        "/api/dead-letters",
        "/api/dead-letters/{dead_letter_id}/replay",
    ],
)
def test_openapi_documents_every_endpoint(http: httpx.Client, path: str) -> None:
    schema = http.get("/api/schema/", params={"format": "json"}).json()
    assert path in schema["paths"]


def test_admin_lists_movements_stock_and_dead_letters(http: httpx.Client) -> None:
    from django.test import Client

    services.movements_ingest(bodies=[body(e) for e in example_pair()] + [b"junk"])
    client = Client()
    client.force_login(StaffFactory.create(is_superuser=True))
    for model in ("ledgerentry", "stock", "deadletter"):
        assert client.get(f"/admin/warehouse/{model}/").status_code == 200
    letter = DeadLetter.objects.get()
    response = client.post(
        "/admin/warehouse/deadletter/",
        {"action": "replay", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert response.status_code == 200
    letter.refresh_from_db()
    assert letter.replay_outcome == "malformed" and letter.replayed_at is not None


def test_the_fast_path_answers_exactly_like_the_django_view(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    token = auth_header(UserFactory.create())  # a token sends the request through DRF
    for path in (
        MOVEMENT,
        f"/api/warehouses/{SENDER}/products/{PRODUCT}",
        f"/api/movements/{uuid.uuid4()}",
        f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}",
    ):
        fast, full = http.get(path), http.get(path, headers=token)
        cached = http.get(path)  # from the cache entry (straight from Redis when configured)
        assert (fast.status_code, fast.json()) == (full.status_code, full.json())
        assert (cached.status_code, cached.json()) == (full.status_code, full.json())
        assert fast.headers["content-type"] == "application/json"
        assert fast.headers["x-served-by"] == "warehouse-fastpath"
        assert "x-served-by" not in full.headers
    with override_settings(WAREHOUSE_READ_FASTPATH=False):
        response = http.get(MOVEMENT)
        assert response.json()["status"] == "completed"
        assert "x-served-by" not in response.headers
