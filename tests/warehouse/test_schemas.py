"""Envelope validation: pure, no database."""

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.warehouse.factories import body, example_pair
from warehouse.schemas import EnvelopeInvalid, envelope_build, envelope_parse


def test_the_assignment_pair_parses_with_one_movement_and_two_keys() -> None:
    departure, arrival = (envelope_parse(body(e)) for e in example_pair())
    assert departure.id == arrival.id
    assert departure.movement_id == arrival.movement_id
    assert departure.key != arrival.key
    assert departure.delta == -100 and arrival.delta == 100
    assert (arrival.timestamp - departure.timestamp).total_seconds() == 8520
    assert departure.time.year == 2025


def _mutate(path: str, value: Any) -> bytes:
    envelope, _ = example_pair()
    target = envelope
    *parents, leaf = path.split(".")
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return body(envelope)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("data.event", "teleport", "unknown event"),
        ("type", "ru.retail.other", "type"),
        ("specversion", "0.3", "specversion"),
        ("data.movement_id", "not-a-uuid", "not a UUID"),
        ("data.warehouse_id", 12, "wrong type"),
        ("data.timestamp", "2025-02-18T12:12:56", "no time zone"),
        ("data.timestamp", "yesterday", "ISO 8601"),
        ("data.quantity", 0, "positive"),
        ("data.quantity", -5, "positive"),
        ("data.quantity", 1.5, "wrong type"),
        ("data.quantity", True, "wrong type"),
        ("time", "1737439421623", "wrong type"),
        ("data", KeyError, "missing field 'data'"),
        ("id", KeyError, "missing field 'id'"),
    ],
)
def test_malformed_envelopes_are_rejected_with_a_reason(
    path: str, value: Any, fragment: str
) -> None:
    with pytest.raises(EnvelopeInvalid) as raised:
        envelope_parse(_mutate(path, value))
    assert raised.value.reason == "malformed"
    assert fragment in raised.value.detail


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b"null", b"\xff\xfe", b"{}"])
def test_non_envelope_bodies_are_rejected(raw: bytes) -> None:
    with pytest.raises(EnvelopeInvalid):
        envelope_parse(raw)


def test_the_fingerprint_ignores_the_send_time_but_not_the_quantity() -> None:
    departure, _ = example_pair()
    original = envelope_parse(body(departure))
    departure["time"] += 5000
    assert envelope_parse(body(departure)).fingerprint == original.fingerprint
    departure["data"]["quantity"] = 99
    assert envelope_parse(body(departure)).fingerprint != original.fingerprint


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_any_json_document_is_either_an_envelope_or_invalid(document: Any) -> None:
    with contextlib.suppress(EnvelopeInvalid):
        envelope_parse(json.dumps(document))


@given(st.binary(max_size=300))
def test_any_bytes_are_either_an_envelope_or_invalid(raw: bytes) -> None:
    with contextlib.suppress(EnvelopeInvalid):
        envelope_parse(raw)


@given(
    st.uuids(),
    st.uuids(),
    st.uuids(),
    st.sampled_from(["departure", "arrival"]),
    st.integers(min_value=1, max_value=2**31 - 1),
    st.datetimes(timezones=st.timezones()).filter(lambda d: 1971 < d.year < 9000),
)
def test_built_envelopes_round_trip(
    movement_id: Any, warehouse_id: Any, product_id: Any, event: str, quantity: int, when: Any
) -> None:
    built = envelope_build(
        envelope_id=movement_id,
        source="WH-1",
        event=event,
        movement_id=movement_id,
        warehouse_id=warehouse_id,
        product_id=product_id,
        quantity=quantity,
        timestamp=when,
        sent_millis=1737439421623,
    )
    parsed = envelope_parse(json.dumps(built))
    assert (parsed.movement_id, parsed.event, parsed.quantity) == (movement_id, event, quantity)
    assert parsed.warehouse_id == warehouse_id and parsed.product_id == product_id
    assert abs((parsed.timestamp - when).total_seconds()) < 1
