"""Realtime writes: the live-event hub (`publish`) and WebSocket tickets.

Other apps call `publish(topic, payload)` inside or outside a transaction; delivery happens after
commit and is at-most-once (a notification, never the only copy of a fact).
"""

import asyncio
import hashlib
import json
import secrets
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import User
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone
from prometheus_client import Counter

from common.exceptions import (
    Conflict,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    ValidationFailed,
)
from realtime.fanout import dumps, hub
from realtime.models import ConnectionTicket, Membership, Message, Room
from realtime.selectors import message_frame, user_reachable
from realtime.topics import TopicAccess, topic_rule_register, topic_validate

__all__ = [
    "TopicAccess",
    "apublish",
    "direct_get_or_create",
    "membership_add",
    "membership_read_mark",
    "membership_remove",
    "message_moderate_delete",
    "message_send",
    "publish",
    "room_create",
    "room_default",
    "ticket_consume",
    "ticket_issue",
    "topic_register",
]

logger = structlog.get_logger(__name__)

EVENTS_PUBLISHED = Counter(
    "realtime_events_published_total", "Hub events handed to the fan-out hub", ["outcome"]
)
MESSAGES_STORED = Counter("realtime_messages_stored_total", "Messenger messages committed")


def topic_register(prefix: str, *, access: TopicAccess) -> None:
    """Declare a topic another app publishes (call from `AppConfig.ready`)."""
    topic_rule_register(prefix, access)


def _plain(payload: Any) -> Any:
    return json.loads(json.dumps(payload, cls=DjangoJSONEncoder))


def _event_envelope(topic: str, payload: Any) -> dict[str, Any]:
    frame = dumps({"type": "event", "topic": topic, "payload": _plain(payload)})
    # A lone surrogate in a payload would make every subscriber's socket refuse the frame;
    # refuse it here, once, so a poison event costs only itself.
    frame.encode("utf-8")
    return {"topic": topic, "frame": frame}


async def apublish(topic: str, payload: Any) -> None:
    """Send now, from async code. Never raises: a lost notification must not break the caller."""
    try:
        envelope = _event_envelope(topic_validate(topic), payload)
    except Exception:
        EVENTS_PUBLISHED.labels("error").inc()
        logger.exception("realtime_publish_failed", topic=topic)
        return
    await hub().apublish(envelope)
    EVENTS_PUBLISHED.labels("sent").inc()


def hub_loop_remember(loop: asyncio.AbstractEventLoop) -> None:
    """Kept for callers of the platform API; the fan-out hub binds to the serving loop itself."""


def _send_now(topic: str, payload: Any) -> None:
    try:
        envelope = _event_envelope(topic, payload)
    except Exception:
        EVENTS_PUBLISHED.labels("error").inc()
        logger.exception("realtime_publish_failed", topic=topic)
        return
    hub().publish_threadsafe(envelope)
    EVENTS_PUBLISHED.labels("sent").inc()


def publish(topic: str, payload: Any) -> None:
    """Push `{"type": "event", "topic", "payload"}` to subscribers once the current transaction
    commits (at once outside a transaction). Payload must be JSON-serialisable (Django encoder)."""
    topic_validate(topic)
    transaction.on_commit(lambda: _send_now(topic, payload))


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def ticket_issue(*, user: User) -> tuple[str, int]:
    """Create a single-use WebSocket ticket; returns the raw ticket (never stored) and its TTL."""
    raw = secrets.token_urlsafe(32)
    ttl = settings.REALTIME_TICKET_TTL_SECONDS
    ConnectionTicket.objects.create(
        key_hash=_hash(raw), user=user, expires_at=timezone.now() + timedelta(seconds=ttl)
    )
    return raw, ttl


@transaction.atomic
def ticket_consume(*, raw: str) -> User | None:
    """Claim a ticket once (conditional UPDATE); None when unknown, used or expired."""
    if not raw or len(raw) > 200:
        return None
    key_hash = _hash(raw)
    claimed = ConnectionTicket.objects.filter(
        key_hash=key_hash, used_at__isnull=True, expires_at__gt=timezone.now()
    ).update(used_at=timezone.now())
    if claimed != 1:
        return None
    ticket = ConnectionTicket.objects.select_related("user").get(key_hash=key_hash)
    return ticket.user if ticket.user.is_active else None


def tickets_purge() -> int:
    """Delete used and expired tickets; returns how many."""
    deleted, _ = ConnectionTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return deleted


# --- Messenger --------------------------------------------------------------------------------


def room_default() -> Room:
    """The public room Sparq clients talk in when they name no room (created on first use)."""
    room, _ = Room.objects.get_or_create(
        slug=settings.REALTIME_DEFAULT_ROOM,
        defaults={"kind": Room.Kind.PUBLIC, "title": settings.REALTIME_DEFAULT_ROOM},
    )
    return room


