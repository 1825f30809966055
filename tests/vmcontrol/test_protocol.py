"""The pure wire format: no sockets, no database."""

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcontrol.protocol import (
    MAX_FRAME_BYTES,
    Inventory,
    LineSplitter,
    ProtocolError,
    decode_frame,
    decode_server_frame,
    encode_frame,
    error_frame,
    inventory_parse,
)

INVENTORY = {"cpu_cores": 2, "ram_mb": 1024, "disks": [{"name": "root", "size_gb": 10}]}


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_hello_with_inventory_is_parsed_into_an_inventory() -> None:
    decoded = decode_frame(frame(type="hello", id="1", protocol=1, vm_id=3, inventory=INVENTORY))
    assert decoded["id"] == "1" and decoded["vm_id"] == 3
    assert isinstance(decoded["inventory"], Inventory)
    assert decoded["inventory"].as_dict() == INVENTORY


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"nope", "bad_frame"),
        (b"\xc3\x28", "bad_frame"),
        (b"42", "bad_frame"),
        (b'{"type": 7}', "bad_frame"),
        (b'{"type": "warp"}', "unknown_type"),
        (b'{"type": "ping", "id": {"x": 1}}', "bad_frame"),
        (b'{"type": "hello", "protocol": true}', "bad_frame"),
        (b'{"type": "auth", "vm_id": 0, "token": "t"}', "bad_frame"),
        (b'{"type": "auth", "vm_id": 1, "token": ""}', "bad_frame"),
        (b'{"type": "enroll", "secret": "s"}', "bad_frame"),
        (b'{"type": "result", "id": "c", "ok": "yes"}', "bad_frame"),
        (b'{"type": "result", "id": "c", "ok": true, "data": []}', "bad_frame"),
        (
            b'{"type": "inventory", "inventory": {"cpu_cores": 1, "ram_mb": 1, "disks": [1]}}',
            "bad_frame",
        ),
    ],
)
def test_malformed_frames_are_refused_with_a_code(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_frame(raw)
    assert refused.value.code == code


def test_known_type_not_yet_allowed_is_refused_before_its_fields_are_checked() -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_frame(b'{"type": "inventory", "inventory": 5}', allowed={"hello"})
    assert refused.value.code == "not_authorized"


def test_duplicate_disk_names_are_refused() -> None:
    with pytest.raises(ProtocolError):
        inventory_parse({"cpu_cores": 1, "ram_mb": 1, "disks": [{"name": "a", "size_gb": 1}] * 2})


def test_request_id_is_echoed_in_errors() -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_frame(b'{"type": "auth", "id": "r9", "vm_id": "x", "token": "t"}')
    assert refused.value.frame_id == "r9"
    assert error_frame("bad_frame", "m", "r9") == {
        "type": "error",
        "code": "bad_frame",
        "message": "m",
        "id": "r9",
    }


def test_oversize_frame_is_refused_and_closes() -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_frame(b"{" + b" " * MAX_FRAME_BYTES + b"}")
    assert refused.value.code == "frame_too_large" and refused.value.close


def test_encode_is_one_compact_line_and_refuses_oversize() -> None:
    assert encode_frame({"type": "pong", "id": 1}) == b'{"type":"pong","id":1}\n'
    with pytest.raises(ValueError):
        encode_frame({"type": "x", "pad": "y" * MAX_FRAME_BYTES})


def test_splitter_joins_partial_lines_and_skips_blank_ones() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert splitter.feed(b":3}\n") == [b'{"c":3}']


def test_splitter_refuses_a_line_growing_past_the_limit_without_a_newline() -> None:
    splitter = LineSplitter(max_bytes=100)
    splitter.feed(b"x" * 90)
    with pytest.raises(ProtocolError) as refused:
        splitter.feed(b"x" * 20)
    assert refused.value.close


def test_server_frames_are_checked_by_the_agent() -> None:
    assert decode_server_frame(b'{"type":"pong"}')["type"] == "pong"
    with pytest.raises(ProtocolError):
        decode_server_frame(b'{"type":"hello"}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "enroll", "auth", "ping", "inventory", "result", "x"])},
    optional={
        "id": json_values,
        "protocol": json_values,
        "vm_id": json_values,
        "token": json_values,
        "secret": json_values,
        "ok": json_values,
        "inventory": json_values,
        "data": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@settings(max_examples=400, deadline=None)
@given(frame_like)
def test_fuzz_frame_shaped_json_is_accepted_or_refused_cleanly(value: dict[str, Any]) -> None:
    try:
        decoded = decode_frame(json.dumps(value).encode())
    except ProtocolError as error:
        assert error.code in {"bad_frame", "unknown_type"}
    else:
        assert decoded["type"] == value["type"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_splitter_never_loses_a_complete_line(chunks: list[bytes]) -> None:
    splitter = LineSplitter()
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
    whole = b"".join(chunks)
    expected = [line for line in whole.split(b"\n")[:-1] if line.strip()]
    assert lines == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"type": "auth", "vm_id": 3, "token": "t"}', {"id": None, "inventory": None}),
        (b'{"type": "hello", "protocol": 1}', {"id": None, "vm_id": None, "inventory": None}),
        (
            b'{"type": "enroll", "secret": "s", "inventory": {"cpu_cores": 1, "ram_mb": 1}}',
            {"name": None},
        ),
        (b'{"type": "result", "id": "c", "ok": true}', {"data": None, "error": None}),
        (b'{"type": "ping", "extra": [1]}', {"id": None}),
    ],
)
def test_decoded_frames_hold_every_field_of_their_type_and_nothing_else(
    raw: bytes, expected: dict[str, Any]
) -> None:
    """Handlers index frames directly; an absent optional field is there as None (issue 10
    item 3: a second `auth` without `id` crashed on `frame["id"]`)."""
    decoded = decode_frame(raw)
    assert expected.items() <= decoded.items()
    assert "extra" not in decoded


def test_a_refused_string_value_keeps_the_frames_valid_id_for_the_error() -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_frame(b'{"type": "enroll", "id": "e1", "secret": "\\udc00"}')
    assert (refused.value.field, refused.value.reason, refused.value.frame_id) == (
        "secret",
        "encoding",
        "e1",
    )
    with pytest.raises(ProtocolError) as refused:
        decode_frame(b'{"type": "enroll", "id": "e\\u0000", "secret": "s"}')
    assert (refused.value.field, refused.value.frame_id) == ("id", None)
