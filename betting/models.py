"""Betting tables: events (line provider), their change log, bets, idempotency keys, audit."""

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q


class EventState(models.TextChoices):
    NEW = "new", "New"
    FINISHED_WIN = "finished_win", "Finished: win"
    FINISHED_LOSE = "finished_lose", "Finished: lose"
    CANCELLED = "cancelled", "Cancelled"


TERMINAL_STATES = frozenset(
    {EventState.FINISHED_WIN, EventState.FINISHED_LOSE, EventState.CANCELLED}
)


class BetStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    WON = "won", "Won"
    LOST = "lost", "Lost"
    VOID = "void", "Void"


class Event(models.Model):
    """Something that can be bet on; `version` and `sequence` move with every change."""

    id = models.CharField(primary_key=True, max_length=64)
    name = models.CharField(max_length=200)
    coefficient = models.DecimalField(max_digits=12, decimal_places=2)
    deadline = models.DateTimeField()
    state = models.CharField(max_length=16, choices=EventState.choices, default=EventState.NEW)
    version = models.PositiveBigIntegerField(default=1)
    sequence = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["deadline", "id"]
        indexes = [models.Index(fields=["state", "deadline"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(coefficient__gt=Decimal("0")), name="betting_event_coefficient_positive"
            ),
            models.CheckConstraint(
                condition=Q(state__in=[s.value for s in EventState]),
                name="betting_event_state_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.name})"


class ChangeSequence(models.Model):
    """Singleton counter behind the global change sequence. Its row lock is held until commit,
    so sequence numbers are gapless and become visible in order (exact WatchEvents resume)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    value = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"sequence {self.value}"


class EventChange(models.Model):
    """Append-only change log: the full event state after each change, by global sequence."""

    class Kind(models.TextChoices):
        CREATED = "created", "Created"
        ODDS = "odds", "Odds changed"
        FINISHED = "finished", "Finished"
        CANCELLED = "cancelled", "Cancelled"

    sequence = models.PositiveBigIntegerField(primary_key=True)
    event_id = models.CharField(max_length=64, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=200)
    coefficient = models.DecimalField(max_digits=12, decimal_places=2)
    deadline = models.DateTimeField()
    state = models.CharField(max_length=16, choices=EventState.choices)
    version = models.PositiveBigIntegerField()
    at = models.DateTimeField()

    class Meta:
        ordering = ["sequence"]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.event_id} {self.kind}"


class Bet(models.Model):
    """A stake on an event at the coefficient frozen at acceptance."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    event = models.ForeignKey(Event, on_delete=models.PROTECT, related_name="bets")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    coefficient = models.DecimalField(max_digits=12, decimal_places=2)
    potential_payout = models.DecimalField(max_digits=24, decimal_places=2)
    status = models.CharField(max_length=8, choices=BetStatus.choices, default=BetStatus.PENDING)
    payout = models.DecimalField(max_digits=24, decimal_places=2, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["event", "status"]),
            models.Index(fields=["user", "-id"]),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gt=Decimal("0")), name="betting_bet_amount_positive"
            ),
            models.CheckConstraint(
                condition=Q(status=BetStatus.PENDING, payout__isnull=True)
                | (~Q(status=BetStatus.PENDING) & Q(payout__isnull=False)),
                name="betting_bet_payout_iff_settled",
            ),
        ]

    def __str__(self) -> str:
        return f"bet {self.pk} on {self.event_id}"


class IdempotencyKey(models.Model):
    """A placement request claimed by (user, key); the request hash detects a changed body."""

    class State(models.TextChoices):
        IN_FLIGHT = "in_flight", "In flight"
        DONE = "done", "Done"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=200)
    request_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.IN_FLIGHT)
    bet = models.ForeignKey(Bet, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="betting_idempotency_unique")
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.state})"


class AuditEntry(models.Model):
    """Append-only record of event state/odds changes and bet status changes."""

    class Subject(models.TextChoices):
        EVENT = "event", "Event"
        BET = "bet", "Bet"

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    subject = models.CharField(max_length=8, choices=Subject.choices)
    subject_id = models.CharField(max_length=64, db_index=True)
    action = models.CharField(max_length=32)
    actor_id = models.BigIntegerField(null=True, blank=True)
    via = models.CharField(max_length=16)
    data = models.JSONField(default=dict)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.subject} {self.subject_id} {self.action}"
