"""Authentication of the bot's backend calls: the docbot service user's knox token plus the
Telegram user id header act as that Telegram user. Any other token acts as its own user."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication
from rest_framework import exceptions
from rest_framework.request import Request

from common.parsers import InvalidValue
from docbot import schemas, services

TELEGRAM_USER_HEADER = "X-Telegram-User-Id"
_META_KEY = "HTTP_X_TELEGRAM_USER_ID"


class ServiceTelegramAuthentication(TokenAuthentication):
    """knox token auth; with the docbot service user's token, the `X-Telegram-User-Id` header
    (ASCII digits within Telegram's id range, else a 400 naming it) selects the user acted for."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        result = super().authenticate(request)
        if result is None:
            return None
        user, token = result
        from django.conf import settings

        if user.get_username() != settings.DOCBOT_SERVICE_USERNAME:
            return user, token
        raw = request.META.get(_META_KEY)
        if raw is None:
            raise exceptions.AuthenticationFailed(
                f"The docbot service token needs a numeric {TELEGRAM_USER_HEADER} header."
            )
        try:
            telegram_user_id = schemas.telegram_user_id(raw, field=TELEGRAM_USER_HEADER)
        except InvalidValue as exc:
            # A ValidationError (an APIException) so DRF marks the request unauthenticated
            # and the one exception handler answers 400 naming the header.
            raise exceptions.ValidationError(exc.details, code=exc.reason) from None
        return services.telegram_account_user(telegram_user_id=telegram_user_id), token


class ServiceTelegramAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "docbot.auth.ServiceTelegramAuthentication"
    name = "docbotServiceToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": (
                "`Token <knox token>`. With the docbot service user's token, the "
                f"`{TELEGRAM_USER_HEADER}` header names the Telegram user acted for."
            ),
        }
