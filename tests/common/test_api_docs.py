"""The API docs are enough to call the API: a bare token pasted into Authorize works, both
`Token` and `Bearer` are accepted, every operation says what it does and which errors it gives."""

from typing import Any

import httpx
import pytest
from django.test import Client

from tests.factories import UserFactory, auth_header


@pytest.fixture(scope="module")
def schema(django_db_blocker: Any) -> dict[str, Any]:
    with django_db_blocker.unblock():
        response = Client().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


@pytest.mark.parametrize("scheme", ["Token", "Bearer", "bearer", "TOKEN"])
def test_rest_accepts_the_token_under_either_scheme_word(http: httpx.Client, scheme: str) -> None:
    user = UserFactory()
    token = auth_header(user)["Authorization"].split()[1]
    response = http.get("/api/auth/me", headers={"Authorization": f"{scheme} {token}"})
    assert response.status_code == 200
    assert response.json()["username"] == user.username


@pytest.mark.parametrize("header", ["Bearer", "Bearer a b", "Token not-a-token"])
def test_a_malformed_or_unknown_token_is_a_401_in_the_error_envelope(
    http: httpx.Client, header: str
) -> None:
    response = http.get("/api/auth/me", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_swagger_authorize_takes_the_bare_token(schema: dict[str, Any]) -> None:
    scheme = schema["components"]["securitySchemes"]["tokenAuth"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"


def test_every_operation_has_a_description(schema: dict[str, Any]) -> None:
    missing = [f"{m} {p}" for m, p, op in _operations(schema) if not op.get("description")]
    assert missing == []


def test_every_operation_documents_its_errors_in_the_one_envelope(schema: dict[str, Any]) -> None:
    envelope = "#/components/schemas/ErrorEnvelope"
    assert schema["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error"]
    problems = []
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        secured = operation.get("security") and {} not in operation["security"]
        expected = {"401", "403"} if secured else set()
        if "{" in path:
            expected.add("404")
        if operation.get("requestBody"):
            expected.add("400")
        for status in expected:
            body = responses.get(status, {}).get("content", {}).get("application/json", {})
            if body.get("schema", {}).get("$ref") != envelope:
                problems.append(f"{method} {path} {status}")
    assert problems == []
