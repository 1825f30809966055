"""The ingest pipeline against the real database (SQLite or PostgreSQL)."""

import io
import itertools
import json
import uuid
from typing import Any

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.exceptions import PreconditionFailed
from tests.warehouse.factories import EPOCH, body, envelope, example_pair
from warehouse import read_cache, selectors, services
from warehouse.models import DeadLetter, LedgerEntry, Stock
from warehouse.schemas import message_key
from warehouse.simulator import Simulation

pytestmark = pytest.mark.django_db


def test_the_assignment_pair_is_one_completed_movement() -> None:
    departure, arrival = example_pair()
    result = services.movements_ingest(bodies=[body(departure), body(arrival)])
    assert result.outcomes == ["stored", "stored"]
    view = selectors.movement_view(list(LedgerEntry.objects.all()))
    assert view is not None
    assert view["movement_id"] == "c6290746-790e-43fa-8270-014dc90e02e0"
    assert view["sender"] == {
        "warehouse_id": "25718666-6af6-4281-b5a6-3016e36fa557",
        "source": "WH-3322",
    }
    assert view["receiver"] == {
        "warehouse_id": "c1d70455-7e14-11e9-812a-70106f431230",
        "source": "WH-3423",
    }
    assert view["elapsed_seconds"] == 8520
    assert view["quantity_difference"] == 0
    assert view["status"] == "completed"


def test_the_arrival_sharing_the_departures_envelope_id_is_not_dropped() -> None:
    departure, arrival = example_pair()
    services.movements_ingest(bodies=[body(departure)])
    result = services.movements_ingest(bodies=[body(arrival)])
    assert result.outcomes == ["stored"]
    assert LedgerEntry.objects.count() == 2


def test_status_follows_which_events_arrived() -> None:
    _departure, arrival = example_pair()
    services.movements_ingest(bodies=[body(arrival)])
    movement_id = uuid.UUID(arrival["data"]["movement_id"])
    found = selectors.movement_body_get(movement_id=movement_id)
    assert found is not None and json.loads(found)["status"] == "arrived"
    arrival_only = selectors.movement_view(list(LedgerEntry.objects.all()))
    assert arrival_only is not None and arrival_only["sender"] is None
    assert arrival_only["elapsed_seconds"] is None


def test_a_quantity_difference_is_an_anomaly() -> None:
    departure, arrival = example_pair()
    arrival["data"]["quantity"] = 90
    services.movements_ingest(bodies=[body(departure), body(arrival)])
    view = selectors.movement_view(list(LedgerEntry.objects.all()))
    assert view is not None
    assert (view["status"], view["quantity_difference"]) == ("anomaly", 10)


def test_duplicates_are_acknowledged_counted_and_change_nothing() -> None:
    departure, arrival = example_pair()
    services.movements_ingest(bodies=[body(departure), body(arrival), body(departure)])
    before = list(Stock.objects.order_by("pk").values_list("balance", flat=True))
    result = services.movements_ingest(bodies=[body(departure), body(arrival)])
    assert result.outcomes == ["duplicate", "duplicate"]
    assert list(Stock.objects.order_by("pk").values_list("balance", flat=True)) == before
    assert sorted(LedgerEntry.objects.values_list("duplicates", flat=True)) == [1, 2]
    assert DeadLetter.objects.count() == 0


def test_same_key_with_another_payload_is_dead_lettered_as_conflict() -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body(departure)])
    departure["data"]["quantity"] = 101
    result = services.movements_ingest(bodies=[body(departure)])
    assert result.outcomes == ["conflict"]
    letter = DeadLetter.objects.get()
    assert letter.reason == "conflict" and letter.event == "departure"
    assert Stock.objects.get().balance == -100


def test_a_conflict_inside_one_batch_keeps_the_first_copy() -> None:
    departure, _ = example_pair()
    changed = {**departure, "data": {**departure["data"], "quantity": 7}}
    result = services.movements_ingest(bodies=[body(departure), body(changed)])
    assert result.outcomes == ["stored", "conflict"]
    assert Stock.objects.get().balance == -100


def test_malformed_messages_are_dead_lettered_and_valid_ones_in_the_batch_stored() -> None:
    departure, arrival = example_pair()
    poison = [b"not json", b'{"specversion": "1.0"}', body({**departure, "type": "x"})]
    result = services.movements_ingest(
        bodies=[poison[0], body(departure), *poison[1:], body(arrival)]
    )
    assert result.outcomes == ["malformed", "stored", "malformed", "malformed", "stored"]
    letters = DeadLetter.objects.order_by("pk")
    assert [letter.reason for letter in letters] == ["malformed"] * 3
    assert letters[0].body == "not json"
    assert "type" in letters[2].detail
    assert LedgerEntry.objects.count() == 2


