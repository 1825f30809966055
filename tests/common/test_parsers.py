"""The shared parsers (common/parsers.py): one judgement per kind of value, for every door."""

import json
import string
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import parsers
from common.exceptions import ValidationFailed
from common.parsers import InvalidValue

SURROGATES = [chr(code) for code in (0xD800, 0xDBFF, 0xDC00, 0xDFFF)]
# Arabic-Indic, fullwidth, superscript, extended Arabic-Indic, Devanagari, ideographic, math.
NON_ASCII_DIGITS = [
    "\u0661\u0660",
    "\uff11\uff10",
    "\u00b2",
    "\u06f1\u06f0",
    "\u0967\u0966",
    "\u3007",
    "\U0001d7d9\U0001d7d8",
]


def _reason(call) -> str:
    with pytest.raises(InvalidValue) as caught:
        call()
    assert isinstance(caught.value, ValidationFailed)
    assert caught.value.details == {
        caught.value.field: [caught.value.details[caught.value.field][0]]
    }
    return caught.value.reason


# --- text ---


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=50))
def test_clean_text_round_trips(value: str) -> None:
    assert parsers.text(value, field="name", max_length=50) == value


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("where", ["{}", "x{}", "{}x", "a{}b"])
def test_lone_surrogates_are_refused_as_encoding(surrogate: str, where: str) -> None:
    value = where.format(surrogate)
    assert _reason(lambda: parsers.text(value, field="text", max_length=100)) == "encoding"


@given(st.characters(min_codepoint=0, max_codepoint=0x1F))
def test_c0_controls_are_refused_on_a_single_line(control: str) -> None:
    assert _reason(lambda: parsers.text(f"a{control}b", field="t", max_length=9)) == "control"


@pytest.mark.parametrize("allowed", ["\t", "\n", "\r\n"])
def test_multiline_text_allows_tab_and_newlines_but_not_nul(allowed: str) -> None:
    assert parsers.text(f"a{allowed}b", field="t", max_length=9, multiline=True) == f"a{allowed}b"
    assert _reason(lambda: parsers.text("a\x00b", field="t", max_length=9, multiline=True)) == (
        "control"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [(None, "required"), (b"bytes", "type"), (5, "type"), ("", "blank"), ("x" * 11, "too_long")],
)
def test_text_refuses_missing_wrong_type_blank_and_overlong(value: object, reason: str) -> None:
    assert _reason(lambda: parsers.text(value, field="t", max_length=10)) == reason


def test_stripped_text_that_is_only_spaces_is_blank() -> None:
    assert _reason(lambda: parsers.text("   ", field="t", max_length=10, strip=True)) == "blank"
    assert parsers.text("  a ", field="t", max_length=10, strip=True) == "a"


@pytest.mark.parametrize("value", ["room-1", "a.b:c_d", "X" * 64])
def test_identifiers_in_their_charset_are_accepted(value: str) -> None:
    assert parsers.identifier(value, field="room", max_length=64) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a\x00b", "control"),
        ("a b", "format"),
        ("ключ", "format"),
        ("a/b", "format"),
        ("x" * 65, "too_long"),
        ("\udc00", "encoding"),
    ],
)
def test_identifiers_outside_their_charset_are_refused(value: str, reason: str) -> None:
    assert _reason(lambda: parsers.identifier(value, field="room", max_length=64)) == reason


# --- integers ---


@given(st.integers(min_value=0, max_value=parsers.INT64_MAX))
def test_integers_in_range_parse_from_numbers_and_ascii_strings(number: int) -> None:
    assert parsers.integer(number, field="id") == number
    assert parsers.integer(str(number), field="id") == number


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        *[(digits, "format") for digits in NON_ASCII_DIGITS],
        ("1_0", "format"),
        ("+1", "format"),
        (" 1", "format"),
        ("1 ", "format"),
        ("1e3", "format"),
        ("0x10", "format"),
        ("1.0", "format"),
        ("", "format"),
        ("-1", "range"),
        (-1, "range"),
        (str(parsers.INT64_MAX + 1), "range"),
        (parsers.INT64_MAX + 1, "range"),
        ("9" * 41, "format"),
        (1.0, "type"),
        (True, "type"),
        (None, "required"),
        ([1], "type"),
    ],
)
def test_integers_refuse_everything_but_ascii_digits_in_range(value: object, reason: str) -> None:
    assert _reason(lambda: parsers.integer(value, field="id")) == reason


