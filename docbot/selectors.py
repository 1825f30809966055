"""Reads of the document vault. Querysets are lazy and unlocked; users are the auth user model
(`Any`: the vault never names the concrete class)."""

import functools
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import is_password_usable
from django.db import connection
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Subquery

from common.exceptions import NotFound
from docbot.models import (
    Document,
    DocumentType,
    IngestionFailure,
    ServiceAccount,
    TelegramAccount,
)


def service_account() -> ServiceAccount | None:
    """The docbot service identity (with its user), if one was made."""
    return ServiceAccount.objects.select_related("user").first()


def is_service_account(*, user: Any) -> bool:
    """True only for the user marked as the service identity; a username proves nothing."""
    return bool(user.pk) and ServiceAccount.objects.filter(user_id=user.pk).exists()


@dataclass(frozen=True)
class ServiceActing:
    """What the backend needs to know about a call made with a token of `user` naming a
    Telegram user: whether `user` is the service identity, whether its password is usable (it
    must not be), and the user mapped to that Telegram id (None before first contact)."""

    is_service: bool
    password_usable: bool
    acting: Any | None


@functools.cache
def _service_acting_sql() -> str:
    user_model = get_user_model()
    quote = connection.ops.quote_name
    users = quote(user_model._meta.db_table)
    pk = quote(user_model._meta.pk.column)
    password = quote(user_model._meta.get_field("password").column)
    services = quote(ServiceAccount._meta.db_table)
    accounts = quote(TelegramAccount._meta.db_table)
    # Identifiers only, from the models' own metadata; the values go as parameters.
    return (
        f"SELECT u.*, EXISTS(SELECT 1 FROM {services} s WHERE s.{quote('user_id')} = %s) "  # noqa: S608
        f"AS docbot_by_service, (SELECT p.{password} FROM {users} p WHERE p.{pk} = %s) "
        f"AS docbot_service_password FROM {accounts} a JOIN {users} u "
        f"ON u.{pk} = a.{quote('user_id')} WHERE a.{quote('telegram_user_id')} = %s"
    )


def service_acting_for(*, user: Any, telegram_user_id: int) -> ServiceActing:
    """`ServiceActing` for a call by `user` naming `telegram_user_id`: one raw query when the
    mapping exists (the bot's every call; the ORM's compilation of the same query cost about
    four times the query itself, measured), three on first contact."""
    found = list(
        get_user_model()._default_manager.raw(
            _service_acting_sql(), [user.pk, user.pk, telegram_user_id]
        )
    )
    if not found:
        is_service = is_service_account(user=user)
        return ServiceActing(is_service, is_service and user.has_usable_password(), None)
    row = found[0]
    return ServiceActing(
        is_service=bool(user.pk) and bool(getattr(row, "docbot_by_service", False)),
        password_usable=is_password_usable(getattr(row, "docbot_service_password", None)),
        acting=row,
    )


def telegram_account_user(*, telegram_user_id: int) -> Any | None:
    """The user mapped to a Telegram id, or None (never looked up by username)."""
    account = (
        TelegramAccount.objects.select_related("user")
        .filter(telegram_user_id=telegram_user_id)
        .first()
    )
    return account.user if account is not None else None


def telegram_chat_of(*, user_id: int) -> int | None:
    """The private chat of a user's Telegram identity (its Telegram user id), or None."""
    chat: int | None = (
        TelegramAccount.objects.filter(user_id=user_id)
        .values_list("telegram_user_id", flat=True)
        .first()
    )
    return chat


def telegram_account_of(*, user: Any) -> TelegramAccount | None:
    """The Telegram identity behind a user, or None for accounts that are not Telegram's."""
    if not user.pk:
        return None
    return TelegramAccount.objects.filter(user_id=user.pk).first()


def type_list(*, user: Any, non_empty: bool = False) -> QuerySet[DocumentType]:
    """The user's types, each annotated with `document_count` (an int; failed uploads not
    counted), by name then id; `non_empty` keeps only types with a document."""
    queryset = DocumentType.objects.filter(user=user).annotate(
        document_count=Count("documents", filter=~Q(documents__status=Document.Status.FAILED))
    )
    if non_empty:
        queryset = queryset.filter(document_count__gt=0)
    return queryset.order_by("name", "id")


def document_list(
    *, user: Any, type_id: int | None = None, query: str = "", name: str = ""
) -> QuerySet[Document]:
    """The user's documents that did not fail (pending and stored), with their type, newest
    first; `type_id` keeps one type, `query` matches names case-insensitively (a substring),
    `name` exactly once its whitespace is collapsed."""
    queryset = (
        Document.objects.filter(user=user)
        .exclude(status=Document.Status.FAILED)
        .select_related("type")
    )
    if type_id is not None:
        queryset = queryset.filter(type_id=type_id)
    if query:
        queryset = queryset.filter(name__icontains=query)
    if name:
        queryset = queryset.filter(name=" ".join(name.split()))
    return queryset.order_by("-created_at", "-id")


def document_get(*, user: Any, document_id: int) -> Document:
    """The user's own document with its type; another user's id is simply not found:
    raises `NotFound` (`document_not_found`)."""
    found = Document.objects.select_related("type").filter(user=user, pk=document_id).first()
    if found is None:
        raise NotFound("No such document.", code="document_not_found")
    return found


# --- the operator console (`docbot.console`) ------------------------------------------------


def console_documents_pending() -> int:
    """Documents waiting for ingestion (`pending`). One count, no lock."""
    return Document.objects.filter(status=Document.Status.PENDING).count()


def console_documents_failed() -> int:
    """Documents whose ingestion gave up (`failed`), each retryable. One count, no lock."""
    return Document.objects.filter(status=Document.Status.FAILED).count()


def console_ingestion_failures(*, limit: int = 20) -> list[IngestionFailure]:
    """The newest failure record of each document still `failed` (a retried and stored one
    needs nobody), newest first, at most `limit`, each annotated with `document_name`. One
    query walking the failures backwards by id, no lock."""
    still_failed = Document.objects.filter(
        pk=OuterRef("document_id"), status=Document.Status.FAILED
    )
    rows = (
        IngestionFailure.objects.filter(Exists(still_failed))
        .annotate(document_name=Subquery(still_failed.values("name")[:1]))
        .order_by("-id")[: limit * 3]
    )
    newest: dict[int, IngestionFailure] = {}
    for failure in rows:
        newest.setdefault(failure.document_id, failure)
    return list(newest.values())[:limit]