def test_every_message_ends_in_exactly_one_place() -> None:
    simulation = Simulation(movements=30, duplicate_rate=0.3, poison_rate=0.1, shuffle=True)
    bodies = simulation.movement_bodies()
    result = services.movements_ingest(bodies=bodies)
    stored = LedgerEntry.objects.count()
    duplicates = sum(LedgerEntry.objects.values_list("duplicates", flat=True))
    assert stored == 60
    assert stored + duplicates + DeadLetter.objects.count() == len(bodies)
    assert result.stored + result.duplicates + result.dead_letters == len(bodies)


def test_stock_never_shows_below_zero_but_keeps_the_signed_balance() -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    services.movements_ingest(
        bodies=[
            body(
                envelope(
                    event="departure", quantity=5, warehouse_id=warehouse_id, product_id=product_id
                )
            )
        ]
    )
    found = selectors.stock_body_get(warehouse_id=warehouse_id, product_id=product_id)
    assert found is not None
    view = json.loads(found)
    assert (view["quantity"], view["balance"], view["short"]) == (0, -5, True)


@override_settings(WAREHOUSE_STRICT_STOCK=True)
def test_strict_stock_dead_letters_departures_beyond_stock() -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair = {"warehouse_id": warehouse_id, "product_id": product_id}
    result = services.movements_ingest(
        bodies=[
            body(envelope(event="arrival", quantity=10, **pair)),
            body(envelope(event="departure", quantity=8, **pair)),
            body(envelope(event="departure", quantity=3, **pair)),
        ]
    )
    assert result.outcomes == ["stored", "stored", "insufficient_stock"]
    assert Stock.objects.get().balance == 2
    assert DeadLetter.objects.get().reason == "insufficient_stock"


def test_replaying_a_fixed_dead_letter_stores_it_once() -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body(departure)])
    departure["data"]["quantity"] = 50
    services.movements_ingest(bodies=[body(departure)])
    letter = DeadLetter.objects.get()
    replayed = services.dead_letter_replay(dead_letter_id=letter.pk)
    assert replayed.replay_outcome == "conflict"
    LedgerEntry.objects.all().delete()
    Stock.objects.all().delete()
    replayed = services.dead_letter_replay(dead_letter_id=letter.pk)
    assert replayed.replay_outcome == "stored"
    assert Stock.objects.get().balance == -50
    with pytest.raises(PreconditionFailed):
        services.dead_letter_replay(dead_letter_id=letter.pk)


def test_verify_command_reports_stock_equal_to_the_ledger_and_rebuilds_it() -> None:
    services.movements_ingest(bodies=Simulation(movements=20).movement_bodies())
    out = io.StringIO()
    call_command("warehouse_verify_stock", stdout=out)
    assert "stock == sum(ledger)" in out.getvalue()
    Stock.objects.filter(pk=Stock.objects.first().pk).update(balance=12345)  # type: ignore[union-attr]
    with pytest.raises(CommandError):
        call_command("warehouse_verify_stock", stdout=io.StringIO(), stderr=io.StringIO())
    call_command("warehouse_verify_stock", "--rebuild", stdout=io.StringIO())
    assert selectors.stock_mismatches() == []


def test_rebuilding_stock_rewrites_its_cache_entries_and_leaves_the_rest_of_the_cache(
    django_capture_on_commit_callbacks: Any,
) -> None:
    kept, gone = (uuid.uuid4(), uuid.uuid4()), (uuid.uuid4(), uuid.uuid4())
    with django_capture_on_commit_callbacks(execute=True):
        services.movements_ingest(
            bodies=[body(envelope(quantity=5, warehouse_id=kept[0], product_id=kept[1]))]
        )
    Stock.objects.update(balance=999)  # drifted from the ledger, and cached so
    Stock.objects.create(warehouse_id=gone[0], product_id=gone[1], balance=3, updated_at=EPOCH)
    cache.delete(read_cache.stock_cache_key(str(kept[0]), str(kept[1])))
    drifted = [selectors.stock_body_get(warehouse_id=w, product_id=p) for w, p in (kept, gone)]
    cache.set("not-the-warehouse's", "kept", 60)
    with django_capture_on_commit_callbacks(execute=True):
        services.stock_rebuild()
    assert [json.loads(view)["quantity"] for view in drifted if view] == [999, 3]
    rebuilt = selectors.stock_body_get(warehouse_id=kept[0], product_id=kept[1])
    assert rebuilt is not None and json.loads(rebuilt)["quantity"] == 5
    assert selectors.stock_body_get(warehouse_id=gone[0], product_id=gone[1]) is None
    assert cache.get("not-the-warehouse's") == "kept"