def test_integer_bounds_and_kinds_are_per_field() -> None:
    assert parsers.integer("-5", field="n", min_value=-10) == -5
    assert _reason(lambda: parsers.integer(0, field="page", min_value=1)) == "range"
    assert _reason(lambda: parsers.integer(7, field="id", numbers=False)) == "type"
    assert _reason(lambda: parsers.integer("7", field="id", strings=False)) == "type"


# --- money ---


@given(st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False))
def test_money_accepts_ascii_decimals_with_two_places(amount: Decimal) -> None:
    assert parsers.money(f"{amount:f}", field="amount") == amount


@pytest.mark.parametrize(
    "value",
    [
        *NON_ASCII_DIGITS,
        "1_0",
        "10.000",
        "-10",
        "+10",
        "1e1",
        "1E1",
        " 10",
        "10 ",
        "10.",
        ".5",
        "NaN",
        "Infinity",
        "-Infinity",
        "0x10",
        "",
        "10,5",
    ],
)
def test_money_refuses_signs_exponents_separators_and_foreign_digits(value: str) -> None:
    assert _reason(lambda: parsers.money(value, field="amount")) == "format"


@pytest.mark.parametrize("value", [10, 10.5, Decimal("10"), True])
def test_money_refuses_json_numbers_unless_the_field_documents_them(value: object) -> None:
    assert _reason(lambda: parsers.money(value, field="amount")) == "type"


def test_money_json_numbers_are_judged_by_their_literal() -> None:
    document = parsers.json_document('{"a": 10.5, "b": 10.000, "c": 1e1, "d": 10}', exact=True)
    assert parsers.money(document["a"], field="a", numbers=True) == Decimal("10.50")
    assert parsers.money(document["d"], field="d", numbers=True) == Decimal("10.00")
    assert _reason(lambda: parsers.money(document["b"], field="b", numbers=True)) == "format"
    assert _reason(lambda: parsers.money(document["c"], field="c", numbers=True)) == "format"
    assert _reason(lambda: parsers.money(10.5, field="f", numbers=True)) == "type"


@pytest.mark.parametrize("digits", [27, 28, 29, 38, 40])
def test_money_with_many_digits_is_judged_exactly(digits: int) -> None:
    assert parsers.money("9" * digits, field="a") == Decimal("9" * digits)
    assert _reason(lambda: parsers.money("9" * digits, field="a", max_value=Decimal(10**6))) == (
        "range"
    )


def test_money_range_is_per_field() -> None:
    assert parsers.money("1", field="a", min_value=Decimal("1.00")) == Decimal("1.00")
    assert _reason(lambda: parsers.money("0.99", field="a", min_value=Decimal("1"))) == "range"
    assert _reason(lambda: parsers.money("100.01", field="a", max_value=Decimal("100"))) == "range"


# --- enums ---


def test_choices_compare_type_as_well_as_value() -> None:
    assert parsers.choice(1, field="state", choices={1: "open"}) == "open"
    assert parsers.choice("open", field="state", choices=["open", "closed"]) == "open"
    for value in (True, "1", 1.0, 99, -1, None):
        assert _reason(lambda value=value: parsers.choice(value, field="s", choices={1: "a"})) == (
            "choice"
        )
    assert _reason(lambda: parsers.choice("Open", field="s", choices=["open"])) == "choice"


# --- timestamps ---


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1),
)
def test_rfc3339_timestamps_round_trip_in_utc(naive: datetime, offset_minutes: int) -> None:
    moment = naive.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = moment.isoformat()
    parsed = parsers.timestamp(text, field="at")
    assert parsed == moment
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-31T12:00:00Z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31t12:00:00z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T15:00:00+03:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T12:00:00.123456789Z", datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T00:00:00-01:00", datetime(1, 1, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_accept_rfc3339(value: str, expected: datetime) -> None:
    assert parsers.timestamp(value, field="at") == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0001-01-01T00:00:00+01:00", "range"),
        ("9999-12-31T23:59:59-01:00", "range"),
        ("2026-01-31T12:00:00", "naive"),
        ("2026-02-30T12:00:00Z", "format"),
        ("2026-01-31T24:00:00Z", "format"),
        ("2026-01-31T12:00:00+24:00", "format"),
        ("2026-01-31", "format"),
        ("20260131T120000Z", "format"),
        ("\uff12\uff10\uff12\uff16-01-31T12:00:00Z", "format"),
        ("2026-01-31T12:00:00Z\x00", "format"),
        ("yesterday", "format"),
        (1767182400, "type"),
        (None, "required"),
    ],
)
def test_timestamps_refuse_naive_out_of_range_and_non_rfc3339(value: object, reason: str) -> None:
    assert _reason(lambda: parsers.timestamp(value, field="at")) == reason


