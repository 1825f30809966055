"""Per-user document vault fed by Telegram: accounts, document types, documents, failures."""

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower


class TelegramAccount(models.Model):
    """The Telegram identity behind a Quintet user (created on first contact with the bot)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="telegram_account"
    )
    telegram_user_id = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"tg:{self.telegram_user_id}"


class ServiceAccount(models.Model):
    """The docbot service identity: the one account whose token may act for Telegram users.

    Made only by `services.service_account_ensure` (the `docbot_service_account` command, or a
    bot process on the zero-setup default), never by registration and never found by username;
    its user has an unusable password. `token_salt` keys the zero-setup token and changes on
    rotation."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="docbot_service_account"
    )
    # At most one row: the identity is "the" service account, never one of several.
    singleton = models.BooleanField(default=True, unique=True, editable=False)
    token_salt = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(singleton=True), name="docbot_service_account_single"
            ),
        ]

    def __str__(self) -> str:
        return f"docbot service account (user {self.user_id})"


class ReceivedFile(models.Model):
    """A file a Telegram user sent the bot, recorded by the bot acting for that user: the only
    files a document can be made from, and only by that same user."""

    account = models.ForeignKey(
        TelegramAccount, on_delete=models.CASCADE, related_name="received_files"
    )
    file_id = models.CharField(max_length=256)
    file_unique_id = models.CharField(max_length=128)
    size = models.BigIntegerField(null=True, blank=True)
    mime_type = models.CharField(max_length=128, blank=True)
    file_name = models.CharField(max_length=255, blank=True)
    received_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account", "file_unique_id"], name="docbot_received_file_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.file_unique_id} from {self.account}"


class DocumentType(models.Model):
    """A user's own category (passport, insurance ...), unique per user case-insensitively."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="docbot_types"
    )
    name = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint("user", Lower("name"), name="docbot_type_unique_per_user_ci"),
        ]

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    """One stored file; `pending` until the ingestion task has fetched, hashed and stored it.
    Notices about it go to the owner's Telegram chat, looked up from `TelegramAccount` when
    sent (no chat is stored, so none can be chosen by a caller)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        STORED = "stored"
        FAILED = "failed"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="docbot_documents"
    )
    # RESTRICT, not PROTECT: deleting the user still cascades to both types and documents.
    type = models.ForeignKey(DocumentType, on_delete=models.RESTRICT, related_name="documents")
    name = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    telegram_file_id = models.CharField(max_length=256, blank=True)
    telegram_file_unique_id = models.CharField(max_length=128, blank=True)
    mime_type = models.CharField(max_length=128, blank=True)
    file_name = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    storage_name = models.CharField(max_length=512, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    stored_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "type", "name"], name="docbot_document_unique_name"
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=["pending", "stored", "failed"]),
                name="docbot_document_status_valid",
            ),
        ]
        indexes = [
            models.Index(
                "user", "type", models.F("created_at").desc(), name="docbot_doc_user_type_new"
            ),
            models.Index("user", Lower("name"), name="docbot_doc_user_name"),
            models.Index(fields=["user", "sha256"], name="docbot_doc_user_sha256"),
        ]

    def __str__(self) -> str:
        return self.name


class IngestionFailure(models.Model):
    """Why fetching or storing a document's file failed (the document id is kept, not a FK,
    so the record outlives a deleted document)."""

    document_id = models.BigIntegerField(db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    error = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"document {self.document_id}: {self.error[:60]}"


class PollerLease(models.Model):
    """Which `run_docbot --mode polling` process may call getUpdates for a bot, until when (the
    lease on the database, used without REDIS_URL; `services.poll_lease_claim`). One row per
    bot; times are the database's clock, so the processes need no clock agreement."""

    bot = models.CharField(max_length=64, unique=True)
    holder = models.CharField(max_length=128)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"bot {self.bot}: {self.holder} until {self.expires_at:%H:%M:%S}"
