"""Accounts: the user behind each Telegram id, and the docbot service identity the bot calls
the backend with (its tokens, their rotation, the zero-setup derived token)."""

import secrets
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.crypto import salted_hmac
from knox.crypto import hash_token
from knox.models import AuthToken
from knox.settings import CONSTANTS as knox_constants

from common.exceptions import Conflict, PermissionDenied
from docbot import selectors
from docbot.models import ServiceAccount, TelegramAccount

logger = structlog.get_logger(__name__)

_SERVICE_TOKEN_SALT = "docbot.service-token"  # noqa: S105 - an HMAC key salt, not a secret


class ServiceAccountRefused(PermissionDenied):
    """The service identity (or the token offered for it) must not be used: the bot does not
    start, and the backend refuses to act for Telegram users with it."""

    code = "service_account_refused"


# --- Telegram users ------------------------------------------------------------------------


def _telegram_user_create(telegram_user_id: int) -> Any:
    """A fresh account for a Telegram id. The username is only a label: `tg<id>` when free,
    else a random suffix, so an existing account of that name is neither adopted nor in the
    way. The password is unusable: this account is reached only through the bot."""
    user_model = get_user_model()
    base = f"tg{telegram_user_id}"
    for name in (base, f"{base}-{secrets.token_hex(4)}", f"{base}-{secrets.token_hex(8)}"):
        if user_model._default_manager.filter(username__iexact=name).exists():
            continue
        try:
            with transaction.atomic():
                return user_model._default_manager.create_user(username=name)
        except IntegrityError:
            continue
    raise Conflict("Could not name the Telegram account.", code="telegram_account_name")


def telegram_account_user(*, telegram_user_id: int) -> Any:
    """The user behind a Telegram id (an int in 1..2**52-1, already parsed by the door), found
    by the `TelegramAccount` mapping (never by a username) and created on first contact with an
    unusable password.

    Idempotent and safe under concurrent calls: the unique `telegram_user_id` decides, and the
    loser of a race returns the winner's user. Raises `Conflict` (`telegram_account_name`) in
    the unlikely case that three candidate usernames are all taken."""
    found = selectors.telegram_account_user(telegram_user_id=telegram_user_id)
    if found is not None:
        return found
    try:
        with transaction.atomic():
            user = _telegram_user_create(telegram_user_id)
            TelegramAccount.objects.create(user=user, telegram_user_id=telegram_user_id)
            return user
    except IntegrityError:
        # Another request created the mapping first: use theirs.
        found = selectors.telegram_account_user(telegram_user_id=telegram_user_id)
        if found is None:
            raise
        return found


def telegram_account_required(user: Any) -> TelegramAccount:
    """The Telegram identity behind `user`; raises `PermissionDenied`
    (`telegram_account_required`) for an account that has no Telegram chat."""
    account = selectors.telegram_account_of(user=user)
    if account is None:
        raise PermissionDenied(
            "Documents come from files sent to the Telegram bot; this account has no Telegram "
            "chat.",
            code="telegram_account_required",
        )
    return account


# --- the service identity ------------------------------------------------------------------


class _MadeConcurrently(Exception):
    """Another process made the service identity between our look and our insert."""


def _service_user_create() -> Any:
    """The service identity's user: named DOCBOT_SERVICE_USERNAME when no account has that
    name (case-insensitively), else that name with a random suffix. An account already holding
    the name is never adopted: it may be anyone's."""
    user_model = get_user_model()
    name = settings.DOCBOT_SERVICE_USERNAME
    squatter = user_model._default_manager.filter(username__iexact=name).first()
    if squatter is not None and selectors.is_service_account(user=squatter):
        raise _MadeConcurrently
    if squatter is not None:
        logger.warning(
            "docbot_service_name_taken",
            username=name,
            holder_user_id=squatter.pk,
            note="that account is not the service identity and gets no power from its name",
        )
        name = f"{name}-{secrets.token_hex(3)}"
    return user_model._default_manager.create_user(username=name)


def _service_account_sound(account: ServiceAccount) -> ServiceAccount:
    user = account.user
    if user.has_usable_password():
        raise ServiceAccountRefused(
            f"The docbot service account {user.get_username()!r} has a usable password, so "
            "anyone who learns it could act as every Telegram user. Run "
            "`manage.py docbot_service_account --rotate` (it removes the password and "
            "revokes the account's tokens).",
            code="service_account_has_password",
        )
    if not user.is_active:
        raise ServiceAccountRefused(
            f"The docbot service account {user.get_username()!r} is inactive.",
            code="service_account_inactive",
        )
    return account


