"""The vault's contents: files received from Telegram users, document types, documents.

Names (of types and documents) have their whitespace collapsed and are unique per owner:
type names case-insensitively, document names within their type."""

from typing import Any

import structlog
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from common.exceptions import Conflict, NotFound, Unprocessable, ValidationFailed
from docbot import metrics, tasks
from docbot.models import Document, DocumentType, ReceivedFile
from docbot.services.accounts import telegram_account_required

logger = structlog.get_logger(__name__)

TYPE_NAME_MAX = 64
DOCUMENT_NAME_MAX = 128


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


# --- files received from Telegram users ---------------------------------------------------


def received_file_record(
    *,
    user: Any,
    file_id: str,
    file_unique_id: str,
    size: int | None = None,
    mime_type: str = "",
    file_name: str = "",
) -> ReceivedFile:
    """Remember that the Telegram user behind `user` sent the bot this file (the bot calls this
    for a file message it received from them). `size` in bytes as Telegram reported it (or
    None); `mime_type` is cut to 128 and `file_name` to 255 characters.

    Idempotent on (user, `file_unique_id`): the same file sent again refreshes its `file_id`
    and keeps its id, also when two deliveries race. Raises `PermissionDenied`
    (`telegram_account_required`) for an account with no Telegram identity."""
    account = telegram_account_required(user)
    values = {
        "file_id": file_id,
        "size": size,
        "mime_type": mime_type[:128],
        "file_name": file_name[:255],
    }
    try:
        with transaction.atomic():
            received, _ = ReceivedFile.objects.update_or_create(
                account=account, file_unique_id=file_unique_id, defaults=values
            )
    except IntegrityError:
        # Recorded concurrently by a retried update: the row exists now.
        ReceivedFile.objects.filter(account=account, file_unique_id=file_unique_id).update(**values)
        received = ReceivedFile.objects.get(account=account, file_unique_id=file_unique_id)
    return received


# --- types --------------------------------------------------------------------------------


@transaction.atomic
def type_create(*, user: Any, name: str) -> DocumentType:
    """A new document type of `user`, its name cleaned (1-64 characters).

    Not idempotent: the same name again is a `Conflict` (`type_exists`, also when a concurrent
    request won the unique constraint). Raises `ValidationFailed` (`name_empty`,
    `name_too_long`)."""
    clean = _clean_name(name, limit=TYPE_NAME_MAX, what="type")
    if DocumentType.objects.filter(user=user, name__iexact=clean).exists():
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists")
    try:
        with transaction.atomic():
            return DocumentType.objects.create(user=user, name=clean)
    except IntegrityError as exc:
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists") from exc


def own_type(user: Any, type_id: int) -> DocumentType:
    """`user`'s type `type_id`; another user's is `NotFound` (`type_not_found`), as a missing
    one."""
    found = DocumentType.objects.filter(user=user, pk=type_id).first()
    if found is None:
        raise NotFound("No such document type.", code="type_not_found")
    return found


@transaction.atomic
def type_rename(*, user: Any, type_id: int, name: str) -> DocumentType:
    """Rename `user`'s type (name cleaned, 1-64 characters); renaming to its own name is a
    no-op save. Raises `NotFound` (`type_not_found`), `ValidationFailed` (`name_empty`,
    `name_too_long`) and `Conflict` (`type_exists`) for another type's name."""
    doc_type = own_type(user, type_id)
    clean = _clean_name(name, limit=TYPE_NAME_MAX, what="type")
    if DocumentType.objects.filter(user=user, name__iexact=clean).exclude(pk=type_id).exists():
        raise Conflict(f"You already have the type {clean!r}.", code="type_exists")
    doc_type.name = clean
    doc_type.save(update_fields=["name"])
    return doc_type


@transaction.atomic
def type_delete(*, user: Any, type_id: int) -> None:
    """Delete `user`'s empty type. Raises `NotFound` (`type_not_found`, also on a repeat) and
    `Conflict` (`type_not_empty`) while it holds documents (any status)."""
    doc_type = own_type(user, type_id)
    if doc_type.documents.exists():
        raise Conflict("The type still holds documents.", code="type_not_empty")
    doc_type.delete()


# --- documents ----------------------------------------------------------------------------


def own_document(user: Any, document_id: int, *, lock: bool = False) -> Document:
    """`user`'s document with its type; another user's is `NotFound` (`document_not_found`).
    `lock`: the document row only is locked (select_for_update), inside the caller's
    transaction."""
    queryset = Document.objects.select_related("type")
    if lock:
        queryset = queryset.select_for_update(of=("self",))
    found = queryset.filter(user=user, pk=document_id).first()
    if found is None:
        raise NotFound("No such document.", code="document_not_found")
    return found


