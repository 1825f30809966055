"""Messenger reads: room visibility, message pages and their wire form, presence. Pure reads:
nothing here writes (the default room is created by `services.room_resolve`)."""

from typing import TypedDict

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, OuterRef, Q, QuerySet

from common.exceptions import NotFound, Unavailable
from common.services import username_is_reserved
from realtime.fanout import OnlineUser, PresenceUnavailable, hub
from realtime.models import Membership, Message, Room


class MessageFrame(TypedDict):
    """A message as the `/ws/` `message` frame and the REST API show it: `seq` is its gap-free
    position in the room, `ts` the ISO 8601 creation time, `display` Sparq's `user: text` line;
    a message deleted by moderation has `deleted` and an empty text."""

    type: str
    room: str
    id: int
    seq: int
    user: str
    user_id: int
    text: str
    ts: str
    client_id: str | None
    display: str
    deleted: bool


class SyncPage(TypedDict):
    """What a client missed: every message after its `after_seq` in order, or none and
    `reset_required` when more were missed than the bound."""

    room: str
    last_seq: int
    reset_required: bool
    messages: list[MessageFrame]


def message_frame(message: Message, *, room_slug: str, username: str) -> MessageFrame:
    """The `message` frame of a stored message (no query: the caller passes the room's slug
    and the sender's username)."""
    return {
        "type": "message",
        "room": room_slug,
        "id": message.pk,
        "seq": message.seq,
        "user": username,
        "user_id": message.sender_id,
        "text": message.text,
        "ts": message.created_at.isoformat(),
        "client_id": message.client_id,
        "display": f"{username}: {message.text}",
        "deleted": message.deleted_at is not None,
    }


def rooms_visible_to(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Room]:
    """Public rooms and the private/direct rooms `user` is a member of, ordered by slug (an
    anonymous user sees the public ones). Lazy queryset, no lock."""
    member_of = Membership.objects.filter(user_id=int(user.pk or 0)).values("room_id")
    return Room.objects.filter(Q(kind=Room.Kind.PUBLIC) | Q(pk__in=member_of)).order_by("slug")


def room_get_visible(*, user: AbstractBaseUser | AnonymousUser, slug: str) -> Room:
    """The room `slug` if `user` may see it (public, or they are a member). Raises `NotFound`
    (`room_not_found`) otherwise, so private rooms are not revealed: one query whether the room
    is missing or hidden, so neither answer nor timing tells them apart (`dm-<a>-<b>` slugs).
    A pure read: a missing default room is `NotFound` here; the doors call
    `services.room_resolve`, which creates it."""
    member_of = Membership.objects.filter(user_id=int(user.pk or 0)).values("room_id")
    room = (
        Room.objects.filter(slug=slug)
        .filter(Q(kind=Room.Kind.PUBLIC) | Q(pk__in=member_of))
        .first()
    )
    if room is None:
        raise NotFound("no such room", code="room_not_found")
    return room


def room_members(*, room: Room) -> QuerySet[Membership]:
    """The room's memberships with their users, ordered by username. Lazy queryset, no lock;
    the caller has checked that the room is visible."""
    return Membership.objects.filter(room=room).select_related("user").order_by("user__username")


def room_online(*, room: Room) -> list[OnlineUser]:
    """Users online in `room` now, `{id, username}` sorted by id (on any server process when
    Redis is configured; one Redis round trip, blocking, bounded by
    REALTIME_REDIS_TIMEOUT_SECONDS). Raises `Unavailable` (`presence_unavailable`, HTTP 503)
    while Redis cannot be reached."""
    try:
        online = hub().presence_online(room.pk)
    except PresenceUnavailable as error:
        raise Unavailable(
            "presence is unavailable: Redis cannot be reached", code="presence_unavailable"
        ) from error
    return sorted(online, key=lambda u: u["id"])


def user_reachable(*, actor: AbstractBaseUser | AnonymousUser, user_id: int) -> bool:
    """Whether `actor` may name user `user_id` in a direct room or a membership.

    Only a regular account can be reached (active, not staff or superuser, a usable password,
    not a reserved name such as a service identity), and only one `actor` can already see: a
    co-member of one of their rooms, or someone who takes part in a public room (a member of
    it, or a sender in it). Staff see every regular account. Anything else answers exactly as a
    missing id does, in one query either way, so no realtime door tells who exists.
    """
    actor_id = int(actor.pk or 0)
    candidate = (
        get_user_model()
        ._default_manager.filter(pk=user_id, is_active=True, is_staff=False, is_superuser=False)
        .exclude(password__startswith=UNUSABLE_PASSWORD_PREFIX)
    )
    if not getattr(actor, "is_staff", False):
        shared = Membership.objects.filter(
            user_id=OuterRef("pk"), room__memberships__user_id=actor_id
        )
        public_member = Membership.objects.filter(
            user_id=OuterRef("pk"), room__kind=Room.Kind.PUBLIC
        )
        public_sender = Message.objects.filter(
            sender_id=OuterRef("pk"), room__kind=Room.Kind.PUBLIC
        )
        candidate = candidate.filter(Exists(shared) | Exists(public_member) | Exists(public_sender))
    username = candidate.values_list("username", flat=True).first()
    return username is not None and not username_is_reserved(username)


def messages_page(
    *,
    room: Room,
    after_seq: int | None = None,
    before_seq: int | None = None,
    limit: int = 100,
) -> list[MessageFrame]:
    """Message frames in ascending seq: the first `limit` after `after_seq`, or else the last
    `limit` before `before_seq` (the newest when neither is given). One query, no lock; the
    caller bounds `limit` (REALTIME_HISTORY_LIMIT) and has checked visibility."""
    query = Message.objects.filter(room=room).select_related("sender")
    if after_seq is not None:
        query = query.filter(seq__gt=after_seq)
    if before_seq is not None:
        query = query.filter(seq__lt=before_seq)
    if after_seq is not None:
        rows = list(query.order_by("seq")[:limit])
    else:
        rows = list(query.order_by("-seq")[:limit])
        rows.reverse()
    return [message_frame(m, room_slug=room.slug, username=m.sender.username) for m in rows]


def messages_sync(*, room: Room, after_seq: int, bound: int) -> SyncPage:
    """What a client missed after `after_seq`: every message in order, or `reset_required`
    when more than `bound` were missed (the client then reloads history). `room` must be
    freshly read: its `last_seq` bounds the replay. At most one query, no lock."""
    missed = room.last_seq - after_seq
    if missed > bound:
        return {
            "room": room.slug,
            "last_seq": room.last_seq,
            "reset_required": True,
            "messages": [],
        }
    messages = messages_page(room=room, after_seq=after_seq, limit=max(missed, 1))
    return {
        "room": room.slug,
        "last_seq": room.last_seq,
        "reset_required": False,
        "messages": messages,
    }
