"""Writes of the document vault: accounts, types, documents, ingestion, share links."""

import hashlib
import re
import secrets
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
from django.utils.crypto import salted_hmac
from knox.crypto import hash_token
from knox.models import AuthToken
from knox.settings import CONSTANTS as knox_constants

from common.exceptions import (
    Conflict,
    NotFound,
    PermissionDenied,
    Unprocessable,
    ValidationFailed,
)
from docbot import metrics, selectors, telegram
from docbot.bot import texts
from docbot.models import (
    Document,
    DocumentType,
    IngestionFailure,
    ReceivedFile,
    ServiceAccount,
    TelegramAccount,
)

logger = structlog.get_logger(__name__)

TYPE_NAME_MAX = 64
DOCUMENT_NAME_MAX = 128
_SHARE_SALT = "docbot.share"
_SERVICE_TOKEN_SALT = "docbot.service-token"  # noqa: S105 - an HMAC key salt, not a secret
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


class ServiceAccountRefused(PermissionDenied):
    """The service identity (or the token offered for it) must not be used: the bot does not
    start, and the backend refuses to act for Telegram users with it."""

    code = "service_account_refused"


def _telegram_user_create(telegram_user_id: int) -> Any:
    """A fresh account for a Telegram id. The username is only a label: `tg<id>` when free,
    else a random suffix, so an existing account of that name is neither adopted nor in the
    way. The password is unusable: this account is reached only through the bot."""
    user_model = get_user_model()
    base = f"tg{telegram_user_id}"
    for name in (base, f"{base}-{secrets.token_hex(4)}", f"{base}-{secrets.token_hex(8)}"):
        if user_model._default_manager.filter(username__iexact=name).exists():
            continue
        try:
            with transaction.atomic():
                return user_model._default_manager.create_user(username=name)
        except IntegrityError:
            continue
    raise Conflict("Could not name the Telegram account.", code="telegram_account_name")


def telegram_account_user(*, telegram_user_id: int) -> Any:
    """The user behind a Telegram id, found by the `TelegramAccount` mapping (never by a
    username) and created on first contact; safe under concurrent calls."""
    found = selectors.telegram_account_user(telegram_user_id=telegram_user_id)
    if found is not None:
        return found
    try:
        with transaction.atomic():
            user = _telegram_user_create(telegram_user_id)
            TelegramAccount.objects.create(user=user, telegram_user_id=telegram_user_id)
            return user
    except IntegrityError:
        # Another request created the mapping first: use theirs.
        found = selectors.telegram_account_user(telegram_user_id=telegram_user_id)
        if found is None:
            raise
        return found


class _MadeConcurrently(Exception):
    """Another process made the service identity between our look and our insert."""


def _service_user_create() -> Any:
    """The service identity's user: named DOCBOT_SERVICE_USERNAME when no account has that
    name (case-insensitively), else that name with a random suffix. An account already holding
    the name is never adopted: it may be anyone's."""
    user_model = get_user_model()
    name = settings.DOCBOT_SERVICE_USERNAME
    squatter = user_model._default_manager.filter(username__iexact=name).first()
    if squatter is not None and selectors.is_service_account(user=squatter):
        raise _MadeConcurrently
    if squatter is not None:
        logger.warning(
            "docbot_service_name_taken",
            username=name,
            holder_user_id=squatter.pk,
            note="that account is not the service identity and gets no power from its name",
        )
        name = f"{name}-{secrets.token_hex(3)}"
    return user_model._default_manager.create_user(username=name)


def _service_account_sound(account: ServiceAccount) -> ServiceAccount:
    user = account.user
    if user.has_usable_password():
        raise ServiceAccountRefused(
            f"The docbot service account {user.get_username()!r} has a usable password, so "
            "anyone who learns it could act as every Telegram user. Run "
            "`manage.py docbot_service_account --rotate` (it removes the password and "
            "revokes the account's tokens).",
            code="service_account_has_password",
        )
    if not user.is_active:
        raise ServiceAccountRefused(
            f"The docbot service account {user.get_username()!r} is inactive.",
            code="service_account_inactive",
        )
    return account


def service_account_ensure() -> ServiceAccount:
    """The docbot service identity, created on the first call (safe under concurrent calls).

    Raises `ServiceAccountRefused` when the existing identity has a usable password or is
    inactive: a service account must not be able to log in."""
    account = selectors.service_account()
    if account is None:
        try:
            with transaction.atomic():
                account = ServiceAccount.objects.create(
                    user=_service_user_create(), token_salt=secrets.token_hex(32)
                )
            logger.info("docbot_service_account_created", user_id=account.user_id)
        except (IntegrityError, _MadeConcurrently):
            account = selectors.service_account()
            if account is None:
                raise
    return _service_account_sound(account)


