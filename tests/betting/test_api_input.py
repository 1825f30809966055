"""The betting REST door under bad input (issue 10 items 5 and 11), over a real uvicorn socket.

Every value is judged by the shared parsers: a refusal is a 400 (404 for a path that does not
fit its converter) in the JSON error envelope naming the field, never a 500, and it writes
nothing. The NUL cases reach PostgreSQL in the real-services run, where they used to be a 500.
"""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from betting.models import AuditEntry, Bet, Event, IdempotencyKey
from tests.betting.factories import event_create
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.timeout(60)

#: Amounts (and coefficients) outside `^[0-9]+(\.[0-9]{1,2})?$`, as JSON values; a str holding
#: `\ud800` is sent as the raw JSON escape.
NOT_MONEY: list[object] = [
    "\u0661\u0660",  # Arabic-Indic digits: int() reads them as 10
    "\u06f1\u06f0",  # Extended Arabic-Indic
    "\uff11\uff10",  # fullwidth
    "\u0967\u0966",  # Devanagari
    "\u00b2",  # superscript two
    "1_0",  # Decimal("1_0") == 10
    "10.000",
    "10.001",
    "1e1",
    "1E1",
    "+10",
    "-10",
    " 10",
    "10 ",
    "10\t",
    "0x10",
    "10,00",
    "NaN",
    "sNaN",
    "Infinity",
    "-Infinity",
    "",
    "1" * 41,
    "\ud800",
    "10\u0000",
    "\u000110",
    True,
    None,
    [],
    {},
    ["10"],
    {"amount": "10"},
]

#: One of each kind, for the other money fields (same MoneyField, same parser).
NOT_MONEY_SAMPLE: list[object] = [
    "\u0661\u0660",
    "1_0",
    "1e1",
    "-1",
    "10.000",
    " 10",
    "\ud800",
    "10\u0000",
    "0",
    "1000.01",
]


def raw_json(body: dict[str, object]) -> str:
    """JSON text with non-ASCII and lone surrogates as \\u escapes (what an attacker sends)."""
    return json.dumps(body, ensure_ascii=True)


def post(
    http: httpx.Client, path: str, headers: dict[str, str], body: dict[str, object]
) -> httpx.Response:
    return http.post(
        path, content=raw_json(body), headers={**headers, "Content-Type": "application/json"}
    )


