"""The HTTP door (input-policy.md): every refusal is a JSON 4xx naming the field, every
unexpected failure a JSON 500 (also under DEBUG and when rendering fails), logged once."""

import logging

import httpx
import pytest
from django.test import override_settings

from tests.factories import UserFactory, auth_header

CRASH_URLS = "tests.common.crash_urls"


def _assert_server_error(response: httpx.Response) -> None:
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "server_error"
    assert "secret" not in response.text
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize("debug", [True, False])
@pytest.mark.parametrize(
    "path", ["/api/test/crash", "/api/test/unrenderable", "/docbot/test/crash"]
)
def test_unexpected_failures_are_a_json_500_even_under_debug(
    http: httpx.Client, debug: bool, path: str
) -> None:
    with override_settings(ROOT_URLCONF=CRASH_URLS, DEBUG=debug):
        response = http.get(path)
    _assert_server_error(response)


def test_an_unexpected_failure_is_logged_once_with_the_correlation_id(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with override_settings(ROOT_URLCONF=CRASH_URLS, DEBUG=True):
        response = http.get("/api/test/crash", headers={"X-Request-ID": "trace-crash-1"})
    _assert_server_error(response)
    assert response.headers["X-Request-ID"] == "trace-crash-1"
    with_traceback = [
        record
        for record in caplog.records
        if record.exc_info or (isinstance(record.msg, dict) and record.msg.get("exc_info"))
    ]
    assert len(with_traceback) == 1
    assert "trace-crash-1" in caplog.text
    assert not [r for r in caplog.records if r.name == "django.request" and r.levelno >= 40]


def test_pages_outside_the_api_keep_django_error_handling(http: httpx.Client) -> None:
    with override_settings(ROOT_URLCONF=CRASH_URLS, DEBUG=False):
        response = http.get("/pages/test/crash")
    assert response.status_code == 500


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (b'{"username": "x\\ud800", "password": "long-enough-password-1"}', "username", "encoding"),
        (b'{"username": "ok", "password": "p\\udc00assword-long-1"}', "password", "encoding"),
        (b'{"username": "a\\u0000b", "password": "long-enough-password-1"}', "username", "control"),
        (b'{"\\ud800": 1}', "body", "encoding"),
        (b"[" * 5000 + b"]" * 5000, "body", "too_deep"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "body", "too_deep"),
        (b"\xff\xfe{}", "body", "encoding"),
        (b'{"username": NaN}', "body", "format"),
        (b'{"username": "u", "password": Infinity}', "body", "format"),
    ],
)
def test_json_bodies_that_are_not_valid_unicode_json_are_a_400_naming_the_field(
    http: httpx.Client, body: bytes, field: str, reason: str
) -> None:
    response = http.post(
        "/api/auth/register", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["details"]


@pytest.mark.parametrize(
    "query",
    [
        "limit=%D9%A1%D9%A0",  # Arabic-Indic 10
        "limit=0",
        "limit=-1",
        "limit=1.5",
        "limit=1e3",
        "offset=-1",
        "offset=99999999999999999999",
        "offset=%EF%BC%91",  # fullwidth 1
        "offset=1%00",
    ],
)
def test_page_parameters_outside_ascii_digits_in_range_are_a_400(
    http: httpx.Client, query: str
) -> None:
    response = http.get(f"/api/betting/events?{query}", headers=auth_header(UserFactory.create()))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid"


def test_valid_page_parameters_still_page(http: httpx.Client) -> None:
    response = http.get(
        "/api/betting/events?limit=10&offset=0", headers=auth_header(UserFactory.create())
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/vmcontrol/vms/9223372036854775808",
        "/api/vmcontrol/vms/99999999999999999999999",
        "/api/betting/bets/18446744073709551616",
        "/api/docbot/documents/9223372036854775808",
    ],
)
def test_ids_in_paths_beyond_int64_are_a_json_404(http: httpx.Client, path: str) -> None:
    user = UserFactory.create(is_staff=True)
    response = http.get(path, headers=auth_header(user))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("cursor", ["garbage", "cD1hYmM%3D", "cD0lMDA%3D"])
def test_forged_cursors_are_refused_without_a_server_error(http: httpx.Client, cursor: str) -> None:
    response = http.get(
        f"/api/betting/bets?cursor={cursor}", headers=auth_header(UserFactory.create())
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
