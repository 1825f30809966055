"""The warehouse read model (issue 12): one stock view shape for every door, cache keys in one
place, and only views read back from the cache."""

import json
import uuid
from typing import Any

import pytest
from django.core.cache import cache
from rest_framework.renderers import JSONRenderer

from tests.warehouse.factories import EPOCH, body, envelope
from warehouse import read_cache, selectors, services
from warehouse.models import Stock

pytestmark = pytest.mark.django_db


def test_the_stock_view_clamps_quantity_and_flags_a_short_balance() -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    view = read_cache.stock_view(
        warehouse_id=warehouse_id, product_id=product_id, balance=-5, updated_at=EPOCH
    )
    assert view == {
        "warehouse_id": str(warehouse_id),
        "product_id": str(product_id),
        "quantity": 0,
        "balance": -5,
        "short": True,
        "updated_at": EPOCH.isoformat(),
    }


def test_the_written_through_view_is_the_one_the_database_gives(
    django_capture_on_commit_callbacks: Any,
) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    arrival = envelope(quantity=7, warehouse_id=warehouse_id, product_id=product_id)
    with django_capture_on_commit_callbacks(execute=True):
        result = services.movements_ingest(bodies=[body(arrival)])
    key = read_cache.stock_cache_key(warehouse_id, product_id)
    written = cache.get(key)
    assert json.loads(written) == result.stock_changes[0]
    cache.delete(key)
    from_database = selectors.stock_body_get(warehouse_id=warehouse_id, product_id=product_id)
    row = Stock.objects.get(warehouse_id=warehouse_id, product_id=product_id)
    assert from_database == written == read_cache.body_of(read_cache.stock_view_of(row))
    assert cache.get(key) == written  # filled again by the read


def test_the_cached_body_is_what_drf_renders_for_the_view() -> None:
    view = {"warehouse_id": str(uuid.uuid4()), "quantity": 3, "short": False, "name": "Склад"}
    assert read_cache.body_of(view) == JSONRenderer().render(view)


@pytest.mark.parametrize("value", [None, "stale", "missing", 0, ["a list"]])
def test_anything_but_a_body_or_a_view_in_the_cache_is_a_miss(value: object) -> None:
    assert read_cache.body_or_miss(value) is None


def test_an_older_release_s_cached_view_is_answered_as_its_body() -> None:
    assert read_cache.body_or_miss({"quantity": 1}) == b'{"quantity":1}'


def test_keys_are_the_same_for_uuids_and_their_text() -> None:
    warehouse_id, product_id, movement_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert read_cache.stock_cache_key(warehouse_id, product_id) == read_cache.stock_cache_key(
        str(warehouse_id), str(product_id)
    )
    assert read_cache.movement_cache_key(movement_id) == f"wh:mv:{movement_id}"
