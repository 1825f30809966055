"""Operator UI for the warehouse: the ledger, stock and heartbeats are read-only (append-only or
derived: stock = Σ ledger); dead letters are replayed through the ingest service, from the list
(action) or from a dead letter's own page (button)."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from common.admin import ReadOnlyAdmin
from common.exceptions import ApplicationError
from warehouse import services
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = [
        "movement_id",
        "event",
        "warehouse_id",
        "product_id",
        "quantity",
        "occurred_at",
        "source",
        "duplicates",
        "recorded_at",
    ]
    list_filter = ["event", "recorded_at"]
    search_fields = ["=movement_id", "=warehouse_id", "=product_id", "source"]
    date_hierarchy = "occurred_at"
    show_full_result_count = False


@admin.register(Stock)
class StockAdmin(ReadOnlyAdmin):
    """Derived from the ledger; `warehouse_verify_stock --rebuild` recomputes it."""

    list_display = ["warehouse_id", "product_id", "balance", "short", "updated_at"]
    search_fields = ["=warehouse_id", "=product_id"]
    show_full_result_count = False

    @admin.display(boolean=True, description="short", ordering="balance")
    def short(self, stock: Stock) -> bool:
        """The balance went below zero (more left than arrived): a human should look."""
        return stock.balance < 0


def _replay(dead_letter_id: int) -> tuple[str, int]:
    try:
        result = services.dead_letter_replay(dead_letter_id=dead_letter_id)
    except ApplicationError as exc:
        return f"#{dead_letter_id}: {exc.message}", messages.WARNING
    level = messages.SUCCESS if result.replayed_at else messages.WARNING
    return f"#{dead_letter_id}: {result.replay_outcome or result.reason}", level


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "reason",
        "detail",
        "movement_id",
        "event",
        "received_at",
        "replayed_at",
        "replay_outcome",
    ]
    list_filter = ["reason", "replay_outcome"]
    search_fields = ["=movement_id", "detail"]
    actions = ["replay"]
    change_form_template = "admin/warehouse/deadletter/change_form.html"

    @admin.action(description="Replay through the ingest pipeline")
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        for dead_letter_id in queryset.order_by("pk").values_list("pk", flat=True):
            self.message_user(request, *_replay(dead_letter_id))

    def get_urls(self) -> list[URLPattern]:
        replay_one = self.admin_site.admin_view(require_POST(self.replay_view))
        return [
            path("<int:dead_letter_id>/replay/", replay_one, name="warehouse_deadletter_replay"),
            *super().get_urls(),
        ]

    def replay_view(self, request: HttpRequest, dead_letter_id: int) -> HttpResponse:
        """POST from the dead letter's page: replay it through the ingest service."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        get_object_or_404(DeadLetter, pk=dead_letter_id)
        self.message_user(request, *_replay(dead_letter_id))
        return HttpResponseRedirect(
            reverse("admin:warehouse_deadletter_change", args=[dead_letter_id])
        )

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        if object_id.isdigit():
            context["replay_url"] = reverse(
                "admin:warehouse_deadletter_replay", args=[int(object_id)]
            )
        return super().change_view(request, object_id, form_url, context)


@admin.register(ConsumerHeartbeat)
class ConsumerHeartbeatAdmin(ReadOnlyAdmin):
    list_display = ["name", "beat_at", "started_at"]