def assert_refused(response: httpx.Response, field: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in json.dumps(error["details"]), error
    assert "Traceback" not in response.text


@pytest.mark.parametrize("amount", NOT_MONEY, ids=repr)
def test_a_stake_that_is_not_an_ascii_decimal_is_refused_and_places_no_bet(
    http: httpx.Client, amount: object
) -> None:
    event = event_create()
    headers = auth_header(UserFactory.create())
    response = post(http, "/api/betting/bet", headers, {"event_id": event.id, "amount": amount})
    assert_refused(response, "amount")
    assert Bet.objects.count() == 0


@pytest.mark.parametrize(
    ("amount", "stored"),
    [
        ("1.00", "1.00"),
        ("10", "10.00"),
        ("10.5", "10.50"),
        ("010", "10.00"),
        ("10000.00", "10000.00"),
        ("0", None),
        ("0.00", None),
        ("0.99", None),
        ("10000.01", None),
        ("99999999999999999999", None),
        # Past the 28 digits of the default decimal context (found by the gRPC fuzz).
        ("9" * 27, None),
        ("9" * 38 + ".99", None),
        ("9" * 40, None),
    ],
    ids=lambda value: f"{len(value)}-chars" if value and len(value) > 20 else repr(value),
)
def test_a_stake_is_accepted_only_within_the_configured_limits(
    http: httpx.Client, amount: str, stored: str | None
) -> None:
    event = event_create()
    response = post(
        http,
        "/api/betting/bet",
        auth_header(UserFactory.create()),
        {"event_id": event.id, "amount": amount},
    )
    if stored is None:
        assert_refused(response, "amount")
        assert Bet.objects.count() == 0
    else:
        assert response.status_code == 201, response.text
        assert response.json()["amount"] == stored
        assert Bet.objects.get().amount == Decimal(stored)


@pytest.mark.parametrize("coefficient", NOT_MONEY_SAMPLE, ids=repr)
def test_an_expected_coefficient_that_is_not_an_ascii_decimal_is_refused(
    http: httpx.Client, coefficient: object
) -> None:
    event = event_create()
    response = post(
        http,
        "/api/betting/bet",
        auth_header(UserFactory.create()),
        {"event_id": event.id, "amount": "10", "expected_coefficient": coefficient},
    )
    assert_refused(response, "expected_coefficient")
    assert Bet.objects.count() == 0


@pytest.mark.parametrize("coefficient", NOT_MONEY_SAMPLE, ids=repr)
def test_staff_cannot_set_a_coefficient_that_is_not_an_ascii_decimal(
    http: httpx.Client, coefficient: object
) -> None:
    event = event_create()
    response = post(
        http,
        f"/api/betting/events/{event.id}/odds",
        auth_header(StaffFactory.create()),
        {"coefficient": coefficient},
    )
    assert_refused(response, "coefficient")
    event.refresh_from_db()
    assert (event.coefficient, event.version) == (Decimal("1.75"), 1)


BAD_EVENT_IDS: list[object] = [
    "a b",
    "a\u0000b",
    "a\u0001b",
    "a\nb",
    "a\ud800",
    "\u00e9",
    "a/b",
    "x" * 65,
    "",
    7,
    None,
    ["ev-1"],
]


@pytest.mark.parametrize("event_id", BAD_EVENT_IDS, ids=repr)
def test_a_bet_on_an_event_id_outside_the_identifier_charset_is_refused(
    http: httpx.Client, event_id: object
) -> None:
    event_create()
    response = post(
        http,
        "/api/betting/bet",
        auth_header(UserFactory.create()),
        {"event_id": event_id, "amount": "10"},
    )
    assert_refused(response, "event_id")
    assert Bet.objects.count() == 0


def in_an_hour() -> str:
    return (timezone.now() + timedelta(hours=1)).isoformat()


def event_body(**overrides: object) -> dict[str, object]:
    return {"id": "e1", "name": "Final", "coefficient": "1.50", "deadline": in_an_hour()} | (
        overrides
    )


@pytest.mark.parametrize(
    "deadline",
    [
        "2020-01-01T00:00:00Z",  # past
        "2099-01-01T00:00:00",  # naive: was silently read as UTC
        "2099-01-01 00:00:00",
        "0001-01-01T00:00:00+01:00",  # leaves the range in UTC
        "9999-12-31T23:59:59-01:00",
        "2099-02-30T00:00:00Z",
        "2099-01-01T24:00:00Z",
        "2099-01-01",
        "tomorrow",
        "",
        "\uff12\uff10\uff19\uff19-01-01T00:00:00Z",
        "2099-01-01T00:00:00Z\u0000",
        "\ud800",
        4102444800,
        4102444800.0,
        True,
        None,
        ["2099-01-01T00:00:00Z"],
    ],
    ids=repr,
)
def test_an_event_deadline_that_is_past_naive_or_malformed_is_refused(
    http: httpx.Client, deadline: object
) -> None:
    staff = auth_header(StaffFactory.create())
    response = post(http, "/api/betting/events", staff, event_body(deadline=deadline))
    assert_refused(response, "deadline")
    assert not Event.objects.exists()


def test_an_event_deadline_must_be_ahead_and_is_stored_in_utc(http: httpx.Client) -> None:
    staff = auth_header(StaffFactory.create())
    moment = (timezone.now() - timedelta(seconds=1)).isoformat()
    assert_refused(
        post(http, "/api/betting/events", staff, event_body(deadline=moment)), "deadline"
    )
    assert not Event.objects.exists()
    response = post(
        http, "/api/betting/events", staff, event_body(deadline="2099-01-01T03:00:00+03:00")
    )
    assert response.status_code == 201, response.text
    assert Event.objects.get().deadline == datetime(2099, 1, 1, tzinfo=UTC)
    assert response.json()["deadline"] == "2099-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("id", value) for value in BAD_EVENT_IDS],
        ("name", ""),
        ("name", "   "),
        ("name", "a\u0000b"),
        ("name", "a\u0007b"),
        ("name", "two\nlines"),
        ("name", "a\udc00"),
        ("name", "x" * 201),
        ("name", 5),
        ("name", None),
        *[("coefficient", value) for value in NOT_MONEY_SAMPLE],
    ],
    ids=repr,
)
def test_an_event_with_a_bad_id_name_or_coefficient_is_refused(
    http: httpx.Client, field: str, value: object
) -> None:
    staff = auth_header(StaffFactory.create())
    response = post(http, "/api/betting/events", staff, event_body(**{field: value}))
    assert_refused(response, field)
    assert not Event.objects.exists()
    assert not AuditEntry.objects.exists()


EVENT_PATHS = [
    "/api/betting/events/{}/odds",
    "/api/betting/events/{}/finish",
    "/api/betting/events/{}/cancel",
]
BAD_PATH_IDS = ["a%00b", "%00", "a%01b", "a%0Ab", "a%20b", "%C3%A9", "a%ED%A0%80", "x" * 65]


