"""Topic names and who may subscribe to them; other apps register their topics at startup."""

import enum
from dataclasses import dataclass

from django.contrib.auth.models import AbstractUser, AnonymousUser

from common.exceptions import NotFound, PermissionDenied
from realtime.protocol import topic_parse


class TopicAccess(enum.Enum):
    AUTHENTICATED = "authenticated"
    STAFF = "staff"
    OWNER = "owner"
    """`<prefix>.<user_id>`: only that user."""


@dataclass(frozen=True)
class TopicRule:
    prefix: str
    access: TopicAccess


_RULES: dict[str, TopicRule] = {}


def topic_rule_register(prefix: str, access: TopicAccess) -> None:
    """Declare a topic (or, for OWNER, the prefix before the user id)."""
    _RULES[prefix] = TopicRule(prefix=prefix, access=access)


def topic_validate(topic: object) -> str:
    """The topic name if well-formed (`protocol.topic_parse`); `bad_topic` otherwise."""
    return topic_parse(topic)


def topic_authorize(*, user: AbstractUser | AnonymousUser, topic: str) -> None:
    """Raise unless `user` may subscribe to `topic`."""
    topic_validate(topic)
    exact = _RULES.get(topic)
    if exact is not None and exact.access is not TopicAccess.OWNER:
        rule = exact
    else:
        prefix, _, owner = topic.rpartition(".")
        owned = _RULES.get(prefix)
        if owned is None or owned.access is not TopicAccess.OWNER:
            raise NotFound(f"unknown topic {topic!r}", code="unknown_topic")
        if not user.is_authenticated or owner != str(user.pk):
            raise PermissionDenied("that topic belongs to another user", code="forbidden")
        return
    if not user.is_authenticated:
        raise PermissionDenied("authentication required", code="forbidden")
    if rule.access is TopicAccess.STAFF and not user.is_staff:
        raise PermissionDenied("staff only topic", code="forbidden")
