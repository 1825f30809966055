from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from common.exceptions import ApplicationError
from warehouse import services
from warehouse.models import ConsumerHeartbeat, DeadLetter, LedgerEntry, Stock


@admin.register(LedgerEntry)
class LedgerEntryAdmin(admin.ModelAdmin):
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

    def has_change_permission(self, request: HttpRequest, obj: LedgerEntry | None = None) -> bool:
        return False  # append-only ledger

    def has_delete_permission(self, request: HttpRequest, obj: LedgerEntry | None = None) -> bool:
        return False


@admin.register(Stock)
class StockAdmin(admin.ModelAdmin):
    list_display = ["warehouse_id", "product_id", "balance", "updated_at"]
    search_fields = ["=warehouse_id", "=product_id"]
    show_full_result_count = False

    def has_change_permission(self, request: HttpRequest, obj: Stock | None = None) -> bool:
        return False  # derived from the ledger; rebuild with warehouse_verify_stock --rebuild

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
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
    readonly_fields = [f.name for f in DeadLetter._meta.fields]
    actions = ["replay"]

    @admin.action(description="Replay through the ingest pipeline")
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        for dead_letter in queryset.order_by("pk"):
            try:
                result = services.dead_letter_replay(dead_letter_id=dead_letter.pk)
            except ApplicationError as exc:
                self.message_user(request, f"#{dead_letter.pk}: {exc.message}", messages.WARNING)
            else:
                self.message_user(request, f"#{dead_letter.pk}: {result.replay_outcome}")


@admin.register(ConsumerHeartbeat)
class ConsumerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ["name", "beat_at", "started_at"]
