from typing import Any

from docbot import services
from docbot.models import Document, DocumentType
from tests.factories import UserFactory


def telegram_user(telegram_user_id: int) -> Any:
    return services.telegram_account_user(telegram_user_id=telegram_user_id)


def stored_document(
    user: Any, *, name: str = "Scan", type_name: str = "Passport", content: bytes = b"x"
) -> Document:
    """A document already ingested (written straight to storage, as the task would)."""
    import hashlib

    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    doc_type = DocumentType.objects.filter(
        user=user, name=type_name
    ).first() or services.type_create(user=user, name=type_name)
    digest = hashlib.sha256(content).hexdigest()
    storage_name = default_storage.save(f"docbot/test/{digest[:8]}.bin", ContentFile(content))
    return Document.objects.create(
        user=user,
        type=doc_type,
        name=name,
        telegram_file_id=f"F-{digest[:8]}",
        status=Document.Status.STORED,
        size=len(content),
        sha256=digest,
        storage_name=storage_name,
        file_name=f"{name}.pdf",
        mime_type="application/pdf",
    )


__all__ = ["UserFactory", "stored_document", "telegram_user"]
