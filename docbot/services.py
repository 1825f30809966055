"""Writes of the document vault: accounts, types, documents, ingestion, share links."""

import hashlib
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core import signing
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.utils import timezone
from knox.models import AuthToken

from common.exceptions import Conflict, NotFound, Unprocessable, ValidationFailed
from docbot import metrics, telegram
from docbot.bot import texts
from docbot.models import Document, DocumentType, IngestionFailure, TelegramAccount

logger = structlog.get_logger(__name__)

TYPE_NAME_MAX = 64
DOCUMENT_NAME_MAX = 128
_SHARE_SALT = "docbot.share"
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

AnyUser = AbstractBaseUser | AnonymousUser


def _clean_name(value: str, *, limit: int, what: str) -> str:
    name = " ".join(value.split())
    if not name:
        raise ValidationFailed(f"The {what} name cannot be empty.", code="name_empty")
    if len(name) > limit:
        raise ValidationFailed(
            f"The {what} name is longer than {limit} characters.",
            code="name_too_long",
            details={"limit": limit},
        )
    return name


# --- accounts and the service identity ---------------------------------------------------


def telegram_account_user(*, telegram_user_id: int) -> Any:
    """The user behind a Telegram id, created on first contact (safe under concurrent calls)."""
    account = (
        TelegramAccount.objects.select_related("user")
        .filter(telegram_user_id=telegram_user_id)
        .first()
    )
    if account is not None:
        return account.user
    user_model = get_user_model()
    try:
        with transaction.atomic():
            user = user_model.objects.create_user(username=f"tg{telegram_user_id}")
            TelegramAccount.objects.create(user=user, telegram_user_id=telegram_user_id)
            return user
    except IntegrityError:
        return (
            TelegramAccount.objects.select_related("user")
            .get(telegram_user_id=telegram_user_id)
            .user
        )


def service_user_get_or_create() -> Any:
    user, _ = get_user_model().objects.get_or_create(
        username=settings.DOCBOT_SERVICE_USERNAME, defaults={"is_active": True}
    )
    return user


def service_token_issue(*, ttl: timedelta | None = None) -> str:
    """A new knox token of the docbot service user (hashed at rest; shown only here)."""
    _, token = AuthToken.objects.create(user=service_user_get_or_create(), expiry=ttl)
    return str(token)


# --- types --------------------------------------------------------------------------------


@transaction.atomic
def type_create(*, user: Any, name: str) -> DocumentType:
    clean = _clean_name(name, limit=TYPE_NAME_MAX, what="type")
    if DocumentType.objects.filter(user=user, name__iexact=clean).exists():
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists")
    try:
        with transaction.atomic():
            return DocumentType.objects.create(user=user, name=clean)
    except IntegrityError as exc:
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists") from exc


def _own_type(user: Any, type_id: int) -> DocumentType:
    found = DocumentType.objects.filter(user=user, pk=type_id).first()
    if found is None:
        raise NotFound("No such document type.", code="type_not_found")
    return found


@transaction.atomic
def type_rename(*, user: Any, type_id: int, name: str) -> DocumentType:
    doc_type = _own_type(user, type_id)
    clean = _clean_name(name, limit=TYPE_NAME_MAX, what="type")
    if DocumentType.objects.filter(user=user, name__iexact=clean).exclude(pk=type_id).exists():
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists")
    doc_type.name = clean
    doc_type.save(update_fields=["name"])
    return doc_type


@transaction.atomic
def type_delete(*, user: Any, type_id: int) -> None:
    doc_type = _own_type(user, type_id)
    if doc_type.documents.exists():
        raise Conflict("The type still holds documents.", code="type_not_empty")
    doc_type.delete()


# --- documents ----------------------------------------------------------------------------


def _own_document(user: Any, document_id: int, *, lock: bool = False) -> Document:
    queryset = Document.objects.select_related("type")
    if lock:
        queryset = queryset.select_for_update(of=("self",))
    found = queryset.filter(user=user, pk=document_id).first()
    if found is None:
        raise NotFound("No such document.", code="document_not_found")
    return found


