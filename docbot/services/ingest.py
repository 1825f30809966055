"""Ingestion: a pending document's file fetched from Telegram, hashed and stored, and its owner
told how it went (the Celery task `docbot.ingest_document` calls these)."""

import hashlib
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from docbot import selectors, telegram, texts
from docbot.models import Document, IngestionFailure

logger = structlog.get_logger(__name__)

_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class IngestOutcome:
    """What `document_ingest` did; `storage_name` is set only when it `stored` the file."""

    status: Literal["stored", "duplicate", "already_done", "gone"]
    storage_name: str = ""


def _notify(user_id: int, text: str) -> None:
    """Tell a document's owner, in their own private chat (their Telegram user id; accounts
    that are not Telegram users have no chat and are not told)."""
    chat_id = selectors.telegram_chat_of(user_id=user_id)
    if chat_id is None:
        logger.info("docbot_notify_skipped", user_id=user_id, reason="no telegram account")
        return
    try:
        telegram.send_message(chat_id, text)
    except Exception:
        logger.exception("docbot_notify_failed", chat_id=chat_id)


def _storage_path(document: Document, digest: str) -> str:
    original = document.file_name or document.name
    safe = _UNSAFE_FILE_CHARS.sub("_", original).strip("._")[:80] or "file"
    return f"docbot/{document.user_id}/{digest[:2]}/{digest[:16]}-{safe}"


def document_ingest(*, document_id: int) -> IngestOutcome:
    """Fetch a pending document's file from Telegram (Bot API `getFile`, then the file URL,
    streamed to a spooled temp file: memory up to 1 MiB, then disk; refused past
    DOCBOT_MAX_FILE_BYTES), hash it (SHA-256), store it through Django storage under a fresh
    name and mark the row stored; tell the user after commit.

    Idempotent: the row is re-read under its lock and only a `pending` row is stored, so a
    redelivered task creates nothing twice (`already_done`; a deleted row is `gone`). Same
    content already stored for the same user: the pending row is removed and the user is told
    the existing document's name (`duplicate`). Raises `TelegramUnavailable` (worth a retry)
    and `TelegramRejected` (the Bot API refused, or the file is too large)."""
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
        owner_id = document.user_id
        if twin is not None:
            twin_name = twin.name
            document.delete()
            transaction.on_commit(
                lambda: _notify(owner_id, texts.DUPLICATE.format(existing=twin_name))
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
        transaction.on_commit(lambda: _notify(owner_id, texts.STORED.format(name=name, size=size)))
    logger.info("docbot_document_stored", document_id=document_id, size=size, sha256=digest)
    return IngestOutcome("stored", storage_name)


@transaction.atomic
def document_ingest_fail(*, document_id: int, error: str) -> None:
    """Record why ingestion gave up (an `IngestionFailure` row, `error` cut to 4000
    characters, on every call), then, under the document row lock, mark a still-pending row
    failed and tell the user after commit: a repeat records again but tells nobody twice.
    Raises nothing of its own."""
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
    owner_id, name = document.user_id, document.name
    transaction.on_commit(lambda: _notify(owner_id, texts.INGEST_FAILED.format(name=name)))