def service_account_ensure() -> ServiceAccount:
    """The docbot service identity (one `ServiceAccount` row with its user), created on the
    first call with a fresh 32-byte `token_salt`.

    Idempotent and safe under concurrent calls (the loser of a race reads the winner's row).
    Raises `ServiceAccountRefused` when the existing identity has a usable password or is
    inactive: a service account must not be able to log in."""
    account = selectors.service_account()
    if account is None:
        try:
            with transaction.atomic():
                account = ServiceAccount.objects.create(
                    user=_service_user_create(), token_salt=secrets.token_hex(32)
                )
            logger.info("docbot_service_account_created", user_id=account.user_id)
        except (IntegrityError, _MadeConcurrently):
            account = selectors.service_account()
            if account is None:
                raise
    return _service_account_sound(account)


def service_token_issue() -> str:
    """A new knox token of the service identity (created if missing), without expiry; hashed
    at rest, shown only here. Not idempotent: every call adds a token. Revoked only by
    `service_account_rotate`. Raises `ServiceAccountRefused` as `service_account_ensure`."""
    account = service_account_ensure()
    _, token = AuthToken.objects.create(user=account.user, expiry=None)
    return str(token)


@transaction.atomic
def service_account_rotate() -> str:
    """Revoke every token of the service identity (creating the identity if missing), make
    its password unusable again, change the key of the zero-setup token, and return one new
    non-expiring token. Processes still holding an old token get 401 until restarted.

    Holds the `ServiceAccount` row lock (select_for_update) for the transaction, so two
    rotations run one after the other. Raises `ServiceAccountRefused` only when the identity
    has to be created and is refused (an inactive one is rotated, not refused)."""
    if selectors.service_account() is None:
        service_account_ensure()
    account = ServiceAccount.objects.select_for_update().select_related("user").get()
    user = account.user
    if user.has_usable_password():
        user.set_unusable_password()
        user.save(update_fields=["password"])
    revoked, _ = AuthToken.objects.filter(user=user).delete()
    account.token_salt = secrets.token_hex(32)
    account.rotated_at = timezone.now()
    account.save(update_fields=["token_salt", "rotated_at"])
    _, token = AuthToken.objects.create(user=user, expiry=None)
    logger.info("docbot_service_account_rotated", user_id=user.pk, tokens_revoked=revoked)
    return str(token)


def service_token_default() -> str:
    """The zero-setup service token (DOCBOT_SERVICE_TOKEN unset): a 64-hex-digit HMAC-SHA256 of
    the identity's `token_salt` keyed by SECRET_KEY, so every process of the installation
    computes the same one and a single non-expiring knox row serves them all (created here if
    missing; idempotent).

    Raises `ServiceAccountRefused` as `service_account_ensure` does."""
    account = service_account_ensure()
    token = salted_hmac(_SERVICE_TOKEN_SALT, account.token_salt, algorithm="sha256").hexdigest()
    AuthToken.objects.get_or_create(
        digest=hash_token(token),
        defaults={
            "user": account.user,
            "token_key": token[: knox_constants.TOKEN_KEY_LENGTH],
            "expiry": None,
        },
    )
    return token


def service_token_check(*, token: str) -> ServiceAccount:
    """The service identity a configured token (DOCBOT_SERVICE_TOKEN) belongs to. Read-only.

    Raises `ServiceAccountRefused` naming the problem: unknown or expired token, a token of an
    account that is not the service identity (whatever its name), or an identity that has a
    usable password or is inactive."""
    found = AuthToken.objects.select_related("user").filter(digest=hash_token(token)).first()
    if found is None or (found.expiry is not None and found.expiry < timezone.now()):
        raise ServiceAccountRefused(
            "DOCBOT_SERVICE_TOKEN is not a valid token. Issue one with "
            "`manage.py docbot_service_account`.",
            code="service_token_invalid",
        )
    account = selectors.service_account()
    if account is None or account.user_id != found.user_id:
        raise ServiceAccountRefused(
            f"DOCBOT_SERVICE_TOKEN belongs to the account {found.user.get_username()!r}, which "
            "is not the docbot service identity (a name proves nothing). Issue a token with "
            "`manage.py docbot_service_account`.",
            code="service_token_not_service",
        )
    return _service_account_sound(account)
