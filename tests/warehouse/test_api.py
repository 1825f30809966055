"""The HTTP interface over a real uvicorn socket."""

import json
import logging
import time
import uuid
from typing import Any

import httpx
import pytest
from django.core.cache import cache
from django.test import Client, override_settings
from django.utils import timezone

from tests.factories import StaffFactory, UserFactory, auth_header
from tests.warehouse.factories import (
    ARRIVAL,
    DEPARTURE,
    UNSTORABLE,
    body,
    envelope,
    example_pair,
    mutated,
    refused_by_json_parser,
    unstorable_id,
)
from warehouse import selectors, services
from warehouse.models import DeadLetter, LedgerEntry
from warehouse.services import ingest

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
    assert http.get(url).status_code == 404  # a miss leaves nothing in the cache
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


def _operator() -> Client:
    client = Client()
    client.force_login(StaffFactory.create(is_superuser=True))
    return client


def test_admin_lists_movements_stock_and_dead_letters(http: httpx.Client) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()] + [b"junk"])
    client = _operator()
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


def test_a_cached_read_answers_exactly_as_the_first_read_from_the_database(
    http: httpx.Client,
) -> None:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    token = auth_header(UserFactory.create())
    for path in (
        MOVEMENT,
        f"/api/warehouses/{SENDER}/products/{PRODUCT}",
        f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}",
    ):
        cache.clear()
        first, cached, with_token = http.get(path), http.get(path), http.get(path, headers=token)
        assert (cached.status_code, cached.content) == (first.status_code, first.content)
        assert (with_token.status_code, with_token.content) == (first.status_code, first.content)
        assert cached.headers["content-type"] == "application/json"
        indented = http.get(path, headers={"Accept": "application/json; indent=4"})
        assert indented.json() == first.json() and indented.content != first.content


# --- issue 10: bad input at the REST door -------------------------------------------------


def _staff(http: httpx.Client) -> dict[str, str]:
    return auth_header(StaffFactory.create())


def _post_json(
    http: httpx.Client, path: str, payload: Any, headers: dict[str, str]
) -> httpx.Response:
    """POST `payload` as JSON text with ASCII escapes (`\\ud800` as a JSON escape, which
    httpx's own encoder cannot send)."""
    return http.post(
        path,
        content=json.dumps(payload).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize("case", UNSTORABLE, ids=unstorable_id)
def test_an_envelope_that_can_never_be_stored_is_malformed_at_the_ingest_endpoint(
    http: httpx.Client, case: tuple[str, Any, str]
) -> None:
    path, value, field = case
    departure, arrival = example_pair()
    payload = [departure, mutated(path, value, base=arrival)]
    response = _post_json(http, "/api/movements/ingest", payload, _staff(http))
    if refused_by_json_parser(value):
        # NUL and lone surrogates are refused for the whole document, naming where.
        assert response.status_code == 400, response.text
        assert response.json()["error"]["details"]
        assert LedgerEntry.objects.count() == 0
        return
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["outcomes"] == ["stored", "malformed"]
    assert answer["problems"][0]["index"] == 1
    assert answer["problems"][0]["field"] == field
    letter = DeadLetter.objects.get()
    assert letter.reason == "malformed" and letter.detail.startswith(f"{field}: ")
    assert LedgerEntry.objects.count() == 1


@pytest.mark.parametrize("case", UNSTORABLE, ids=unstorable_id)
def test_replaying_a_dead_letter_that_can_never_be_stored_answers_malformed(
    http: httpx.Client, case: tuple[str, Any, str]
) -> None:
    path, value, field = case
    # As the consumer stored such a message before issue 10: reason `error`, the raw JSON text.
    letter = DeadLetter.objects.create(
        received_at=timezone.now(),
        body=json.dumps(mutated(path, value)),
        reason="error",
        detail="OverflowError: date value out of range",
    )
    response = http.post(f"/api/dead-letters/{letter.pk}/replay", headers=_staff(http))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["replay_outcome"], answer["reason"]) == ("malformed", "malformed")
    assert answer["detail"].startswith(f"{field}: ")
    assert LedgerEntry.objects.count() == 0


@pytest.mark.parametrize("item", [1, "x", None, True, [DEPARTURE], json.dumps(DEPARTURE)])
def test_an_ingest_item_that_is_not_an_object_is_malformed(http: httpx.Client, item: Any) -> None:
    response = http.post("/api/movements/ingest", json=[item, ARRIVAL], headers=_staff(http))
    assert response.status_code == 200, response.text
    assert response.json()["outcomes"] == ["malformed", "stored"]
    assert response.json()["problems"][0]["field"] == "envelope"