def test_naive_timestamps_are_utc_only_where_the_field_says_so() -> None:
    assert parsers.timestamp("2026-01-31T12:00:00", field="at", naive_is_utc=True) == datetime(
        2026, 1, 31, 12, tzinfo=UTC
    )


def test_epoch_forms_are_range_checked() -> None:
    assert parsers.timestamp(0, field="time", epoch="ms") == datetime(1970, 1, 1, tzinfo=UTC)
    assert parsers.timestamp(1500, field="time", epoch="ms") == datetime(
        1970, 1, 1, 0, 0, 1, 500000, tzinfo=UTC
    )
    for value in (10**20, -(10**20), 2**63):
        assert _reason(lambda value=value: parsers.timestamp(value, field="t", epoch="ms")) == (
            "range"
        )
    assert _reason(lambda: parsers.timestamp(True, field="t", epoch="s")) == "type"
    assert _reason(lambda: parsers.timestamp(1.5, field="t", epoch="s")) == "type"


def test_timestamp_bounds_are_per_field() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert _reason(
        lambda: parsers.timestamp("2025-12-31T23:59:59Z", field="deadline", min_value=now)
    ) == ("range")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (parsers.PROTO_TIMESTAMP_MAX_SECONDS + 1, 0),
        (parsers.PROTO_TIMESTAMP_MIN_SECONDS - 1, 0),
        (0, -1),
        (0, 1_000_000_000),
    ],
)
def test_protobuf_timestamps_outside_their_range_are_refused(seconds: int, nanos: int) -> None:
    assert _reason(lambda: parsers.proto_timestamp(seconds, nanos, field="deadline")) == "range"


def test_protobuf_timestamp_edges_are_accepted() -> None:
    assert parsers.proto_timestamp(parsers.PROTO_TIMESTAMP_MAX_SECONDS, 999_999_999, field="d") == (
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    )
    assert parsers.proto_timestamp(parsers.PROTO_TIMESTAMP_MIN_SECONDS, 0, field="d") == datetime(
        1, 1, 1, tzinfo=UTC
    )


# --- JSON documents ---


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\udc00x", "x\\ud83d"])
@pytest.mark.parametrize("template", ['{"text": "%s"}', '{"%s": 1}', '[1, ["%s"]]', '"%s"'])
def test_json_documents_with_lone_surrogate_escapes_are_refused(escape: str, template: str) -> None:
    assert _reason(lambda: parsers.json_document(template % escape)) == "encoding"


def test_json_surrogate_pairs_are_fine_and_the_path_is_named() -> None:
    assert parsers.json_document('{"t": "\\ud83d\\ude00"}') == {"t": "😀"}
    with pytest.raises(InvalidValue) as caught:
        parsers.json_document('{"data": {"items": [{"name": "\\udc00"}]}}')
    assert caught.value.field == "data.items[0].name"


@pytest.mark.parametrize("document", ['{"t": "a\\u0000"}', '{"a\\u0000": 1}'])
def test_json_documents_with_nul_are_refused(document: str) -> None:
    assert _reason(lambda: parsers.json_document(document)) == "control"


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_json_is_refused_without_recursion(depth: int) -> None:
    assert _reason(lambda: parsers.json_document("[" * depth + "]" * depth)) == "too_deep"
    assert _reason(lambda: parsers.json_document('{"a":' * depth + "1" + "}" * depth)) == (
        "too_deep"
    )


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    assert parsers.json_document(json.dumps({"t": "[" * 100})) == {"t": "[" * 100}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "encoding"),
        (b"\xed\xa0\x80", "encoding"),
        ("NaN", "format"),
        ('{"a": Infinity}', "format"),
        ("{", "format"),
        ("", "format"),
        ("1" * 5000, "format"),
    ],
)
def test_json_documents_refuse_bad_bytes_and_syntax(raw: bytes | str, reason: str) -> None:
    assert _reason(lambda: parsers.json_document(raw)) == reason


def test_json_body_cap() -> None:
    assert _reason(lambda: parsers.json_document(b"[" + b"1," * 100 + b"1]", max_bytes=64)) == (
        "too_large"
    )


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(string.printable),
        lambda c: (
            st.lists(c, max_size=3) | st.dictionaries(st.text(string.ascii_letters), c, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_ordinary_json_round_trips(document: object) -> None:
    assert parsers.json_document(json.dumps(document)) == document
