from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from realtime import services
from realtime.models import ConnectionTicket, Membership, Message, Room


@admin.register(ConnectionTicket)
class ConnectionTicketAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "created_at", "expires_at", "used_at"]
    list_filter = ["used_at"]
    search_fields = ["user__username"]
    readonly_fields = ["key_hash", "user", "created_at", "expires_at", "used_at"]

    def has_add_permission(self, request: object) -> bool:
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]
    readonly_fields = ["joined_at", "last_read_seq"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "kind", "last_seq", "created_by", "created_at"]
    list_filter = ["kind"]
    search_fields = ["slug", "title"]
    readonly_fields = ["last_seq", "direct_key", "created_at"]
    raw_id_fields = ["created_by"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "role", "joined_at", "last_read_seq"]
    list_filter = ["role", "room__kind"]
    search_fields = ["room__slug", "user__username"]
    raw_id_fields = ["room", "user"]


@admin.action(description="Delete (moderation): blank the text, keep the seq")
def moderate_delete(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet) -> None:
    for message_id in queryset.values_list("pk", flat=True):
        services.message_moderate_delete(message_id=message_id)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "seq", "sender", "short_text", "created_at", "deleted_at"]
    list_filter = ["room__kind", "deleted_at"]
    search_fields = ["text", "sender__username", "room__slug"]
    readonly_fields = ["room", "seq", "sender", "text", "client_id", "created_at", "deleted_at"]
    actions = [moderate_delete]

    @admin.display(description="text")
    def short_text(self, message: Message) -> str:
        return message.text[:80]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # A hard delete would leave a hole in the room's seq; moderation blanks instead.
        return False
