"""Operator UI: events with finish/cancel actions (calling services), bets read-only, audit."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from betting import services
from betting.models import AuditEntry, Bet, Event, EventChange
from common.exceptions import ApplicationError


def _each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Event],
    action: Any,
    label: str,
) -> None:
    done = 0
    for event in queryset:
        try:
            action(event_id=event.id, actor_id=request.user.pk, via="admin")
            done += 1
        except ApplicationError as error:
            modeladmin.message_user(request, f"{event.id}: {error.message}", messages.ERROR)
    modeladmin.message_user(request, f"{label} {done} event(s); settlement scheduled.")


@admin.action(description="Finish: outcome WIN")
def finish_win(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Event]
) -> None:
    _each(
        modeladmin,
        request,
        queryset,
        lambda **kw: services.event_finish(outcome="win", **kw),
        "Finished (win)",
    )


@admin.action(description="Finish: outcome LOSE")
def finish_lose(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Event]
) -> None:
    _each(
        modeladmin,
        request,
        queryset,
        lambda **kw: services.event_finish(outcome="lose", **kw),
        "Finished (lose)",
    )


@admin.action(description="Cancel (void bets, refund stakes)")
def cancel(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Event]) -> None:
    _each(modeladmin, request, queryset, services.event_cancel, "Cancelled")


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "coefficient", "deadline", "state", "version", "sequence"]
    list_filter = ["state"]
    search_fields = ["id", "name"]
    actions = [finish_win, finish_lose, cancel]
    readonly_fields = ["state", "version", "sequence", "finished_at", "created_at", "updated_at"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # State and odds move only through services (audited, sequenced, settled).
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Bet)
class BetAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "user",
        "event",
        "amount",
        "coefficient",
        "potential_payout",
        "status",
        "payout",
        "created_at",
        "settled_at",
    ]
    list_filter = ["status"]
    search_fields = ["event__id", "user__username"]
    list_select_related = ["user", "event"]


@admin.register(EventChange)
class EventChangeAdmin(ReadOnlyAdmin):
    list_display = ["sequence", "event_id", "kind", "coefficient", "state", "version", "at"]
    list_filter = ["kind"]
    search_fields = ["event_id"]


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["at", "subject", "subject_id", "action", "actor_id", "via"]
    list_filter = ["subject", "action", "via"]
    search_fields = ["subject_id"]
