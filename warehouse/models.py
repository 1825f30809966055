from django.db import models
from django.db.models import Q


class LedgerEntry(models.Model):
    """One stored movement event (append-only); unique on the idempotency key
    (movement_id, event)."""

    class Event(models.TextChoices):
        DEPARTURE = "departure"
        ARRIVAL = "arrival"

    movement_id = models.UUIDField()
    event = models.CharField(max_length=10, choices=Event.choices)
    warehouse_id = models.UUIDField()
    product_id = models.UUIDField()
    quantity = models.PositiveIntegerField()
    delta = models.BigIntegerField(help_text="Signed stock change at warehouse_id.")
    occurred_at = models.DateTimeField(help_text="data.timestamp")
    source = models.CharField(max_length=100)
    envelope_id = models.UUIDField()
    sent_at = models.DateTimeField(help_text="Envelope time (producer clock).")
    fingerprint = models.CharField(max_length=64)
    duplicates = models.PositiveIntegerField(
        default=0, help_text="Duplicate messages acknowledged without effect."
    )
    recorded_at = models.DateTimeField()
    message_key = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text="Identity of the queue message that stored the event (empty from REST).",
    )

    class Meta:
        verbose_name = "movement event"
        verbose_name_plural = "movement events"
        constraints = [
            models.UniqueConstraint(fields=["movement_id", "event"], name="wh_ledger_key"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="wh_ledger_qty_pos"),
            models.CheckConstraint(
                condition=(Q(event="departure", delta__lt=0) | Q(event="arrival", delta__gt=0)),
                name="wh_ledger_delta_sign",
            ),
        ]
        indexes = [
            models.Index(fields=["warehouse_id", "product_id", "occurred_at"]),
            models.Index(fields=["product_id", "occurred_at"]),
            models.Index(fields=["occurred_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.movement_id} {self.event}"


class Stock(models.Model):
    """Signed balance of one product at one warehouse; always equals the sum of its ledger
    deltas (see `stock_verify`)."""

    warehouse_id = models.UUIDField()
    product_id = models.UUIDField()
    balance = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField()
    version = models.BigIntegerField(
        default=0,
        db_default=0,
        help_text="Raised by every write of the row, under its lock: orders the cached copies.",
    )

    class Meta:
        verbose_name_plural = "stock"
        constraints = [
            models.UniqueConstraint(fields=["warehouse_id", "product_id"], name="wh_stock_pair"),
        ]

    def __str__(self) -> str:
        return f"{self.warehouse_id}/{self.product_id}: {self.balance}"


class DeadLetter(models.Model):
    """A message that could not be stored: raw body, reason and detail; replayable."""

    class Reason(models.TextChoices):
        MALFORMED = "malformed"
        CONFLICT = "conflict"
        INSUFFICIENT_STOCK = "insufficient_stock"
        ERROR = "error"

    received_at = models.DateTimeField()
    body = models.TextField()
    reason = models.CharField(max_length=20, choices=Reason.choices)
    detail = models.CharField(max_length=500, blank=True)
    movement_id = models.UUIDField(null=True, blank=True)
    event = models.CharField(max_length=10, blank=True)
    replayed_at = models.DateTimeField(null=True, blank=True)
    replay_outcome = models.CharField(max_length=20, blank=True)
    message_key = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text="Identity of the queue message; a redelivery finds it and adds nothing.",
    )

    class Meta:
        indexes = [models.Index(fields=["reason", "received_at"])]
        constraints = [
            models.UniqueConstraint(
                fields=["message_key"],
                condition=~Q(message_key=""),
                name="wh_deadletter_message",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reason} #{self.pk}"


class DuplicateMessage(models.Model):
    """A queue message that repeated a stored event (same key and payload), recorded by its
    message identity so that a redelivery of the same message is not counted again."""

    message_key = models.CharField(max_length=64, unique=True)
    movement_id = models.UUIDField()
    event = models.CharField(max_length=10)
    received_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.movement_id} {self.event} ({self.message_key[:12]})"


class ConsumerHeartbeat(models.Model):
    """Last sign of life of a running consumer; removed when it stops cleanly."""

    name = models.CharField(max_length=200, primary_key=True)
    beat_at = models.DateTimeField()
    started_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name