def _enqueue_ingest(document_id: int) -> None:
    try:
        tasks.ingest_document.delay(document_id)
    except Exception:
        # The row is committed; a broker outage or an eager-mode failure must not turn the
        # accepted request into a 500. The document stays pending and is visible in the admin.
        logger.exception("docbot_ingest_enqueue_failed", document_id=document_id)
        return
    metrics.QUEUE_SENT.labels("docbot.ingest_document").inc()


@transaction.atomic
def document_create(*, user: Any, type_id: int, name: str, file: int) -> Document:
    """Create a pending document from a file the same Telegram user sent the bot (`file`, a
    `ReceivedFile` id: another user's is not found) and enqueue its ingestion after commit.
    The worker's notices go to that user's own private chat; neither the chat nor the Telegram
    file id is ever the caller's choice.

    A repeat of the same request (same user, type, name and file) returns the existing
    document and enqueues nothing. Raises `PermissionDenied` (`telegram_account_required`),
    `NotFound` (`file_not_found`, `type_not_found`), `ValidationFailed` (`name_empty`,
    `name_too_long`: 1-128 characters), `Unprocessable` (`file_too_large`: over
    DOCBOT_MAX_FILE_BYTES, the Bot API's 20 MB download limit) and `Conflict` (`name_taken`:
    another file under that name in the type)."""
    account = telegram_account_required(user)
    received = ReceivedFile.objects.filter(account=account, pk=file).first()
    if received is None:
        raise NotFound("No such received file.", code="file_not_found")
    doc_type = own_type(user, type_id)
    clean = _clean_name(name, limit=DOCUMENT_NAME_MAX, what="document")
    if received.size is not None and received.size > settings.DOCBOT_MAX_FILE_BYTES:
        raise Unprocessable(
            "The file is larger than 20 MB.",
            code="file_too_large",
            details={"limit": settings.DOCBOT_MAX_FILE_BYTES},
        )
    existing = Document.objects.filter(user=user, type=doc_type, name=clean).first()
    if existing is not None:
        if existing.telegram_file_unique_id == received.file_unique_id:
            return existing
        raise Conflict(f"{clean!r} already exists in {doc_type.name}.", code="name_taken")
    try:
        with transaction.atomic():
            document = Document.objects.create(
                user=user,
                type=doc_type,
                name=clean,
                telegram_file_id=received.file_id,
                telegram_file_unique_id=received.file_unique_id,
                size=received.size,
                mime_type=received.mime_type,
                file_name=received.file_name,
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
    """Rename `user`'s document and/or move it to another of their types, under the document
    row lock. Idempotent: the same values again save the same row. Raises `NotFound`
    (`document_not_found`, `type_not_found`), `ValidationFailed` (`name_empty`,
    `name_too_long`) and `Conflict` (`name_taken` in the target type)."""
    document = own_document(user, document_id, lock=True)
    if name is not None:
        document.name = _clean_name(name, limit=DOCUMENT_NAME_MAX, what="document")
    if type_id is not None:
        document.type = own_type(user, type_id)
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
    """Delete the row (under its lock) and, after commit, its stored object. Returns the
    document's name. A repeat is `NotFound` (`document_not_found`)."""
    document = own_document(user, document_id, lock=True)
    storage_name = document.storage_name
    name = document.name
    document.delete()
    if storage_name:
        transaction.on_commit(lambda: default_storage.delete(storage_name))
    return name


@transaction.atomic
def document_ingest_retry(*, document_id: int) -> Document:
    """Send a failed document through ingestion again (an operator's retry, from the console):
    the row goes back to `pending` with a conditional update from `failed` (so two retries at
    once enqueue once) and the ingestion task is enqueued after commit, fetching the same
    Telegram file. Returns the document. Raises `NotFound` (`document_not_found`) and
    `Conflict` (`document_not_failed`) when it is pending or stored."""
    claimed = Document.objects.filter(pk=document_id, status=Document.Status.FAILED).update(
        status=Document.Status.PENDING
    )
    document = Document.objects.filter(pk=document_id).first()
    if document is None:
        raise NotFound("No such document.", code="document_not_found")
    if not claimed:
        raise Conflict(
            f"The document is {document.status}, not failed.", code="document_not_failed"
        )
    transaction.on_commit(lambda: _enqueue_ingest(document_id))
    logger.info("docbot_ingest_retry", document_id=document_id)
    return document