@pytest.mark.parametrize(
    "content",
    [
        b'[{"id": "\\ud800"}]',
        b'[{"source": "a\\u0000"}]',
        b"[" * 40 + b"]" * 40,
        b"\xff[]",
        b"[NaN]",
        b"[",
        b"{}",
        b"[]",
        b"null",
    ],
)
def test_an_ingest_body_that_is_not_an_array_of_documents_is_a_400(
    http: httpx.Client, content: bytes
) -> None:
    response = http.post(
        "/api/movements/ingest",
        content=content,
        headers={**_staff(http), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid", "bad_body")


def _failing_on(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Make the pipeline raise unexpectedly on envelopes from `source` (a bug's stand-in)."""
    parse = ingest._parse

    def failing(body: Any) -> Any:
        envelope = parse(body)
        if envelope.source == source:
            raise RuntimeError("internal detail that must stay internal")
        return envelope

    monkeypatch.setattr(ingest, "_parse", failing)


def test_a_batch_that_fails_unexpectedly_at_the_ingest_endpoint_is_retried_item_by_item(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_on(monkeypatch, "WH-BOOM")
    departure, arrival = example_pair()
    poison = {**envelope(), "source": "WH-BOOM"}
    payload = [departure, poison, arrival, departure]
    response = http.post("/api/movements/ingest", json=payload, headers=_staff(http))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["outcomes"] == ["stored", "error", "stored", "duplicate"]
    assert "internal detail" not in response.text
    assert LedgerEntry.objects.count() == 2
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == 1
    assert list(DeadLetter.objects.values_list("reason", flat=True)) == ["error"]


@pytest.mark.django_db
def test_replaying_dead_letters_from_the_admin_isolates_each_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _failing_on(monkeypatch, "WH-BOOM")
    departure, _ = example_pair()
    letters = [
        DeadLetter.objects.create(
            received_at=timezone.now(), body=json.dumps(document), reason="error"
        )
        for document in ({**envelope(), "source": "WH-BOOM"}, departure)
    ]
    client = _operator()
    response = client.post(
        "/admin/warehouse/deadletter/",
        {"action": "replay", "_selected_action": [letter.pk for letter in letters]},
        follow=True,
    )
    assert response.status_code == 200
    outcomes = [DeadLetter.objects.get(pk=letter.pk).replay_outcome for letter in letters]
    assert outcomes == ["error", "stored"]
    assert LedgerEntry.objects.count() == 1


NON_ASCII_UUID = "\u0664\u0667\u0660\u0665\u0662\u0660\u0664f-498f-4f96-b4ba-df17fb56bf55"


@pytest.mark.parametrize(
    "path",
    [
        f"/api/movements/{NON_ASCII_UUID}",
        "/api/movements/c6290746-790e-43fa-8270-014dc90e02e%00",
        "/api/movements/%ED%A0%80",
        f"/api/warehouses/{NON_ASCII_UUID}/products/{PRODUCT}",
        f"/api/warehouses/{SENDER}/products/{PRODUCT[:-1]}%00",
        f"/api/warehouses/{NON_ASCII_UUID}/products",
        "/api/warehouses/%00/products",
        "/api/warehouses/%01%02/products",
        f"/api/warehouses/{'f' * 5000}/products",
    ],
)
def test_ids_in_the_path_outside_the_uuid_charset_are_a_400(http: httpx.Client, path: str) -> None:
    token = auth_header(UserFactory.create())
    public = not path.endswith("/products")
    for headers in ({}, token) if public else (token,):
        response = http.get(path, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "bad_uuid"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"warehouse_id": NON_ASCII_UUID}, "warehouse_id"),
        ({"warehouse_id": f"{SENDER[:-1]}\x00"}, "warehouse_id"),
        ({"product_id": "\ufffd"}, "product_id"),  # what invalid UTF-8 decodes to
        ({"product_id": f" {PRODUCT}"}, "product_id"),
        ({"since": "2025-02-18T12:00:00"}, "since"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ({"until": "9999-12-31T23:59:59-01:00"}, "until"),
        ({"until": "\uff12\uff10\uff12\uff15-02-18T12:00:00Z"}, "until"),
        ({"since": "2025-02-18T12:00:00Z\x00"}, "since"),
        ({"limit": "\u0661\u0660"}, "limit"),
        ({"limit": str(2**63)}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "1e3"}, "offset"),
    ],
)
def test_history_filters_outside_their_kind_are_a_400_naming_the_field(
    http: httpx.Client, params: dict[str, str], field: str
) -> None:
    response = http.get("/api/movements", params=params, headers=auth_header(UserFactory.create()))
    assert response.status_code == 400, response.text
    assert field in json.dumps(response.json()["error"])


@pytest.mark.parametrize("reason", ["\x00", "malformed\x00", "\ufffd", "bogus", "\u0661"])
def test_a_dead_letter_reason_filter_outside_the_listed_reasons_is_a_400(
    http: httpx.Client, reason: str
) -> None:
    response = http.get("/api/dead-letters", params={"reason": reason}, headers=_staff(http))
    assert response.status_code == 400, response.text
    assert "reason" in response.json()["error"]["details"]


def _crash(**kwargs: Any) -> Any:
    raise RuntimeError("secret: database password is hunter2")


@pytest.mark.parametrize(
    ("selector", "path"),
    [
        ("stock_body_get", f"/api/warehouses/{SENDER}/products/{PRODUCT}"),
        ("movement_body_get", MOVEMENT),
    ],
)
def test_an_unexpected_failure_of_a_public_read_is_a_json_500_logged_once(
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    selector: str,
    path: str,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(selectors, selector, _crash)
    response = http.get(path, headers={"X-Request-ID": "fast-crash-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "fast-crash-1"
    assert response.json()["error"]["code"] == "server_error"
    assert "hunter2" not in response.text
    logged = [
        record
        for record in caplog.records
        if record.exc_info or (isinstance(record.msg, dict) and record.msg.get("exc_info"))
    ]
    assert len(logged) == 1
    assert "fast-crash-1" in caplog.text
    monkeypatch.undo()
    assert http.get(path).status_code == 404  # and the next request is served


@pytest.mark.parametrize(
    "query", ["product_id=%ED%A0%80", "warehouse_id=%00", "since=%FF", "until=2025%00"]
)
def test_history_filters_in_invalid_utf8_or_with_nul_are_a_400(
    http: httpx.Client, query: str
) -> None:
    response = http.get(f"/api/movements?{query}", headers=auth_header(UserFactory.create()))
    assert response.status_code == 400, response.text
