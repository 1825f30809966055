"""Accounts: reserved names, token expiry and revocation, client IPs behind proxies."""

from datetime import timedelta

import httpx
import pytest
from django.test import override_settings
from django.utils import timezone
from knox.models import AuthToken

from common.tasks import api_tokens_purge
from tests.factories import TEST_PASSWORD, UserFactory, token_for

PASSWORD = "a-long-enough-passphrase"


@pytest.mark.parametrize(
    "username",
    [
        "docbot-service",
        "DOCBOT-SERVICE",
        "tg123",
        "TG987654321",
        "\uff54\uff47123",  # fullwidth "tg123": NFKC folds it to tg123
        "admin",
        "Root",
        "billing-service",
        "svc-anything",
    ],
)
def test_reserved_names_cannot_be_registered(http: httpx.Client, username: str) -> None:
    response = http.post("/api/auth/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "reserved_username"
    assert "username" in response.json()["error"]["details"]


def test_the_configured_bot_service_name_is_reserved_too(http: httpx.Client) -> None:
    from django.conf import settings

    name = settings.DOCBOT_SERVICE_USERNAME
    response = http.post("/api/auth/register", json={"username": name, "password": PASSWORD})
    assert response.json()["error"]["code"] == "reserved_username"


@pytest.mark.parametrize("username", ["tgx", "servicedesk", "alice", "my.service.fan"])
def test_ordinary_names_stay_free(http: httpx.Client, username: str) -> None:
    response = http.post("/api/auth/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 201, response.text


def test_tokens_expire_after_their_ttl(http: httpx.Client) -> None:
    user = UserFactory.create()
    token = http.post(
        "/api/auth/token", json={"username": user.username, "password": TEST_PASSWORD}
    ).json()
    assert token["expiry"] is not None
    headers = {"Authorization": f"Token {token['token']}"}
    assert http.get("/api/auth/me", headers=headers).status_code == 200
    AuthToken.objects.filter(user=user).update(expiry=timezone.now() - timedelta(seconds=1))
    assert http.get("/api/auth/me", headers=headers).status_code == 401
    # Refused without a write on the request path; the periodic purge deletes it.
    assert AuthToken.objects.filter(user=user).exists()
    assert api_tokens_purge() == 1
    assert not AuthToken.objects.filter(user=user).exists()
    assert http.get("/api/auth/me", headers=headers).status_code == 401


def test_a_token_in_use_is_refreshed_but_not_past_its_maximum_age(http: httpx.Client) -> None:
    user = UserFactory.create()
    headers = {"Authorization": f"Token {token_for(user)}"}
    soon = timezone.now() + timedelta(minutes=5)
    AuthToken.objects.filter(user=user).update(
        expiry=soon, created=timezone.now() - timedelta(hours=2)
    )
    assert http.get("/api/auth/me", headers=headers).status_code == 200
    assert AuthToken.objects.get(user=user).expiry > soon + timedelta(hours=1)
    AuthToken.objects.filter(user=user).update(
        expiry=soon, created=timezone.now() - timedelta(days=365)
    )
    assert http.get("/api/auth/me", headers=headers).status_code == 200
    assert AuthToken.objects.get(user=user).expiry <= soon


def test_logout_all_revokes_every_token_of_the_user_only(http: httpx.Client) -> None:
    user, other = UserFactory.create(), UserFactory.create()
    mine = [{"Authorization": f"Token {token_for(user)}"} for _ in range(3)]
    theirs = {"Authorization": f"Token {token_for(other)}"}
    assert http.post("/api/auth/logout-all", headers=mine[0]).status_code == 204
    assert [http.get("/api/auth/me", headers=h).status_code for h in mine] == [401, 401, 401]
    assert http.get("/api/auth/me", headers=theirs).status_code == 200


def test_logout_all_needs_authentication(http: httpx.Client) -> None:
    assert http.post("/api/auth/logout-all").status_code == 401


def test_a_made_up_forwarded_for_does_not_escape_the_registration_limit(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(
        SimpleRateThrottle, "THROTTLE_RATES", {"register": "2/min", "anon": "1000/min"}
    )
    codes = [
        http.post(
            "/api/auth/register",
            json={"username": f"spoof{i}", "password": PASSWORD},
            headers={"X-Forwarded-For": f"203.0.113.{i}"},
        ).status_code
        for i in range(4)
    ]
    assert codes == [201, 201, 429, 429]


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(
        SimpleRateThrottle, "THROTTLE_RATES", {"register": "1/min", "anon": "1000/min"}
    )
    from rest_framework.settings import api_settings

    monkeypatch.setattr(api_settings, "NUM_PROXIES", 1)
    with override_settings(TRUSTED_PROXY_HOPS=1):
        codes = [
            http.post(
                "/api/auth/register",
                json={"username": f"proxied{i}", "password": PASSWORD},
                headers={"X-Forwarded-For": f"198.51.100.7, 203.0.113.{i % 2}"},
            ).status_code
            for i in range(3)
        ]
    # The proxy's hop (the right-most address) is the client; a forged left part changes nothing.
    assert codes == [201, 201, 429]


@pytest.mark.django_db
def test_a_login_without_a_socket_address_is_recorded_without_one() -> None:
    from django.test import Client

    client = Client(REMOTE_ADDR="")
    user = UserFactory.create()
    client.force_login(user)
    assert client.get("/api/auth/me").status_code == 200


@pytest.mark.parametrize(
    ("addresses", "same"),
    [
        (("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"), True),
        (("2001:db8:1:2::1", "2001:db8:1:3::1"), False),
        (("::ffff:192.0.2.7", "192.0.2.7"), True),
        (("192.0.2.7", "192.0.2.8"), False),
    ],
)
def test_rate_limits_group_ipv6_per_64(addresses: tuple[str, str], same: bool) -> None:
    from common.network import client_key

    assert (client_key(addresses[0]) == client_key(addresses[1])) is same


def test_one_ipv6_subscriber_cannot_mint_budgets_by_cycling_addresses(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(
        SimpleRateThrottle, "THROTTLE_RATES", {"register": "2/min", "anon": "1000/min"}
    )
    with override_settings(TRUSTED_PROXY_HOPS=1):
        codes = [
            http.post(
                "/api/auth/register",
                json={"username": f"six{i}", "password": PASSWORD},
                headers={"X-Forwarded-For": f"2001:db8:77:1::{i + 1:x}"},
            ).status_code
            for i in range(3)
        ]
    assert codes == [201, 201, 429]


@pytest.mark.parametrize(("hops", "redirected"), [(0, True), (1, False)])
def test_only_a_trusted_proxy_may_say_the_request_was_https(hops: int, redirected: bool) -> None:
    from importlib import reload

    import config.settings as project_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRUSTED_PROXY_HOPS", str(hops))
        reloaded = reload(project_settings)
        header = reloaded.SECURE_PROXY_SSL_HEADER
    reload(project_settings)
    assert (header is None) is redirected
