"""The docbot admin over a real socket, as an operator's browser uses it (issue 13, item 7):
what the bot and the workers own cannot be written (403), and types and documents are added,
renamed, moved and deleted only through docbot's services, whose rules show (names cleaned,
unique per owner, a document only in its owner's types, a deleted document's file removed)."""

from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage

from docbot import services
from docbot.models import (
    Document,
    DocumentType,
    IngestionFailure,
    ReceivedFile,
    ServiceAccount,
    TelegramAccount,
)
from tests.admin_http import AdminSession
from tests.conftest import LiveServer
from tests.docbot.factories import stored_document, telegram_user
from tests.factories import StaffFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def operator(asgi_server: LiveServer, settings: Any, tmp_path: Path) -> AdminSession:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    return AdminSession(asgi_server.http_url, StaffFactory.create(is_superuser=True).username)


def test_what_the_bot_and_workers_own_refuses_every_admin_write(operator: AdminSession) -> None:
    owner = telegram_user(7001)
    document = stored_document(owner)
    received = services.received_file_record(user=owner, file_id="F-1", file_unique_id="U-1")
    services.service_account_ensure()
    services.document_ingest_fail(document_id=document.pk, error="Bot API said no")
    rows = {
        "serviceaccount": ServiceAccount.objects.get().pk,
        "telegramaccount": TelegramAccount.objects.get(telegram_user_id=7001).pk,
        "receivedfile": received.pk,
        "ingestionfailure": IngestionFailure.objects.get().pk,
    }
    attempts: dict[str, dict[str, Any]] = {"/admin/docbot/document/add/": {"name": "Forged"}}
    for table, pk in rows.items():
        attempts[f"/admin/docbot/{table}/add/"] = {"user": owner.pk}
        attempts[f"/admin/docbot/{table}/{pk}/change/"] = {"telegram_user_id": "1"}
        attempts[f"/admin/docbot/{table}/{pk}/delete/"] = {"post": "yes"}
    for path, data in attempts.items():
        response = operator.post_form(path, data, page="/admin/docbot/")
        assert response.status_code == 403, path
    for table, pk in rows.items():
        bulk = operator.post_form(
            f"/admin/docbot/{table}/",
            {"action": "delete_selected", "_selected_action": [pk], "post": "yes"},
        )
        assert bulk.status_code in {200, 302}, table
    assert ServiceAccount.objects.count() == 1
    assert TelegramAccount.objects.filter(telegram_user_id=7001, user=owner).exists()
    assert ReceivedFile.objects.filter(pk=received.pk).exists()
    assert IngestionFailure.objects.count() == 1
    for table in rows:
        assert operator.get(f"/admin/docbot/{table}/").status_code == 200


def test_types_are_added_renamed_and_deleted_through_the_service(operator: AdminSession) -> None:
    owner = telegram_user(7002)
    added = operator.post_form(
        "/admin/docbot/documenttype/add/", {"user": owner.pk, "name": "  Visa    docs "}
    )
    assert added.status_code == 302, added.text[:2000]
    doc_type = DocumentType.objects.get(user=owner)
    assert doc_type.name == "Visa docs"  # type_create collapsed the whitespace

    twin = operator.post_form(
        "/admin/docbot/documenttype/add/", {"user": owner.pk, "name": "visa DOCS"}
    )
    assert twin.status_code == 200
    assert "already have the type" in twin.text
    assert DocumentType.objects.filter(user=owner).count() == 1

    change = f"/admin/docbot/documenttype/{doc_type.pk}/change/"
    renamed = operator.post_form(change, {"name": " Travel   visas"})
    assert renamed.status_code == 302
    doc_type.refresh_from_db()
    assert doc_type.name == "Travel visas"

    stored_document(owner, type_name="Travel visas")
    refused = operator.post_form(
        f"/admin/docbot/documenttype/{doc_type.pk}/delete/", {"post": "yes"}
    )
    assert refused.status_code == 200  # the admin lists the documents that keep it
    assert DocumentType.objects.filter(pk=doc_type.pk).exists()

    empty = services.type_create(user=owner, name="Empty")
    gone = operator.post_form(f"/admin/docbot/documenttype/{empty.pk}/delete/", {"post": "yes"})
    assert gone.status_code == 302
    assert not DocumentType.objects.filter(pk=empty.pk).exists()


def test_documents_are_renamed_moved_and_deleted_through_the_service(
    operator: AdminSession,
) -> None:
    owner = telegram_user(7003)
    document = stored_document(owner, name="Scan", type_name="Passport")
    stored_document(owner, name="Copy", type_name="Passport", content=b"copy")
    elsewhere = services.type_create(user=telegram_user(7004), name="Someone else's")
    change = f"/admin/docbot/document/{document.pk}/change/"

    renamed = operator.post_form(change, {"name": "  Front   page ", "type": document.type_id})
    assert renamed.status_code == 302, renamed.text[:2000]
    document.refresh_from_db()
    assert document.name == "Front page"

    taken = operator.post_form(change, {"name": "Copy", "type": document.type_id})
    assert taken.status_code == 200
    assert "already exists" in taken.text
    foreign = operator.post_form(change, {"name": "Front page", "type": elsewhere.pk})
    assert foreign.status_code == 200
    assert "No such document type" in foreign.text
    document.refresh_from_db()
    assert (document.name, document.type_id) == ("Front page", document.type_id)
    assert document.type.user_id == owner.pk

    assert default_storage.exists(document.storage_name)
    deleted = operator.post_form(f"/admin/docbot/document/{document.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert not Document.objects.filter(pk=document.pk).exists()
    assert not default_storage.exists(document.storage_name)  # document_delete, after commit

    other = Document.objects.get(name="Copy")
    bulk = operator.post_form(
        "/admin/docbot/document/",
        {"action": "delete_selected", "_selected_action": [other.pk], "post": "yes"},
    )
    assert bulk.status_code == 302
    assert not Document.objects.exists()
    assert not default_storage.exists(other.storage_name)