def _enqueue_ingest(document_id: int) -> None:
    from docbot.tasks import ingest_document

    try:
        ingest_document.delay(document_id)
    except Exception:
        # The row is committed; a broker outage or an eager-mode failure must not turn the
        # accepted request into a 500. The document stays pending and is visible in the admin.
        logger.exception("docbot_ingest_enqueue_failed", document_id=document_id)
        return
    metrics.QUEUE_SENT.labels("docbot.ingest_document").inc()


@transaction.atomic
def document_create(
    *,
    user: Any,
    type_id: int,
    name: str,
    chat_id: int,
    file_id: str,
    file_unique_id: str = "",
    size: int | None = None,
    mime_type: str = "",
    file_name: str = "",
) -> Document:
    """Create a pending document and enqueue its ingestion after commit.

    A repeat of the same request (same user, type, name and Telegram file) returns the existing
    document and enqueues nothing."""
    doc_type = _own_type(user, type_id)
    clean = _clean_name(name, limit=DOCUMENT_NAME_MAX, what="document")
    if size is not None and size > settings.DOCBOT_MAX_FILE_BYTES:
        raise Unprocessable(
            "The file is larger than 20 MB.",
            code="file_too_large",
            details={"limit": settings.DOCBOT_MAX_FILE_BYTES},
        )
    existing = Document.objects.filter(user=user, type=doc_type, name=clean).first()
    if existing is not None:
        if file_unique_id and existing.telegram_file_unique_id == file_unique_id:
            return existing
        raise Conflict(f"{clean!r} already exists in {doc_type.name}.", code="name_taken")
    try:
        with transaction.atomic():
            document = Document.objects.create(
                user=user,
                type=doc_type,
                name=clean,
                chat_id=chat_id,
                telegram_file_id=file_id,
                telegram_file_unique_id=file_unique_id,
                size=size,
                mime_type=mime_type[:128],
                file_name=file_name[:255],
            )
    except IntegrityError as exc:
        raise Conflict(f"{clean!r} already exists in {doc_type.name}.", code="name_taken") from exc
    document_id = document.pk
    transaction.on_commit(lambda: _enqueue_ingest(document_id))
    return document


@transaction.atomic
def document_update(
    *, user: Any, document_id: int, name: str | None = None, type_id: int | None = None
) -> Document:
    document = _own_document(user, document_id, lock=True)
    if name is not None:
        document.name = _clean_name(name, limit=DOCUMENT_NAME_MAX, what="document")
    if type_id is not None:
        document.type = _own_type(user, type_id)
    clash = Document.objects.filter(user=user, type=document.type, name=document.name).exclude(
        pk=document.pk
    )
    if clash.exists():
        raise Conflict(
            f"{document.name!r} already exists in {document.type.name}.", code="name_taken"
        )
    document.save(update_fields=["name", "type"])
    return document


@transaction.atomic
def document_delete(*, user: Any, document_id: int) -> str:
    """Delete the row and, after commit, its stored object. Returns the document's name."""
    document = _own_document(user, document_id, lock=True)
    storage_name = document.storage_name
    name = document.name
    document.delete()
    if storage_name:
        transaction.on_commit(lambda: default_storage.delete(storage_name))
    return name


# --- ingestion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestOutcome:
    status: str  # "stored", "duplicate", "already_done", "gone"
    storage_name: str = ""


def _notify(chat_id: int, text: str) -> None:
    try:
        telegram.send_message(chat_id, text)
    except Exception:
        logger.exception("docbot_notify_failed", chat_id=chat_id)


def _storage_path(document: Document, digest: str) -> str:
    original = document.file_name or document.name
    safe = _UNSAFE_FILE_CHARS.sub("_", original).strip("._")[:80] or "file"
    return f"docbot/{document.user_id}/{digest[:2]}/{digest[:16]}-{safe}"


