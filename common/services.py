"""Platform writes: accounts."""

import re
import unicodedata
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from knox.models import get_token_model

from common.exceptions import Conflict, NotFound, ValidationFailed


def username_is_reserved(username: str) -> bool:
    """True for names that only operators may create (service identities, `tg<id>` accounts,
    RESERVED_USERNAMES, RESERVED_USERNAME_PATTERN), compared after the NFKC normalization
    Django applies to usernames and case-insensitively, so look-alikes are reserved too."""
    folded = unicodedata.normalize("NFKC", username).casefold()
    reserved = {
        unicodedata.normalize("NFKC", name).casefold() for name in settings.RESERVED_USERNAMES
    }
    return folded in reserved or bool(
        re.fullmatch(settings.RESERVED_USERNAME_PATTERN, folded, flags=re.IGNORECASE)
    )


@transaction.atomic
def user_register(*, username: str, password: str, email: str = "") -> AbstractBaseUser:
    """Create an active, non-staff account.

    Raises `ValidationFailed` (code `reserved_username`) for reserved names, before anything
    else is checked, and `Conflict` (`username_taken`) for a duplicate name."""
    if username_is_reserved(username):
        raise ValidationFailed(
            "That username is reserved.",
            code="reserved_username",
            details={"username": ["is reserved"]},
        )
    user_model = get_user_model()
    candidate = user_model(username=username, email=email)
    try:
        validate_password(password, user=candidate)
    except ValidationError as exc:
        raise ValidationFailed(
            "The password is too weak.", details={"password": exc.messages}
        ) from exc
    if user_model._default_manager.filter(username__iexact=username).exists():
        raise Conflict("That username is taken.", code="username_taken")
    try:
        with transaction.atomic():
            return user_model._default_manager.create_user(
                username=username, email=email, password=password
            )
    except IntegrityError as exc:
        raise Conflict("That username is taken.", code="username_taken") from exc


def operator_ensure(*, username: str, password: str, email: str = "") -> bool:
    """Create a superuser unless one with that name exists; True when created."""
    user_model = get_user_model()
    if user_model._default_manager.filter(username=username).exists():
        return False
    user_model._default_manager.create_superuser(username=username, email=email, password=password)
    return True


def user_tokens_revoke(*, user: AbstractBaseUser) -> int:
    """Delete every API token of `user`; returns how many there were. Idempotent."""
    from knox.models import AuthToken

    deleted, _ = AuthToken.objects.filter(user=user).delete()
    return deleted


def operator_token_issue(*, username: str, ttl: timedelta) -> tuple[Any, str]:
    """An API token for the active staff user `username`, for an operator tool that already has
    database access and talks to the running system through its API (`manage.py vmctl`):
    returns the knox `AuthToken` row and the raw token, which is shown to no one. It expires
    `ttl` from now (knox's auto-refresh extends a token that is used); the tool deletes it when
    done (`api_token_revoke`). Raises NotFound (`operator_not_found`) when there is no such
    active staff user."""
    from knox.models import AuthToken

    user = (
        get_user_model()
        ._default_manager.filter(username=username, is_active=True, is_staff=True)
        .first()
    )
    if user is None:
        raise NotFound(f"No active staff user {username!r}.", code="operator_not_found")
    return AuthToken.objects.create(user=user, expiry=ttl)


def api_token_revoke(*, token: Any) -> None:
    """Delete one knox `AuthToken` row (from `operator_token_issue`). Idempotent."""
    from knox.models import AuthToken

    AuthToken.objects.filter(pk=token.pk).delete()


def api_tokens_purge_expired() -> int:
    """Delete API tokens (knox) whose expiry has passed; returns how many. Authentication already
    refuses them (common.authentication); this only keeps the table small. Idempotent; run by
    the `common.api_tokens_purge` beat task every API_TOKEN_PURGE_SECONDS."""
    deleted, _ = get_token_model().objects.filter(expiry__lt=timezone.now()).delete()
    return deleted
