"""Operator UI for the document vault. Every write goes through docbot's services, so the admin
keeps the invariants the bot and the API keep (names cleaned and unique per owner, a document
only in its owner's types, a deleted document's stored file removed after commit): types are
added, renamed and deleted, documents renamed, moved and deleted, through `services`. What the
bot and the workers own is read-only: the service identity (`docbot_service_account` makes
and rotates it), Telegram accounts and received files (the bot records them), ingestion
failures (an append-only log), the polling lease (the pollers take and renew it); documents are
only ever made from a file sent to the bot."""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from common.admin import ReadOnlyAdmin
from common.exceptions import ApplicationError
from docbot import services
from docbot.models import (
    Document,
    DocumentType,
    IngestionFailure,
    PollerLease,
    ReceivedFile,
    ServiceAccount,
    TelegramAccount,
)


class _DryRun(Exception):
    """Rolls back the savepoint of a write that only checked what the service would say."""


class ServiceForm(forms.ModelForm):
    """A ModelForm whose write is a service call (`write`). `clean` runs that call once inside
    a savepoint it then rolls back, so a refusal (`ApplicationError`) is a form error on the
    page, not a 500; the admin's `save_model` then makes the write for real."""

    def write(self) -> Any:
        raise NotImplementedError

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            with transaction.atomic():
                self.write()
                raise _DryRun
        except _DryRun:
            pass
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from exc
        return cleaned


def _reload(obj: Any, written: Any) -> None:
    """Show what the service stored (cleaned names...) on the admin's own object."""
    obj.pk = written.pk
    obj.refresh_from_db()


def _each(
    modeladmin: admin.ModelAdmin, request: HttpRequest, rows: QuerySet[Any], call: Any
) -> None:
    """A bulk write, one service call per row; a refusal is a warning, the rest go on."""
    for row in rows:
        try:
            call(row)
        except ApplicationError as exc:
            modeladmin.message_user(request, f"{row}: {exc.message}", messages.WARNING)


@admin.register(ServiceAccount)
class ServiceAccountAdmin(ReadOnlyAdmin):
    """Shown, never made here: `manage.py docbot_service_account` creates and rotates it."""

    list_display = ["user", "created_at", "rotated_at"]
    exclude = ["token_salt"]


@admin.register(ReceivedFile)
class ReceivedFileAdmin(ReadOnlyAdmin):
    list_display = ["file_unique_id", "account", "size", "mime_type", "received_at"]
    search_fields = ["file_unique_id", "account__telegram_user_id"]


@admin.register(TelegramAccount)
class TelegramAccountAdmin(ReadOnlyAdmin):
    """Made by the bot on a user's first contact (`telegram_account_user`); a Telegram id is
    never re-pointed to another account here."""

    list_display = ["telegram_user_id", "user", "created_at"]
    search_fields = ["telegram_user_id", "user__username"]


class DocumentTypeForm(ServiceForm):
    class Meta:
        model = DocumentType
        fields = ["user", "name"]

    def write(self) -> DocumentType:
        name = self.cleaned_data["name"]
        if self.instance.pk is None:
            return services.type_create(user=self.cleaned_data["user"], name=name)
        return services.type_rename(user=self.instance.user, type_id=self.instance.pk, name=name)


@admin.register(DocumentType)
class DocumentTypeAdmin(admin.ModelAdmin):
    """Added (`type_create`), renamed (`type_rename`) and deleted when empty (`type_delete`)."""

    form = DocumentTypeForm
    list_display = ["name", "user", "created_at"]
    search_fields = ["name", "user__username"]
    raw_id_fields = ["user"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["user", "created_at"] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: DocumentType, form: Any, change: bool) -> None:
        _reload(obj, form.write())

    def delete_model(self, request: HttpRequest, obj: DocumentType) -> None:
        services.type_delete(user=obj.user, type_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[DocumentType]) -> None:
        _each(self, request, queryset, lambda t: services.type_delete(user=t.user, type_id=t.pk))


class DocumentForm(ServiceForm):
    class Meta:
        model = Document
        fields = ["name", "type"]

    def write(self) -> Document:
        return services.document_update(
            user=self.instance.user,
            document_id=self.instance.pk,
            name=self.cleaned_data["name"],
            type_id=self.cleaned_data["type"].pk,
        )


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    """Renamed or moved to another of its owner's types (`document_update`), deleted with its
    stored file (`document_delete`); documents are made only from files sent to the bot."""

    form = DocumentForm
    list_display = ["name", "type", "user", "status", "size", "sha256", "created_at", "stored_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["name", "sha256", "user__username", "telegram_file_unique_id"]
    raw_id_fields = ["type"]
    readonly_fields = [
        "user",
        "status",
        "size",
        "sha256",
        "mime_type",
        "file_name",
        "storage_name",
        "telegram_file_id",
        "telegram_file_unique_id",
        "created_at",
        "stored_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Document, form: Any, change: bool) -> None:
        _reload(obj, form.write())

    def delete_model(self, request: HttpRequest, obj: Document) -> None:
        services.document_delete(user=obj.user, document_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        _each(
            self,
            request,
            queryset,
            lambda d: services.document_delete(user=d.user, document_id=d.pk),
        )


@admin.register(IngestionFailure)
class IngestionFailureAdmin(ReadOnlyAdmin):
    """Append-only: why an ingestion gave up (`document_ingest_fail`)."""

    list_display = ["document_id", "user", "created_at", "error"]
    list_filter = ["created_at"]
    search_fields = ["document_id", "error"]


@admin.register(PollerLease)
class PollerLeaseAdmin(ReadOnlyAdmin):
    """Which polling process holds a bot's getUpdates loop, until when (without REDIS_URL; the
    pollers take, renew and release it themselves)."""

    list_display = ["bot", "holder", "expires_at"]
