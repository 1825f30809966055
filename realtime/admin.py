from django.contrib import admin

from realtime.models import ConnectionTicket


@admin.register(ConnectionTicket)
class ConnectionTicketAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "created_at", "expires_at", "used_at"]
    list_filter = ["used_at"]
    search_fields = ["user__username"]
    readonly_fields = ["key_hash", "user", "created_at", "expires_at", "used_at"]

    def has_add_permission(self, request: object) -> bool:
        return False
