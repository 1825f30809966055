"""API token authentication: knox tokens (hashed at rest, expiring), sent as
`Authorization: Token <token>` or, as RFC 6750 and the gRPC door spell it, `Bearer <token>`."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
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
