"""Envelope validation: pure, no database."""

import contextlib
import json
from datetime import datetime, timedelta, timezone
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


ARABIC_UUID = "\u0664\u0667\u0660\u0665\u0662\u0660\u0664f-498f-4f96-b4ba-df17fb56bf55"
FULLWIDTH_TIMESTAMP = "\uff12\uff10\uff12\uff15-02-18T12:12:56Z"


@pytest.mark.parametrize(
    ("path", "value", "field", "code"),
    [
        # item 4 of issue 10 and its siblings: moments that leave the datetime range in UTC
        ("data.timestamp", "0001-01-01T00:00:00+01:00", "data.timestamp", "range"),
        ("data.timestamp", "9999-12-31T23:59:59-01:00", "data.timestamp", "range"),
        ("time", "0001-01-01T00:30:00+00:45", "time", "range"),
        ("time", 10**20, "time", "range"),
        ("time", -(10**20), "time", "range"),
        ("time", 2**63, "time", "range"),
        ("time", 1737439421623.5, "time", "type"),
        ("time", "1737439421623", "time", "format"),
        ("time", True, "time", "type"),
        ("data.timestamp", "2025-02-18T12:12:56", "data.timestamp", "naive"),
        ("data.timestamp", "yesterday", "data.timestamp", "format"),
        ("data.timestamp", "2025-02-30T12:12:56Z", "data.timestamp", "format"),
        ("data.timestamp", FULLWIDTH_TIMESTAMP, "data.timestamp", "format"),
        ("data.timestamp", 1737439421623, "data.timestamp", "type"),
        ("data.timestamp", "2025-02-18T12:12:56Z\ud800", "data.timestamp", "encoding"),
        # quantities: int32 column, positive, JSON integers only
        ("data.quantity", 0, "data.quantity", "range"),
        ("data.quantity", -5, "data.quantity", "range"),
        ("data.quantity", 2**31, "data.quantity", "range"),
        ("data.quantity", 2**63, "data.quantity", "range"),
        ("data.quantity", 1.5, "data.quantity", "type"),
        ("data.quantity", 1.0, "data.quantity", "type"),
        ("data.quantity", True, "data.quantity", "type"),
        ("data.quantity", "100", "data.quantity", "type"),
        ("data.quantity", "\u0661\u0660", "data.quantity", "type"),
        ("data.quantity", None, "data.quantity", "required"),
        # UUIDs: canonical ASCII only
        ("data.movement_id", "not-a-uuid", "data.movement_id", "format"),
        ("data.movement_id", ARABIC_UUID, "data.movement_id", "format"),
        (
            "data.product_id",
            "{4705204f-498f-4f96-b4ba-df17fb56bf55}",
            "data.product_id",
            "too_long",
        ),
        ("data.product_id", " 4705204f498f4f96b4badf17fb56bf55", "data.product_id", "format"),
        ("data.warehouse_id", 12, "data.warehouse_id", "type"),
        ("id", "b3b53031-e83a-4654-87f5-b6b6fb09fd9\u0000", "id", "control"),
        # text
        ("source", "WH-\udc00", "source", "encoding"),
        ("source", "WH-\u0001", "source", "control"),
        ("source", "", "source", "blank"),
        ("source", "W" * 101, "source", "too_long"),
        ("source", ["WH-1"], "source", "type"),
        ("subject", "x\ud800", "subject", "encoding"),
        ("subject", "S" * 201, "subject", "too_long"),
        # closed sets
        ("data.event", "teleport", "data.event", "choice"),
        ("data.event", "Departure", "data.event", "choice"),
        ("type", "ru.retail.other", "type", "choice"),
        ("specversion", "0.3", "specversion", "choice"),
        ("specversion", 1.0, "specversion", "choice"),
        ("datacontenttype", "text/plain", "datacontenttype", "choice"),
        # shape
        ("data", KeyError, "data", "required"),
        ("data", [1, 2], "data", "type"),
        ("id", KeyError, "id", "required"),
        ("data.event", KeyError, "data.event", "required"),
    ],
)
def test_malformed_envelopes_are_rejected_naming_the_field_and_why(
    path: str, value: Any, field: str, code: str
) -> None:
    with pytest.raises(EnvelopeInvalid) as raised:
        envelope_parse(_mutate(path, value))
    assert raised.value.reason == "malformed"
    assert (raised.value.field, raised.value.code) == (field, code), raised.value.detail
    assert raised.value.detail.startswith(f"{field}: ")


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


@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
def test_a_data_timestamp_is_either_storable_or_malformed_for_its_range(
    moment: datetime, offset_minutes: int
) -> None:
    departure, _ = example_pair()
    zone = timezone(timedelta(minutes=offset_minutes))
    departure["data"]["timestamp"] = moment.replace(tzinfo=zone).isoformat()
    try:
        parsed = envelope_parse(body(departure))
    except EnvelopeInvalid as exc:
        assert (exc.field, exc.code) == ("data.timestamp", "range")
        assert moment.year in (1, 9999)
    else:
        assert parsed.timestamp.utcoffset() == timedelta(0)
        assert len(parsed.fingerprint) == 64


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_an_epoch_time_is_either_storable_or_malformed_for_its_range(millis: int) -> None:
    departure, _ = example_pair()
    departure["time"] = millis
    try:
        parsed = envelope_parse(body(departure))
    except EnvelopeInvalid as exc:
        assert (exc.field, exc.code) == ("time", "range")
    else:
        assert 1 <= parsed.time.year <= 9999
