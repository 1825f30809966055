"""The bot's wire formats, without sockets: button `callback_data` round-trips, and anything
else a client can put there is an `InvalidValue`, never another exception."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.parsers import INT64_MAX, InvalidValue
from docbot import schemas
from docbot.bot.buttons import BUTTON_ACTIONS


@settings(derandomize=True, max_examples=300)
@given(st.one_of(st.text(max_size=80), st.none(), st.integers(), st.binary(max_size=8)))
def test_any_callback_data_parses_or_is_refused_as_invalid(raw: object) -> None:
    try:
        button = schemas.callback_parse(raw)
    except InvalidValue as exc:
        assert exc.field.startswith("callback_data")
        return
    assert len(button.args) == schemas.CALLBACK_FIELDS[button.kind]
    assert all(1 <= arg <= INT64_MAX for arg in button.args)


@settings(derandomize=True, max_examples=200)
@given(
    st.sampled_from(sorted(schemas.CALLBACK_FIELDS)),
    st.lists(st.integers(min_value=1, max_value=INT64_MAX), min_size=2, max_size=2),
)
def test_every_button_the_bot_builds_parses_back(kind: str, ids: list[int]) -> None:
    args = ids[: schemas.CALLBACK_FIELDS[kind]]
    if kind == "bp":
        args = [args[0], min(args[1], schemas.PAGE_MAX)]
    data = schemas.callback_data(kind, *args)
    assert len(data.encode()) <= schemas.CALLBACK_DATA_MAX_BYTES
    assert schemas.callback_parse(data) == schemas.Callback(kind, tuple(args))


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ("bp:3:-2", "callback_data.2", "range"),
        ("bp:3:0", "callback_data.2", "range"),
        ("bp:3:10001", "callback_data.2", "range"),
        ("d:\u0661", "callback_data.1", "format"),
        ("d:9223372036854775808", "callback_data.1", "range"),
        ("d:1:2", "callback_data", "format"),
        ("zz:1", "callback_data.kind", "choice"),
        ("d:1\x00", "callback_data", "control"),
        ("\u00e9" * 40, "callback_data", "too_long"),
        (None, "callback_data", "required"),
    ],
)
def test_callback_data_refusals_name_the_field_and_reason(
    raw: object, field: str, reason: str
) -> None:
    with pytest.raises(InvalidValue) as refused:
        schemas.callback_parse(raw)
    assert (refused.value.field, refused.value.reason) == (field, reason)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb.pdf", "a__b.pdf"),
        ("../x", "_x"),
        ("a\ud800b", "a_b"),
        ("  .hidden. ", "hidden"),
        ("\u043f.pdf", "\u043f.pdf"),
    ],
)
def test_file_names_are_cleaned_for_headers(raw: str, clean: str) -> None:
    assert schemas.file_name_clean(raw) == clean


def test_every_button_kind_has_one_named_action() -> None:
    assert set(BUTTON_ACTIONS) == set(schemas.CALLBACK_FIELDS)
