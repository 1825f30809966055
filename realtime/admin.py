"""Operator UI for the messenger: everything is read-only (rooms, memberships and messages move
through the realtime services and their REST/WebSocket doors); moderation blanks a message
through `message_moderate_delete`, keeping the room's seq gap-free."""

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from common.admin import ReadOnlyAdmin, ReadOnlyInline
from realtime import services
from realtime.models import ConnectionTicket, Membership, Message, Room


@admin.register(ConnectionTicket)
class ConnectionTicketAdmin(ReadOnlyAdmin):
    list_display = ["id", "user", "created_at", "expires_at", "used_at"]
    list_filter = ["used_at"]
    search_fields = ["user__username"]
    exclude = ["key_hash"]


class MembershipInline(ReadOnlyInline):
    model = Membership
    fields = ["user", "role", "joined_at", "last_read_seq"]


@admin.register(Room)
class RoomAdmin(ReadOnlyAdmin):
    list_display = ["slug", "title", "kind", "last_seq", "created_by", "created_at"]
    list_filter = ["kind"]
    search_fields = ["slug", "title"]
    exclude = ["direct_key"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ["room", "user", "role", "joined_at", "last_read_seq"]
    list_filter = ["role", "room__kind"]
    search_fields = ["room__slug", "user__username"]
    list_select_related = ["room", "user"]


@admin.action(description="Delete (moderation): blank the text, keep the seq")
def moderate_delete(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet) -> None:
    for message_id in queryset.values_list("pk", flat=True):
        services.message_moderate_delete(message_id=message_id)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["id", "room", "seq", "sender", "short_text", "created_at", "deleted_at"]
    list_filter = ["room__kind", "deleted_at"]
    search_fields = ["text", "sender__username", "room__slug"]
    list_select_related = ["room", "sender"]
    actions = [moderate_delete]

    @admin.display(description="text")
    def short_text(self, message: Message) -> str:
        return message.text[:80]
