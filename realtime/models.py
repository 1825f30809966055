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
