"""Platform writes: accounts."""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from common.exceptions import Conflict, ValidationFailed


@transaction.atomic
def user_register(*, username: str, password: str, email: str = "") -> AbstractBaseUser:
    """Create an active, non-staff account. Duplicate usernames are a Conflict."""
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
