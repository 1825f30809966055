"""Share links: signed, expiring download links to a stored document."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.core import signing
from django.utils import timezone

from common.exceptions import Conflict, NotFound
from docbot import schemas
from docbot.models import Document
from docbot.services.documents import own_document

_SHARE_SALT = "docbot.share"


@dataclass(frozen=True)
class ShareLink:
    """`url` is DOCBOT_PUBLIC_BASE_URL + `/docbot/files/<token>/<file_name, percent-encoded>`
    (the name is for people and `curl -O`; `/docbot/files/<token>` alone opens it too);
    `expires_at` is aware UTC; `file_name` is what the download is saved as
    (`schemas.download_name`)."""

    url: str
    token: str
    expires_at: datetime
    file_name: str


def share_link_create(*, user: Any, document_id: int) -> ShareLink:
    """A signed link (`django.core.signing`, compressed, salted `docbot.share`) to `user`'s
    stored document, bound to its id and the first 16 hex digits of its SHA-256, valid for
    DOCBOT_SHARE_LINK_TTL_SECONDS. Nothing is written: every call makes a new link, and none
    can be revoked before it expires except by changing the content or deleting the document.

    Raises `NotFound` (`document_not_found`) and `Conflict` (`not_stored`) while ingestion is
    pending or after it failed."""
    document = own_document(user, document_id)
    if document.status != Document.Status.STORED:
        raise Conflict("The document is not stored yet.", code="not_stored")
    expires_at = timezone.now() + timedelta(seconds=settings.DOCBOT_SHARE_LINK_TTL_SECONDS)
    payload = {"d": document.pk, "h": document.sha256[:16], "e": int(expires_at.timestamp())}
    token = signing.dumps(payload, salt=_SHARE_SALT, compress=True)
    base = settings.DOCBOT_PUBLIC_BASE_URL.rstrip("/")
    file_name = schemas.download_name(document.file_name, document.name, document.mime_type)
    return ShareLink(
        url=f"{base}/docbot/files/{token}/{quote(file_name, safe='')}",
        token=token,
        expires_at=expires_at,
        file_name=file_name,
    )


def share_link_resolve(*, token: str) -> Document:
    """The stored document a link token points to. Read-only. Raises `NotFound`: `link_invalid`
    when forged or no longer matching the content, `link_expired` past its expiry."""
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
