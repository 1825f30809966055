"""Writes of the document vault, by topic: accounts and the service identity (`accounts`),
received files, types and documents (`documents`), ingestion (`ingest`), share links
(`sharing`), the polling lease (`polling`). Other code imports them from here."""

from docbot.services.accounts import (
    ServiceAccountRefused,
    service_account_ensure,
    service_account_rotate,
    service_token_check,
    service_token_default,
    service_token_issue,
    telegram_account_user,
)
from docbot.services.documents import (
    document_create,
    document_delete,
    document_ingest_retry,
    document_update,
    received_file_record,
    type_create,
    type_delete,
    type_rename,
)
from docbot.services.ingest import IngestOutcome, document_ingest, document_ingest_fail
from docbot.services.polling import poll_lease_claim, poll_lease_release
from docbot.services.sharing import ShareLink, share_link_create, share_link_resolve

__all__ = [
    "IngestOutcome",
    "ServiceAccountRefused",
    "ShareLink",
    "document_create",
    "document_delete",
    "document_ingest",
    "document_ingest_fail",
    "document_ingest_retry",
    "document_update",
    "poll_lease_claim",
    "poll_lease_release",
    "received_file_record",
    "service_account_ensure",
    "service_account_rotate",
    "service_token_check",
    "service_token_default",
    "service_token_issue",
    "share_link_create",
    "share_link_resolve",
    "telegram_account_user",
    "type_create",
    "type_delete",
    "type_rename",
]