@pytest.mark.parametrize(
    "path",
    [
        *[template.format(event_id) for template in EVENT_PATHS for event_id in BAD_PATH_IDS],
        *[
            f"/api/betting/bets/{bet_id}"
            for bet_id in ["99999999999999999999", "9223372036854775808", "%D9%A1", "-1", "1e3"]
        ],
        "/api/betting/bets?cursor=%ED%A0%80",
        "/api/betting/bets?cursor=cD0lMDA%3D",  # base64 of "p=%00": a NUL position
    ],
)
def test_a_path_segment_outside_its_converter_is_a_json_404(http: httpx.Client, path: str) -> None:
    """On PostgreSQL a NUL in the event id reached the query: a 500."""
    event_create(event_id="ev")
    staff = auth_header(StaffFactory.create())
    body = {"coefficient": "2.00", "outcome": "win"}
    if path.startswith("/api/betting/bets"):
        response = http.get(path, headers=staff)
    else:
        response = http.post(path, json=body, headers=staff)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert Event.objects.get().version == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("bets?event_id=a%00b", "event_id"),
        ("bets?event_id=%ED%A0%80", "event_id"),
        ("bets?event_id=a%20b", "event_id"),
        (f"bets?event_id={'x' * 65}", "event_id"),
        ("bets?status=%00", "status"),
        ("bets?status=bogus", "status"),
        ("bets?limit=%D9%A1%D9%A0", "limit"),
        ("bets?limit=1e3", "limit"),
        ("bets?limit=-1", "limit"),
        ("bets?limit=99999999999999999999", "limit"),
        ("events?limit=%D9%A1%D9%A0", "limit"),
        ("events?limit=1_0", "limit"),
        ("events?limit=0", "limit"),
        ("events?offset=-1", "offset"),
        ("events?offset=%EF%BC%91", "offset"),
        ("events?offset=99999999999999999999", "offset"),
    ],
)
def test_a_bad_query_value_is_refused_naming_it(http: httpx.Client, query: str, field: str) -> None:
    event_create()
    headers = auth_header(UserFactory.create())
    for _ in range(2):  # the second time would come from the events cache
        assert_refused(http.get(f"/api/betting/{query}", headers=headers), field)


@pytest.mark.parametrize("key", ["k" * 201, "a\tb", ""])
def test_a_bad_idempotency_key_is_refused_and_claims_nothing(http: httpx.Client, key: str) -> None:
    event = event_create()
    headers = {**auth_header(UserFactory.create()), "Idempotency-Key": key}
    response = http.post(
        "/api/betting/bet",
        json={"event_id": event.id, "amount": "10"},
        headers=headers,
    )
    assert_refused(response, "Idempotency-Key")
    assert not IdempotencyKey.objects.exists()
    assert Bet.objects.count() == 0


@pytest.mark.parametrize(
    ("literal", "stored"),
    [
        ("10", "10.00"),
        ("10.5", "10.50"),
        ("10.50", "10.50"),
        ("1.00", "1.00"),
        ("10000", "10000.00"),
        # The same rules as the string, judged on the digits sent (never through a float):
        ("10.505", None),
        ("10.000", None),
        ("0.30000000000000004", None),
        ("1e1", None),
        ("1E1", None),
        ("0.1e2", None),
        ("1e400", None),
        ("-10", None),
        ("-0", None),
        ("0", None),
        ("10000.01", None),
        ("9" * 400, None),
        ("true", None),
    ],
    ids=lambda value: f"{len(value)}-digits" if value and len(value) > 20 else value,
)
def test_a_stake_sent_as_a_json_number_is_read_exactly_with_the_string_rules(
    http: httpx.Client, literal: str, stored: str | None
) -> None:
    event = event_create()
    body = f'{{"event_id": {json.dumps(event.id)}, "amount": {literal}}}'
    response = http.post(
        "/api/betting/bet",
        content=body,
        headers={**auth_header(UserFactory.create()), "Content-Type": "application/json"},
    )
    if stored is None:
        assert_refused(response, "amount")
        assert Bet.objects.count() == 0
    else:
        assert response.status_code == 201, response.text
        assert response.json()["amount"] == stored
        assert Bet.objects.get().amount == Decimal(stored)


def test_an_expected_coefficient_may_be_a_json_number_too(http: httpx.Client) -> None:
    event = event_create()
    coefficient = str(event.coefficient)
    event_id = json.dumps(event.id)
    body = f'{{"event_id": {event_id}, "amount": 10, "expected_coefficient": {coefficient}}}'
    response = http.post(
        "/api/betting/bet",
        content=body,
        headers={**auth_header(UserFactory.create()), "Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["coefficient"] == coefficient