def room_create(*, user: User, slug: str, title: str = "", kind: str = Room.Kind.PUBLIC) -> Room:
    """Create a public or private room owned by `user` (Conflict when the slug is taken)."""
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
    """Add a member (room owner or staff); idempotent. Only a user the actor can reach
    (`selectors.user_reachable`); any other id is `user_not_found`, as a missing one is."""
    if room.kind == Room.Kind.DIRECT:
        raise PreconditionFailed("direct rooms have exactly two members", code="direct_room")
    _require_manager(room=room, actor=actor)
    if user_id != actor.pk and not user_reachable(actor=actor, user_id=user_id):
        raise NotFound("no such user", code="user_not_found")
    membership, _ = Membership.objects.get_or_create(room=room, user_id=user_id)
    return membership


def membership_remove(*, actor: User, room: Room, user_id: int) -> None:
    """Remove a member (owner/staff, or the member themself); their sockets leave the room."""
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
    """The 1:1 room of two users (the same room whoever asks first; race-safe by unique key).

    Only with a user `user` can reach (`selectors.user_reachable`: a regular account they
    already share a room with, or who takes part in a public room); every other id, existing or
    not, staff, service and inactive accounts included, is the same `user_not_found`."""
    if other_user_id == user.pk:
        raise ValidationFailed("a direct room needs another user", code="direct_self")
    if not user_reachable(actor=user, user_id=other_user_id):
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


def _direct_members(room: Room) -> list[int] | None:
    if room.kind != Room.Kind.DIRECT or not room.direct_key:
        return None
    low, _, high = room.direct_key.partition(":")
    return [int(low), int(high)]


def message_send(
    *, user: User, text: str, room: Room | None = None, client_id: str | None = None
) -> tuple[Message, bool]:
    """Store a message with the room's next `seq` and broadcast it after commit.

    Locks the room row (select_for_update) for the rest of the transaction, so concurrent
    senders get consecutive seqs and a rolled-back insert leaves no gap. Idempotent on
    (room, sender, client_id): a retry returns the original message and `created=False`, with
    no second broadcast. The caller has already checked that `user` may post to `room`.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValidationFailed("text is required", code="text_required")
    if len(text) > settings.REALTIME_MAX_MESSAGE_CHARS:
        raise ValidationFailed(
            f"text is longer than {settings.REALTIME_MAX_MESSAGE_CHARS} characters",
            code="text_too_long",
        )
    target = room if room is not None else room_default()
    with transaction.atomic():
        locked = Room.objects.select_for_update().only("id", "last_seq").get(pk=target.pk)
        if client_id is not None:
            original = Message.objects.filter(
                room_id=target.pk, sender=user, client_id=client_id
            ).first()
            if original is not None:
                return original, False
        Room.objects.filter(pk=target.pk).update(last_seq=F("last_seq") + 1)
        message = Message.objects.create(
            room_id=target.pk,
            seq=locked.last_seq + 1,
            sender=user,
            text=text,
            client_id=client_id,
        )
        frame = message_frame(message, room_slug=target.slug, username=user.username)
        envelope: dict[str, Any] = {"room": target.pk, "frame": dumps(frame), "seq": message.seq}
        members = _direct_members(target)
        if members:
            envelope["users"] = members
        transaction.on_commit(lambda: hub().publish_threadsafe(envelope))
    MESSAGES_STORED.inc()
    return message, True


def message_moderate_delete(*, message_id: int) -> None:
    """Blank a message (moderation). The row stays so the room's seq remains gap-free; rooms
    get a `message_deleted` frame after commit."""
    with transaction.atomic():
        message = Message.objects.select_related("room").select_for_update().get(pk=message_id)
        if message.deleted_at is not None:
            return
        message.text = ""
        message.deleted_at = timezone.now()
        message.save(update_fields=["text", "deleted_at"])
        frame = {
            "type": "message_deleted",
            "room": message.room.slug,
            "id": message.pk,
            "seq": message.seq,
        }
        envelope: dict[str, Any] = {
            "room": message.room_id,
            "frame": dumps(frame),
            "evict_seq": message.seq,
        }
        members = _direct_members(message.room)
        if members:
            envelope["users"] = members
        transaction.on_commit(lambda: hub().publish_threadsafe(envelope))


def membership_read_mark(*, user: User, room: Room, seq: int) -> int:
    """Move the user's read marker forward (never back); returns the marker."""
    if seq > room.last_seq:
        room.refresh_from_db(fields=["last_seq"])
        if seq > room.last_seq:
            raise ValidationFailed("seq is beyond the room's last message", code="bad_seq")
    membership, _ = Membership.objects.get_or_create(room=room, user=user)
    Membership.objects.filter(pk=membership.pk).update(
        last_read_seq=Greatest(F("last_read_seq"), seq)
    )
    membership.refresh_from_db(fields=["last_read_seq"])
    return membership.last_read_seq
