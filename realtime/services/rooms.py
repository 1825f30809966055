"""Messenger rooms and memberships: the default room, public and private rooms, direct rooms
and their members. Membership changes that affect live sockets go out through the fan-out hub
after commit."""

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import IntegrityError, transaction

from common.exceptions import (
    Conflict,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    ValidationFailed,
)
from realtime import selectors
from realtime.fanout import hub
from realtime.models import Membership, Room


def room_default() -> Room:
    """The public room REALTIME_DEFAULT_ROOM that Sparq clients talk in when they name no room,
    created on first use (get_or_create: concurrent first uses race on the unique slug, and
    the loser gets the winner's row). Idempotent."""
    room, _ = Room.objects.get_or_create(
        slug=settings.REALTIME_DEFAULT_ROOM,
        defaults={"kind": Room.Kind.PUBLIC, "title": settings.REALTIME_DEFAULT_ROOM},
    )
    return room


def room_resolve(*, user: AbstractBaseUser | AnonymousUser, slug: str | None) -> Room:
    """The room a client names, as the doors (REST and `/ws/`) look it up: `None` is the
    default room; a visible room is returned (`selectors.room_get_visible`); the default room
    is created on first use (`room_default`) whether or not it existed. Anything else raises
    `NotFound` (`room_not_found`), hidden and missing rooms alike. No lock."""
    if slug is None:
        return room_default()
    try:
        return selectors.room_get_visible(user=user, slug=slug)
    except NotFound:
        if slug != settings.REALTIME_DEFAULT_ROOM:
            raise
    return room_default()


def room_create(*, user: User, slug: str, title: str = "", kind: str = Room.Kind.PUBLIC) -> Room:
    """Create a public or private room with `user` as its owner member, in one transaction.
    Raises `ValidationFailed` (`bad_kind`; `bad_room` for the reserved `dm-` prefix) and
    `Conflict` (`room_exists`) when the slug is taken (the unique slug decides races). The
    caller has parsed the slug (`protocol.SLUG_PATTERN`)."""
    if kind not in (Room.Kind.PUBLIC, Room.Kind.PRIVATE):
        raise ValidationFailed("kind must be public or private", code="bad_kind")
    if slug.startswith("dm-"):
        raise ValidationFailed("slugs starting with dm- are reserved", code="bad_room")
    try:
        with transaction.atomic():
            room = Room.objects.create(slug=slug, title=title, kind=kind, created_by=user)
            Membership.objects.create(room=room, user=user, role=Membership.Role.OWNER)
    except IntegrityError as exc:
        raise Conflict("a room with that slug exists", code="room_exists") from exc
    return room


def _require_manager(*, room: Room, actor: User) -> None:
    if actor.is_staff:
        return
    if not Membership.objects.filter(room=room, user=actor, role=Membership.Role.OWNER).exists():
        raise PermissionDenied("only the room owner may manage members", code="forbidden")


def membership_add(*, actor: User, room: Room, user_id: int) -> Membership:
    """Add a member (room owner or staff); idempotent (get_or_create on the unique
    room/user pair). Only a user the actor can reach (`selectors.user_reachable`); any other id
    is `NotFound` (`user_not_found`), as a missing one is. Raises `PreconditionFailed`
    (`direct_room`) for a direct room and `PermissionDenied` (`forbidden`) for a non-owner."""
    if room.kind == Room.Kind.DIRECT:
        raise PreconditionFailed("direct rooms have exactly two members", code="direct_room")
    _require_manager(room=room, actor=actor)
    if user_id != actor.pk and not selectors.user_reachable(actor=actor, user_id=user_id):
        raise NotFound("no such user", code="user_not_found")
    membership, _ = Membership.objects.get_or_create(room=room, user_id=user_id)
    return membership


def membership_remove(*, actor: User, room: Room, user_id: int) -> None:
    """Remove a member (owner/staff, or the member themself). In a private room their sockets
    are told to leave it after commit (`kick_user` through the hub). Raises
    `PreconditionFailed` (`direct_room`), `PermissionDenied` (`forbidden`) and `NotFound`
    (`not_member`): removing twice is refused, not silently repeated."""
    if room.kind == Room.Kind.DIRECT:
        raise PreconditionFailed("direct rooms have exactly two members", code="direct_room")
    if actor.pk != user_id:
        _require_manager(room=room, actor=actor)
    deleted, _ = Membership.objects.filter(room=room, user_id=user_id).delete()
    if not deleted:
        raise NotFound("not a member", code="not_member")
    if room.kind == Room.Kind.PRIVATE:
        envelope = {"room": room.pk, "kick_user": user_id}
        transaction.on_commit(lambda: hub().publish_threadsafe(envelope))


def direct_get_or_create(*, user: User, other_user_id: int) -> Room:
    """The 1:1 room of two users (the same room whoever asks first; race-safe by the unique
    `direct_key`: a concurrent creator gets the winner's room). Raises `ValidationFailed`
    (`direct_self`) for oneself.

    Only with a user `user` can reach (`selectors.user_reachable`: a regular account they
    already share a room with, or who takes part in a public room); every other id, existing or
    not, staff, service and inactive accounts included, is the same `user_not_found`."""
    if other_user_id == user.pk:
        raise ValidationFailed("a direct room needs another user", code="direct_self")
    if not selectors.user_reachable(actor=user, user_id=other_user_id):
        raise NotFound("no such user", code="user_not_found")
    low, high = sorted((user.pk, other_user_id))
    key = f"{low}:{high}"
    existing = Room.objects.filter(direct_key=key).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            room = Room.objects.create(
                slug=f"dm-{low}-{high}", kind=Room.Kind.DIRECT, direct_key=key, created_by=user
            )
            Membership.objects.bulk_create(
                [Membership(room=room, user_id=low), Membership(room=room, user_id=high)]
            )
    except IntegrityError:
        return Room.objects.get(direct_key=key)
    return room


def direct_members(room: Room) -> list[int] | None:
    """The two user ids of a direct room (from its `direct_key`, no query); None otherwise."""
    if room.kind != Room.Kind.DIRECT or not room.direct_key:
        return None
    low, _, high = room.direct_key.partition(":")
    return [int(low), int(high)]
