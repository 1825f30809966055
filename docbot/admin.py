from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from docbot.models import (
    Document,
    DocumentType,
    IngestionFailure,
    ReceivedFile,
    ServiceAccount,
    TelegramAccount,
)


@admin.register(ServiceAccount)
class ServiceAccountAdmin(admin.ModelAdmin):
    """Shown, never made here: `manage.py docbot_service_account` creates and rotates it."""

    list_display = ["user", "created_at", "rotated_at"]
    readonly_fields = ["user", "created_at", "rotated_at"]
    exclude = ["token_salt"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ReceivedFile)
class ReceivedFileAdmin(admin.ModelAdmin):
    list_display = ["file_unique_id", "account", "size", "mime_type", "received_at"]
    search_fields = ["file_unique_id", "account__telegram_user_id"]
    raw_id_fields = ["account"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TelegramAccount)
class TelegramAccountAdmin(admin.ModelAdmin):
    list_display = ["telegram_user_id", "user", "created_at"]
    search_fields = ["telegram_user_id", "user__username"]
    raw_id_fields = ["user"]


@admin.register(DocumentType)
class DocumentTypeAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "created_at"]
    search_fields = ["name", "user__username"]
    raw_id_fields = ["user"]


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["name", "type", "user", "status", "size", "sha256", "created_at", "stored_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["name", "sha256", "user__username", "telegram_file_unique_id"]
    raw_id_fields = ["user", "type"]
    readonly_fields = ["sha256", "size", "storage_name", "stored_at", "created_at"]


@admin.register(IngestionFailure)
class IngestionFailureAdmin(admin.ModelAdmin):
    list_display = ["document_id", "user", "created_at", "error"]
    list_filter = ["created_at"]
    search_fields = ["document_id", "error"]
    raw_id_fields = ["user"]
