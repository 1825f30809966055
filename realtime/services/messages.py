"""Messenger messages: sending (gap-free per-room `seq`, idempotent on `client_id`),
moderation, read markers, and the by-slug operations the `/ws/` door runs in one thread hop.
Frames go out through the fan-out hub after commit."""

from typing import Any, TypedDict

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone
from prometheus_client import Counter

from common.console import console_count
from common.exceptions import ValidationFailed
from realtime import selectors
from realtime.fanout import dumps, hub
from realtime.models import Membership, Message, Room
from realtime.selectors import MessageFrame
from realtime.services.rooms import direct_members, room_default, room_resolve

MESSAGES_STORED = Counter("realtime_messages_stored_total", "Messenger messages committed")


class HistoryPage(TypedDict):
    """A page of a room's messages in ascending seq, with the room's slug."""

    room: str
    messages: list[MessageFrame]


def room_history(*, user: User, slug: str, before_seq: int | None, limit: int) -> HistoryPage:
    """`selectors.messages_page` of the room `slug` resolves to (`room_resolve`: the default
    room may be created). Raises `NotFound` (`room_not_found`) for a room `user` cannot see."""
    room = room_resolve(user=user, slug=slug)
    return {
        "room": room.slug,
        "messages": selectors.messages_page(room=room, before_seq=before_seq, limit=limit),
    }


def room_message_send(
    *, user: User, slug: str | None, text: str, client_id: str | None
) -> tuple[Room, Message, bool]:
    """`message_send` to the room `slug` resolves to (`room_resolve`); returns the room too.
    Raises what those two raise."""
    room = room_resolve(user=user, slug=slug)
    message, created = message_send(user=user, room=room, text=text, client_id=client_id)
    return room, message, created


def room_read_mark(*, user: User, slug: str, seq: int) -> int:
    """`membership_read_mark` in the room `slug` resolves to (`room_resolve`); returns the
    marker. Raises what those two raise."""
    return membership_read_mark(user=user, room=room_resolve(user=user, slug=slug), seq=seq)


def message_send(
    *, user: User, text: str, room: Room | None = None, client_id: str | None = None
) -> tuple[Message, bool]:
    """Store a message with the room's next `seq` and broadcast it after commit.

    Locks the room row (select_for_update) for the rest of the transaction, so concurrent
    senders get consecutive seqs and a rolled-back insert leaves no gap. Idempotent on
    (room, sender, client_id): a retry returns the original message and `created=False`, with
    no second broadcast. The caller has already checked that `user` may post to `room`
    (`room=None` is the default room, created on first use). Raises `ValidationFailed`
    (`text_required`, `text_too_long`: REALTIME_MAX_MESSAGE_CHARS code points).
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
        frame = selectors.message_frame(message, room_slug=target.slug, username=user.username)
        envelope: dict[str, Any] = {"room": target.pk, "frame": dumps(frame), "seq": message.seq}
        members = direct_members(target)
        if members:
            envelope["users"] = members
        transaction.on_commit(lambda: hub().publish_threadsafe(envelope))
    MESSAGES_STORED.inc()
    console_count("realtime.messages")
    return message, True


def message_moderate_delete(*, message_id: int) -> None:
    """Blank a message (moderation). The row stays so the room's seq remains gap-free; rooms
    get a `message_deleted` frame after commit. Locks the message row; idempotent (a deleted
    message is left alone, no second frame). Raises `Message.DoesNotExist` for an unknown id
    (staff tooling only)."""
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
        members = direct_members(message.room)
        if members:
            envelope["users"] = members
        transaction.on_commit(lambda: hub().publish_threadsafe(envelope))


def membership_read_mark(*, user: User, room: Room, seq: int) -> int:
    """Move the user's read marker forward to `seq` (never back: `Greatest` in one UPDATE, so
    concurrent marks keep the highest); returns the marker. Idempotent. Raises
    `ValidationFailed` (`bad_seq`) for a seq beyond the room's last message."""
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