# --- property: order and duplicates do not matter ----------------------------------------

_SIM = Simulation(seed=7, warehouses=3, products=2, movements=4)
_BODIES = _SIM.movement_bodies()


class _Rollback(Exception):
    pass


def _state_after(batches: list[list[bytes]]) -> tuple[Any, Any]:
    captured: dict[str, Any] = {}
    try:
        with transaction.atomic():
            for batch in batches:
                services.movements_ingest(bodies=batch)
            captured["stock"] = sorted(
                Stock.objects.values_list("warehouse_id", "product_id", "balance")
            )
            movement_ids = set(LedgerEntry.objects.values_list("movement_id", flat=True))
            captured["movements"] = sorted(
                (
                    selectors.movement_view(list(LedgerEntry.objects.filter(movement_id=m)))
                    for m in movement_ids
                ),
                key=lambda view: view["movement_id"] if view else "",
            )
            raise _Rollback
    except _Rollback:
        pass
    return captured["stock"], captured["movements"]


_REFERENCE: dict[str, Any] = {}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    order=st.permutations(range(len(_BODIES))),
    copies=st.lists(st.integers(0, len(_BODIES) - 1), max_size=12),
    cuts=st.lists(st.integers(1, len(_BODIES) + 11), max_size=4),
)
def test_any_order_and_any_duplicates_give_the_same_stock_and_movements(
    order: list[int], copies: list[int], cuts: list[int]
) -> None:
    if "state" not in _REFERENCE:
        _REFERENCE["state"] = _state_after([_BODIES])
    stream = [_BODIES[i] for i in order]
    for position, index in enumerate(copies):
        stream.insert((position * 7) % (len(stream) + 1), _BODIES[index])
    edges = sorted({0, len(stream), *[c for c in cuts if c < len(stream)]})
    batches = [stream[a:b] for a, b in itertools.pairwise(edges)]
    assert _state_after(batches) == _REFERENCE["state"]


def test_a_redelivered_batch_is_recognised_by_its_message_keys_and_changes_nothing() -> None:
    departure, arrival = example_pair()
    bodies = [body(departure), b"not json", body(arrival), body(departure), b"not json"]
    keys = [message_key(raw, f"m{index}") for index, raw in enumerate(bodies)]
    first = services.movements_ingest(bodies=bodies, keys=keys)
    assert first.outcomes == ["stored", "malformed", "stored", "duplicate", "malformed"]
    again = services.movements_ingest(bodies=bodies, keys=keys)
    assert again.outcomes == ["redelivered"] * len(bodies)
    assert (again.stored, again.duplicates, again.dead_letters) == (0, 0, 0)
    assert DeadLetter.objects.count() == 2
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == 1
    # The same body as a new message (another message_id) is a real duplicate.
    later = services.movements_ingest(bodies=[bodies[0]], keys=[message_key(bodies[0], "m9")])
    assert later.outcomes == ["duplicate"]
    assert sum(LedgerEntry.objects.values_list("duplicates", flat=True)) == 2


def test_without_a_message_id_identical_bodies_are_one_message() -> None:
    departure, _ = example_pair()
    raw = body(departure)
    result = services.movements_ingest(bodies=[raw, raw], keys=[message_key(raw)] * 2)
    assert result.outcomes == ["stored", "redelivered"]
    assert LedgerEntry.objects.get().duplicates == 0


def test_a_conflict_redelivered_is_not_dead_lettered_twice() -> None:
    departure, _ = example_pair()
    services.movements_ingest(bodies=[body(departure)])
    changed = body({**departure, "data": {**departure["data"], "quantity": 5}})
    key = message_key(changed, "c1")
    assert services.movements_ingest(bodies=[changed], keys=[key]).outcomes == ["conflict"]
    assert services.movements_ingest(bodies=[changed], keys=[key]).outcomes == ["redelivered"]
    assert DeadLetter.objects.get().reason == "conflict"
