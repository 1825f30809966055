from typing import Any

import factory
from django.contrib.auth.models import User
from knox.models import AuthToken

TEST_PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", TEST_PASSWORD)

    @factory.post_generation
    def _save(obj: Any, create: bool, extracted: Any, **kwargs: Any) -> None:
        if create:
            obj.save()


class StaffFactory(UserFactory):
    is_staff = True


def token_for(user: Any) -> str:
    """A fresh API token (`Authorization: Token <token>`)."""
    _, token = AuthToken.objects.create(user=user)
    return token


def auth_header(user: Any) -> dict[str, str]:
    return {"Authorization": f"Token {token_for(user)}"}
