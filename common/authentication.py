"""API token authentication: knox tokens (hashed at rest, expiring), sent as
`Authorization: Token <token>` or, as RFC 6750 and the gRPC door spell it, `Bearer <token>`."""

import binascii
from collections.abc import Callable
from dataclasses import dataclass
from hmac import compare_digest
from typing import Any

from django.db import connection
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from knox.crypto import hash_token
from knox.models import get_token_model
from knox.settings import CONSTANTS, knox_settings
from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header
from rest_framework.request import Request

TOKEN_SCHEMES = (b"token", b"bearer")


class TokenAuthentication(KnoxTokenAuthentication):
    """knox's token check behind either scheme word (case-insensitive). Returns None for other
    schemes (another authenticator may take them); raises AuthenticationFailed (401) for a
    scheme with no token or with more than one word after it, or an unknown/expired token."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        words = get_authorization_header(request).split()
        if not words or words[0].lower() not in TOKEN_SCHEMES:
            return None
        if len(words) != 2:
            raise exceptions.AuthenticationFailed(
                "The Authorization header must be `Token <token>` or `Bearer <token>`."
            )
        user, token = self.authenticate_credentials(words[1])
        return user, token

    def authenticate_credentials(self, token: bytes) -> tuple[Any, Any]:
        """One indexed query per request (`token_lookup`): the unexpired tokens under the key
        prefix, with their user; the digest (SHA-512, knox) compared in constant time. Expired
        tokens are refused here and deleted by the periodic `common.api_tokens_purge` task, not
        by a second query on every request as knox does. Renewal (AUTO_REFRESH) writes at most
        once per MIN_REFRESH_INTERVAL, as in knox. Raises AuthenticationFailed (401)."""
        try:
            text = token.decode()
            digest = hash_token(text)
        except (UnicodeDecodeError, TypeError, binascii.Error):
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        for auth_token in token_lookup(text[: CONSTANTS.TOKEN_KEY_LENGTH]):
            if compare_digest(digest, auth_token.digest):
                if knox_settings.AUTO_REFRESH and auth_token.expiry is not None:
                    self.renew_token(auth_token)
                return self.validate_user(auth_token)
        raise exceptions.AuthenticationFailed("Invalid token.")


@dataclass(frozen=True)
class _LookupPlan:
    sql: str
    user_model: Any
    user_attnames: list[str]
    token_model: Any
    token_attnames: list[str]
    converters: list[list[Callable[..., Any]]]  # per selected column
    columns: list[Any]


_USER_FIELDS_LOADED = {"is_active", "is_staff", "is_superuser"}


def _lookup_plan() -> _LookupPlan:
    """Built once per database connection (the converters are the connection's own)."""
    plan: _LookupPlan | None = getattr(connection, "_quintet_token_plan", None)
    if plan is not None:
        return plan
    token_model = get_token_model()
    user_model = token_model._meta.get_field("user").related_model
    # The fields authorization reads; the rest (the password hash among them) stay deferred
    # and load on first access like any deferred field.
    user_fields = [
        f
        for f in user_model._meta.concrete_fields
        if f.primary_key or f.name in _USER_FIELDS_LOADED or f.name == user_model.USERNAME_FIELD
    ]
    token_fields = list(token_model._meta.concrete_fields)
    quote = connection.ops.quote_name
    selected = [("u", f) for f in user_fields] + [("t", f) for f in token_fields]
    # Identifiers only, from the models' own metadata; the values go as parameters.
    sql = " ".join(
        [
            "SELECT",
            ", ".join(f"{alias}.{quote(f.column)}" for alias, f in selected),
            f"FROM {quote(token_model._meta.db_table)} t",
            f"JOIN {quote(user_model._meta.db_table)} u",
            f"ON u.{quote(user_model._meta.pk.column)} = t.{quote('user_id')}",
            "WHERE t.token_key = %s AND (t.expiry IS NULL OR t.expiry > %s)",
        ]
    )
    columns = [f.get_col(f.model._meta.db_table) for _, f in selected]
    plan = _LookupPlan(
        sql=sql,
        user_model=user_model,
        user_attnames=[f.attname for f in user_fields],
        token_model=token_model,
        token_attnames=[f.attname for f in token_fields],
        converters=[
            [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
            for col in columns
        ],
        columns=columns,
    )
    connection._quintet_token_plan = plan  # type: ignore[attr-defined]
    return plan


def token_lookup(token_key: str) -> list[Any]:
    """The unexpired knox tokens with this key prefix, each with its `user` loaded: one raw,
    indexed query (the ORM's compilation of the same query costs about 5x the query itself,
    measured) whose rows become model instances through the backend's own converters. Uses the
    default database connection."""
    plan = _lookup_plan()
    with connection.cursor() as cursor:
        cursor.execute(
            plan.sql, [token_key, connection.ops.adapt_datetimefield_value(timezone.now())]
        )
        rows = cursor.fetchall()
    tokens = []
    split = len(plan.user_attnames)
    for row in rows:
        values = []
        for value, converters, col in zip(row, plan.converters, plan.columns, strict=True):
            for convert in converters:
                value = convert(value, col, connection)
            values.append(value)
        user = plan.user_model.from_db(connection.alias, plan.user_attnames, values[:split])
        auth_token = plan.token_model.from_db(connection.alias, plan.token_attnames, values[split:])
        auth_token.user = user
        tokens.append(auth_token)
    return tokens


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    """OpenAPI: an HTTP bearer scheme, so Swagger UI's Authorize takes the bare token."""

    target_class = "common.authentication.TokenAuthentication"
    name = "tokenAuth"
    match_subclasses = True
    priority = 1

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "An API token from `POST /api/auth/token`. Paste the bare token into Authorize; "
                "clients send `Authorization: Bearer <token>` or `Authorization: Token <token>` "
                "(both accepted here and on the gRPC door). Tokens expire after "
                "API_TOKEN_TTL_HOURS without use."
            ),
        }
