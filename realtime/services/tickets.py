"""Single-use WebSocket tickets: issued over REST, claimed once by the `/ws/` handshake."""

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from realtime.models import ConnectionTicket


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def ticket_issue(*, user: User) -> tuple[str, int]:
    """Create a single-use WebSocket ticket; returns the raw ticket (never stored: only its
    SHA-256 is) and its time to live in seconds (REALTIME_TICKET_TTL_SECONDS). One insert."""
    raw = secrets.token_urlsafe(32)
    ttl = settings.REALTIME_TICKET_TTL_SECONDS
    ConnectionTicket.objects.create(
        key_hash=_hash(raw), user=user, expires_at=timezone.now() + timedelta(seconds=ttl)
    )
    return raw, ttl


@transaction.atomic
def ticket_consume(*, raw: str) -> User | None:
    """Claim a ticket once and return its user; None when unknown, used, expired, malformed or
    its user is inactive. The claim is a conditional UPDATE (`used_at IS NULL`) whose row
    count decides, so two concurrent claims of one ticket give one user. Never raises."""
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
    """Delete expired tickets (used ones expire too); returns how many. Idempotent; the
    Celery beat task `realtime.tickets_purge` calls it."""
    deleted, _ = ConnectionTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return deleted
