import uuid

from django.conf import settings
from django.db import models


class VmStatus(models.TextChoices):
    OFFLINE = "offline"
    CONNECTED = "connected"
    AUTHORIZED = "authorized"


class VirtualMachine(models.Model):
    """A VM known to the control plane: its facts, token hash and live status."""

    name = models.CharField(max_length=64)
    cpu_cores = models.PositiveIntegerField(default=1)
    ram_mb = models.PositiveIntegerField(default=512)
    token_hash = models.CharField(max_length=64, blank=True, default="")
    """sha256 hex of the agent token; empty once revoked."""
    status = models.CharField(max_length=16, choices=VmStatus.choices, default=VmStatus.OFFLINE)
    current_session_id = models.UUIDField(null=True, blank=True)
    """The connection that owns `status`; an older connection closing does not touch it."""
    first_connected_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    authorized_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    registered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["status"]),
            models.Index(fields=["first_connected_at"]),
        ]
        constraints = [
            models.CheckConstraint(condition=models.Q(cpu_cores__gte=1), name="vm_cpu_positive"),
            models.CheckConstraint(condition=models.Q(ram_mb__gte=1), name="vm_ram_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk})"


class Disk(models.Model):
    """A disk of a VM; ids are assigned here, names are the agent's and unique per VM."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    name = models.CharField(max_length=64)
    size_gb = models.PositiveIntegerField()

    class Meta:
        ordering = ["vm_id", "name"]
        constraints = [models.UniqueConstraint(fields=["vm", "name"], name="disk_name_per_vm")]

    def __str__(self) -> str:
        return f"{self.name} {self.size_gb} GB"


class SessionEndReason(models.TextChoices):
    CLOSED = "closed", "socket closed by the agent"
    BYE = "bye", "agent said bye"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout", "missed heartbeats"
    IDLE_UNAUTHENTICATED = "idle_unauthenticated", "silent before authorizing (before issue 11)"
    AUTH_TIMEOUT = "auth_timeout", "did not authorize again in time after a logout"
    TOO_MANY_ATTEMPTS = "too_many_attempts", "too many failed authorization attempts"
    PROTOCOL_ERROR = "protocol_error", "protocol violation"
    SERVER_SHUTDOWN = "server_shutdown", "server stopped"
    SERVER_CRASHED = "server_crashed", "closed at the next server start"
    REPLACED = "replaced", "the VM connected again"
    SERVER_ERROR = "server_error", "the server could not write to the connection"
    SERVER_LOST = "server_lost", "its server stopped renewing its lease (killed or cut off)"
    LEASE_LOST = "lease_lost", "its server found its lease taken away and dropped it"


class AgentSession(models.Model):
    """One agent TCP connection that authorized, from accept to close (connections that never
    authorize are counted and logged, not stored)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey(
        VirtualMachine, null=True, blank=True, on_delete=models.CASCADE, related_name="sessions"
    )
    server_name = models.CharField(max_length=128)
    peer = models.CharField(max_length=128)
    started_at = models.DateTimeField()
    authorized_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=32, choices=SessionEndReason.choices, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["server_name", "ended_at"])]

    def __str__(self) -> str:
        return f"session {self.id} {self.peer}"


class ServerLease(models.Model):
    """A running TCP server's claim on its sessions, renewed while it lives: a VM whose session
    belongs to a server whose lease expired is offline (database clock on both sides)."""

    name = models.CharField(primary_key=True, max_length=128)
    host = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.name} until {self.expires_at:%H:%M:%S}"


class CommandStatus(models.TextChoices):
    QUEUED = "queued"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


class Command(models.Model):
    """An operator command for an agent: `queued → sent → succeeded | failed | timed_out`."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="commands")
    name = models.CharField(max_length=32)
    args = models.JSONField(default=dict)
    status = models.CharField(
        max_length=16, choices=CommandStatus.choices, default=CommandStatus.QUEUED
    )
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["vm", "-created_at"]),
            # The sweep of abandoned commands (`services.commands_expire`) reads only open ones.
            models.Index(
                fields=["created_at"],
                condition=models.Q(status__in=["queued", "sent"]),
                name="command_open_created",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} → VM {self.vm_id} ({self.status})"


class AuditEvent(models.Model):
    """Who did what to which VM (operators and agents)."""

    at = models.DateTimeField(auto_now_add=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    vm_id = models.BigIntegerField(null=True, blank=True)
    """Kept as a plain id so the trail survives a deleted VM."""
    action = models.CharField(max_length=48)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["vm_id", "-at"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.action} vm={self.vm_id}"