def document_ingest(*, document_id: int) -> IngestOutcome:
    """Fetch a pending document's file from Telegram (streamed to a spooled temp file), hash it,
    store it through Django storage under a fresh name and mark the row stored; tell the user
    after commit.

    Idempotent: the row is re-read under a lock and only a `pending` row is stored, so a
    redelivered task creates nothing twice. Same content already stored for the same user:
    the pending row is removed and the user is told the existing document's name."""
    snapshot = Document.objects.filter(pk=document_id).values("status", "telegram_file_id")
    row = snapshot.first()
    if row is None:
        return IngestOutcome("gone")
    if row["status"] != Document.Status.PENDING:
        return IngestOutcome("already_done")
    file_path = telegram.get_file_path(row["telegram_file_id"])
    digest = hashlib.sha256()
    with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as spool:

        class _HashingSink:
            def write(self, chunk: bytes) -> None:
                digest.update(chunk)
                spool.write(chunk)

        telegram.download_into(
            file_path,
            _HashingSink(),  # type: ignore[arg-type]
            max_bytes=settings.DOCBOT_MAX_FILE_BYTES,
        )
        size = spool.tell()
        spool.seek(0)
        return _store(document_id, digest.hexdigest(), size, spool)


def _store(document_id: int, digest: str, size: int, content: Any) -> IngestOutcome:
    with transaction.atomic():
        document = (
            Document.objects.select_for_update(of=("self",))
            .select_related("type")
            .filter(pk=document_id)
            .first()
        )
        if document is None:
            return IngestOutcome("gone")
        if document.status != Document.Status.PENDING:
            return IngestOutcome("already_done")
        twin = (
            Document.objects.filter(
                user_id=document.user_id, sha256=digest, status=Document.Status.STORED
            )
            .exclude(pk=document.pk)
            .first()
        )
        chat_id = document.chat_id
        if twin is not None:
            twin_name = twin.name
            document.delete()
            transaction.on_commit(
                lambda: _notify(chat_id, texts.DUPLICATE.format(existing=twin_name))
            )
            return IngestOutcome("duplicate")
        storage_name = default_storage.save(_storage_path(document, digest), File(content))
        document.sha256 = digest
        document.size = size
        document.storage_name = storage_name
        document.status = Document.Status.STORED
        document.stored_at = timezone.now()
        document.save(update_fields=["sha256", "size", "storage_name", "status", "stored_at"])
        name = document.name
        transaction.on_commit(lambda: _notify(chat_id, texts.STORED.format(name=name, size=size)))
    logger.info("docbot_document_stored", document_id=document_id, size=size, sha256=digest)
    return IngestOutcome("stored", storage_name)


@transaction.atomic
def document_ingest_fail(*, document_id: int, error: str) -> None:
    """Record why ingestion gave up, mark the row failed and tell the user (once)."""
    document = Document.objects.select_for_update().filter(pk=document_id).first()
    IngestionFailure.objects.create(
        document_id=document_id,
        user_id=document.user_id if document else None,
        error=error[:4000],
    )
    if document is None or document.status != Document.Status.PENDING:
        return
    document.status = Document.Status.FAILED
    document.save(update_fields=["status"])
    chat_id, name = document.chat_id, document.name
    transaction.on_commit(lambda: _notify(chat_id, texts.INGEST_FAILED.format(name=name)))


# --- share links --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareLink:
    url: str
    token: str
    expires_at: datetime


def share_link_create(*, user: Any, document_id: int) -> ShareLink:
    """A signed, expiring link bound to this document's id and content hash."""
    document = _own_document(user, document_id)
    if document.status != Document.Status.STORED:
        raise Conflict("The document is not stored yet.", code="not_stored")
    expires_at = timezone.now() + timedelta(seconds=settings.DOCBOT_SHARE_LINK_TTL_SECONDS)
    payload = {"d": document.pk, "h": document.sha256[:16], "e": int(expires_at.timestamp())}
    token = signing.dumps(payload, salt=_SHARE_SALT, compress=True)
    base = settings.DOCBOT_PUBLIC_BASE_URL.rstrip("/")
    return ShareLink(url=f"{base}/docbot/files/{token}", token=token, expires_at=expires_at)


def share_link_resolve(*, token: str) -> Document:
    """The document a link points to; NotFound when forged, expired or no longer matching."""
    try:
        payload = signing.loads(token, salt=_SHARE_SALT)
    except signing.BadSignature as exc:
        raise NotFound("This link is not valid.", code="link_invalid") from exc
    if int(payload.get("e", 0)) < timezone.now().timestamp():
        raise NotFound("This link has expired.", code="link_expired")
    document = Document.objects.filter(pk=payload.get("d"), status=Document.Status.STORED).first()
    if document is None or document.sha256[:16] != payload.get("h"):
        raise NotFound("This link is not valid.", code="link_invalid")
    return document
