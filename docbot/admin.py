from django.contrib import admin

from docbot.models import Document, DocumentType, IngestionFailure, TelegramAccount


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
