"""Platform HTTP surface over a real socket: health, readiness, metrics, docs, auth, errors."""

import httpx
import pytest
from django.test import override_settings

from common.health import readiness_check_register
from tests.factories import TEST_PASSWORD, StaffFactory, UserFactory, auth_header


def test_health_answers_without_touching_dependencies(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_each_configured_dependency(http: httpx.Client) -> None:
    response = http.get("/readyz", headers=auth_header(StaffFactory()))
    assert response.status_code == 200
    checks = response.json()["checks"]
    assert {"database", "cache", "broker", "channel_layer"} <= set(checks)
    assert all(check["ok"] for check in checks.values())


def test_readyz_fails_when_a_registered_check_fails_and_health_stays_up(
    http: httpx.Client,
) -> None:
    def broken() -> None:
        raise RuntimeError("consumer heartbeat stale")

    readiness_check_register("test_broken", broken)
    try:
        response = http.get("/readyz", headers=auth_header(StaffFactory()))
        assert response.status_code == 503
        assert response.json()["checks"]["test_broken"]["ok"] is False
        assert "heartbeat stale" in response.json()["checks"]["test_broken"]["error"]
        assert http.get("/health").status_code == 200
    finally:
        readiness_check_register("test_broken", lambda: None)


def test_readyz_fails_when_the_broker_is_unreachable(http: httpx.Client) -> None:
    with override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"):
        response = http.get("/readyz", headers=auth_header(StaffFactory()))
    assert response.status_code == 503
    assert response.json()["checks"]["broker"]["ok"] is False


def test_metrics_exports_prometheus_text(http: httpx.Client) -> None:
    http.get("/health")
    response = http.get("/metrics", headers=auth_header(StaffFactory()))
    assert response.status_code == 200
    assert "django_http_requests_total_by_method_total" in response.text


def test_metrics_requires_the_bearer_token_when_one_is_configured(http: httpx.Client) -> None:
    with override_settings(METRICS_BEARER_TOKEN="s3cret-metrics"):
        assert http.get("/metrics").status_code == 401
        ok = http.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"})
    assert ok.status_code == 200


def test_openapi_schema_and_swagger_ui_are_served(http: httpx.Client) -> None:
    user = UserFactory.create()
    schema = http.get("/api/schema/", headers={**auth_header(user), "Accept": "application/json"})
    assert schema.status_code == 200
    assert "/api/auth/token" in schema.json()["paths"]
    docs = http.get("/api/docs/")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text


def test_admin_login_page_is_served_with_static_assets(http: httpx.Client) -> None:
    page = http.get("/admin/login/")
    assert page.status_code == 200
    assert http.get("/static/admin/css/base.css").status_code == 200


def test_token_login_authenticates_and_logout_revokes(http: httpx.Client) -> None:
    user = UserFactory.create()
    response = http.post(
        "/api/auth/token", json={"username": user.username, "password": TEST_PASSWORD}
    )
    assert response.status_code == 200
    headers = {"Authorization": f"Token {response.json()['token']}"}
    me = http.get("/api/auth/me", headers=headers)
    assert me.json() == {"id": user.pk, "username": user.username, "is_staff": False}
    assert http.post("/api/auth/logout", headers=headers).status_code == 204
    assert http.get("/api/auth/me", headers=headers).status_code == 401


def test_tokens_are_stored_hashed(http: httpx.Client) -> None:
    from knox.models import AuthToken

    user = UserFactory.create()
    token = http.post(
        "/api/auth/token", json={"username": user.username, "password": TEST_PASSWORD}
    ).json()["token"]
    stored = AuthToken.objects.get(user=user)
    assert token not in {stored.digest, stored.token_key}
    assert stored.digest != token and len(stored.digest) == 128


def test_wrong_password_gets_401_with_json_error(http: httpx.Client) -> None:
    user = UserFactory.create()
    response = http.post("/api/auth/token", json={"username": user.username, "password": "nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "bad_credentials"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"username": "alice", "password": "a-long-enough-passphrase"}, 201, None),
        ({"username": "bob", "password": "123"}, 400, "invalid"),
        ({"username": "bad name!", "password": "a-long-enough-passphrase"}, 400, "invalid"),
        ({}, 400, "invalid"),
    ],
)
def test_register_validates_input(http: httpx.Client, body: dict, status: int, code: str) -> None:
    response = http.post("/api/auth/register", json=body)
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code
    else:
        token = response.json()["token"]
        assert (
            http.get("/api/auth/me", headers={"Authorization": f"Token {token}"}).status_code == 200
        )


def test_register_rejects_a_taken_username_case_insensitively(http: httpx.Client) -> None:
    UserFactory.create(username="carol")
    response = http.post(
        "/api/auth/register", json={"username": "Carol", "password": "a-long-enough-passphrase"}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "username_taken"


def test_register_is_rate_limited(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(
        SimpleRateThrottle, "THROTTLE_RATES", {"register": "2/min", "anon": "1000/min"}
    )
    codes = [
        http.post(
            "/api/auth/register",
            json={"username": f"flood{i}", "password": "a-long-enough-passphrase"},
        ).status_code
        for i in range(3)
    ]
    assert codes == [201, 201, 429]


def test_endpoints_require_authentication_by_default(http: httpx.Client) -> None:
    response = http.get("/api/auth/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_malformed_json_body_gets_400_with_error_envelope(http: httpx.Client) -> None:
    response = http.post(
        "/api/auth/token", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"code", "message", "details"}


def test_request_id_is_echoed_and_generated(http: httpx.Client) -> None:
    assert (
        http.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    generated = http.get("/health", headers={"X-Request-ID": "bad id <script>"}).headers[
        "X-Request-ID"
    ]
    assert generated and "script" not in generated
