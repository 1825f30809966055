"""Authentication of the bot's backend calls: a token of the docbot service identity plus the
Telegram user id header act as that Telegram user. Any other token acts as its own user, and
the header grants it nothing, whatever the account is called."""

from dataclasses import dataclass
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication
from rest_framework import exceptions
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from common.parsers import InvalidValue
from docbot import schemas, selectors, services

TELEGRAM_USER_HEADER = "X-Telegram-User-Id"
_META_KEY = "HTTP_X_TELEGRAM_USER_ID"


@dataclass(frozen=True)
class ActingForTelegramUser:
    """`request.auth` when the service identity acts for a Telegram user."""

    token: Any
    telegram_user_id: int


class ServiceTelegramAuthentication(TokenAuthentication):
    """knox token auth. Only for the user marked as the service identity (a `ServiceAccount`
    row, made by an operator command or the bot's own process, never by registration) does the
    `X-Telegram-User-Id` header (ASCII digits within Telegram's id range, else a 400 naming it)
    select the Telegram user acted for, found through the `TelegramAccount` mapping; the
    identity must have an unusable password (else 403 `service_account_has_password`)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        result = super().authenticate(request)
        if result is None:
            return None
        user, token = result
        if not selectors.is_service_account(user=user):
            return user, token
        if user.has_usable_password():
            raise exceptions.PermissionDenied(
                "The docbot service account has a usable password; it may not act for "
                "Telegram users until `manage.py docbot_service_account --rotate` removes it.",
                code="service_account_has_password",
            )
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
        acting = services.telegram_account_user(telegram_user_id=telegram_user_id)
        return acting, ActingForTelegramUser(token, telegram_user_id)


class IsBotActingForTelegramUser(BasePermission):
    """Only the bot, acting for a Telegram user, may tell what that user sent it."""

    message = "Only the docbot service acting for a Telegram user may do this."
    code = "telegram_bot_only"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, ActingForTelegramUser)


class ServiceTelegramAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "docbot.auth.ServiceTelegramAuthentication"
    name = "docbotServiceToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": (
                "`Token <knox token>`. With a token of the docbot service identity (issued by "
                f"`manage.py docbot_service_account`), the `{TELEGRAM_USER_HEADER}` header "
                "names the Telegram user acted for."
            ),
        }