def service_token_issue() -> str:
    """A new knox token of the service identity (created if missing), without expiry; hashed
    at rest, shown only here. Revoked only by `service_account_rotate`."""
    account = service_account_ensure()
    _, token = AuthToken.objects.create(user=account.user, expiry=None)
    return str(token)


@transaction.atomic
def service_account_rotate() -> str:
    """Revoke every token of the service identity (creating the identity if missing), make
    its password unusable again, change the key of the zero-setup token, and return one new
    non-expiring token. Processes still holding an old token get 401 until restarted."""
    if selectors.service_account() is None:
        service_account_ensure()
    account = ServiceAccount.objects.select_for_update().select_related("user").get()
    user = account.user
    if user.has_usable_password():
        user.set_unusable_password()
        user.save(update_fields=["password"])
    revoked, _ = AuthToken.objects.filter(user=user).delete()
    account.token_salt = secrets.token_hex(32)
    account.rotated_at = timezone.now()
    account.save(update_fields=["token_salt", "rotated_at"])
    _, token = AuthToken.objects.create(user=user, expiry=None)
    logger.info("docbot_service_account_rotated", user_id=user.pk, tokens_revoked=revoked)
    return str(token)


def service_token_default() -> str:
    """The zero-setup service token (DOCBOT_SERVICE_TOKEN unset): derived from SECRET_KEY and
    the identity's `token_salt`, so every process of the installation computes the same one and
    a single non-expiring knox row serves them all (created here if missing; idempotent).

    Raises `ServiceAccountRefused` as `service_account_ensure` does."""
    account = service_account_ensure()
    token = salted_hmac(_SERVICE_TOKEN_SALT, account.token_salt, algorithm="sha256").hexdigest()
    AuthToken.objects.get_or_create(
        digest=hash_token(token),
        defaults={
            "user": account.user,
            "token_key": token[: knox_constants.TOKEN_KEY_LENGTH],
            "expiry": None,
        },
    )
    return token


def service_token_check(*, token: str) -> ServiceAccount:
    """The service identity a configured token (DOCBOT_SERVICE_TOKEN) belongs to.

    Raises `ServiceAccountRefused` naming the problem: unknown or expired token, a token of an
    account that is not the service identity (whatever its name), or an identity that has a
    usable password or is inactive."""
    found = AuthToken.objects.select_related("user").filter(digest=hash_token(token)).first()
    if found is None or (found.expiry is not None and found.expiry < timezone.now()):
        raise ServiceAccountRefused(
            "DOCBOT_SERVICE_TOKEN is not a valid token. Issue one with "
            "`manage.py docbot_service_account`.",
            code="service_token_invalid",
        )
    account = selectors.service_account()
    if account is None or account.user_id != found.user_id:
        raise ServiceAccountRefused(
            f"DOCBOT_SERVICE_TOKEN belongs to the account {found.user.get_username()!r}, which "
            "is not the docbot service identity (a name proves nothing). Issue a token with "
            "`manage.py docbot_service_account`.",
            code="service_token_not_service",
        )
    return _service_account_sound(account)


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
    for a file message it received from them). Idempotent on (user, `file_unique_id`): the same
    file sent again refreshes its `file_id` and keeps its id."""
    account = _telegram_account(user)
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


def _telegram_account(user: Any) -> TelegramAccount:
    account = selectors.telegram_account_of(user=user)
    if account is None:
        raise PermissionDenied(
            "Documents come from files sent to the Telegram bot; this account has no Telegram "
            "chat.",
            code="telegram_account_required",
        )
    return account


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
def document_create(*, user: Any, type_id: int, name: str, file: int) -> Document:
    """Create a pending document from a file the same Telegram user sent the bot (`file`, a
    `ReceivedFile` id: another user's is not found) and enqueue its ingestion after commit.
    The worker's notices go to that user's own private chat; neither the chat nor the Telegram
    file id is ever the caller's choice.

    A repeat of the same request (same user, type, name and file) returns the existing
    document and enqueues nothing."""
    account = _telegram_account(user)
    received = ReceivedFile.objects.filter(account=account, pk=file).first()
    if received is None:
        raise NotFound("No such received file.", code="file_not_found")
    doc_type = _own_type(user, type_id)
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
    owner_id, name = document.user_id, document.name
    transaction.on_commit(lambda: _notify(owner_id, texts.INGEST_FAILED.format(name=name)))


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
