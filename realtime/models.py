from django.conf import settings
from django.db import models


class ConnectionTicket(models.Model):
    """A short-lived, single-use WebSocket ticket; only its SHA-256 is stored."""

    key_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"ticket for user {self.user_id} (expires {self.expires_at:%H:%M:%S})"


class Room(models.Model):
    """A conversation: public (anyone), private (members only) or direct (two members).

    `last_seq` is the counter behind the gap-free per-room message `seq`: it is incremented under
    the room's row lock in the transaction that inserts the message.
    """

    class Kind(models.TextChoices):
        PUBLIC = "public"
        PRIVATE = "private"
        DIRECT = "direct"

    slug = models.SlugField(max_length=80, unique=True)
    title = models.CharField(max_length=120, blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.PUBLIC)
    direct_key = models.CharField(
        max_length=41, unique=True, null=True, blank=True, help_text="'<low id>:<high id>'"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_seq = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(last_seq__gte=0), name="room_seq_nonneg"),
            models.CheckConstraint(
                condition=models.Q(kind="direct", direct_key__isnull=False)
                | (~models.Q(kind="direct") & models.Q(direct_key__isnull=True)),
                name="room_direct_key_iff_direct",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.slug} ({self.kind})"


class Membership(models.Model):
    """A user's membership of a room (required for private and direct rooms)."""

    class Role(models.TextChoices):
        OWNER = "owner"
        MEMBER = "member"

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)
    last_read_seq = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="membership_unique"),
        ]
        indexes = [models.Index(fields=["user", "room"])]

    def __str__(self) -> str:
        return f"user {self.user_id} in {self.room_id}"


class Message(models.Model):
    """A chat message; `seq` is gap-free per room. Moderation blanks it (`deleted_at`) rather
    than deleting the row, so the sequence stays gap-free for clients detecting losses."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.BigIntegerField()
    sender = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    text = models.TextField()
    # NULL (not "") means "no client_id", so the partial unique constraint skips it.
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq_unique"),
            models.UniqueConstraint(
                fields=["room", "sender", "client_id"],
                condition=models.Q(client_id__isnull=False),
                name="message_client_id_unique",
            ),
            models.CheckConstraint(condition=models.Q(seq__gt=0), name="message_seq_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq}"
