"""Share links a person can read (issue 13, item 12): the link ends with the document's original
file name, the download is saved under it (a photo gets its document's name and `.jpg`), and
the bot says when the link expires as a date, a time with its zone and how far off it is. And
the API's token scheme (item 8): `Token` and `Bearer` both work for the docbot service token."""

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from django.test import Client

from docbot import schemas, services, texts
from docbot.models import Document
from tests.docbot.factories import stored_document, telegram_user

pytestmark = pytest.mark.usefixtures("eager_tasks")


@pytest.mark.parametrize(
    ("file_name", "name", "mime_type", "expected"),
    [
        ("passport scan.pdf", "Passport", "application/pdf", "passport scan.pdf"),
        ("", "Selfie", "image/jpeg", "Selfie.jpg"),
        ("", "Selfie.jpg", "image/jpeg", "Selfie.jpg"),
        ("", "Notes", "text/html\r\nX-Evil: 1", "Notes"),
        ("a/b\\c\r\n.pdf", "X", "application/pdf", "a_b_c__.pdf"),
        ("", "", "", "document"),
    ],
)
def test_the_download_name_is_the_original_file_name_cleaned(
    file_name: str, name: str, mime_type: str, expected: str
) -> None:
    assert schemas.download_name(file_name, name, mime_type) == expected


@pytest.mark.parametrize(
    ("ahead", "expected"),
    [
        (timedelta(hours=24), "2026-01-02 10:00 UTC, in 24 hours"),
        (timedelta(hours=2, minutes=10), "2026-01-01 12:10 UTC, in 2 hours"),
        (timedelta(minutes=30), "2026-01-01 10:30 UTC, in 30 minutes"),
        (timedelta(seconds=30), "2026-01-01 10:00 UTC, in a minute"),
        (timedelta(seconds=-5), "2026-01-01 09:59 UTC, already expired"),
    ],
)
def test_the_expiry_reads_as_a_date_time_zone_and_distance(ahead: timedelta, expected: str) -> None:
    now = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert texts.expiry(now + ahead, now) == expected


def test_a_share_link_ends_with_the_file_name_and_downloads_under_it(
    http: httpx.Client,
) -> None:
    owner = telegram_user(9701)
    document = stored_document(owner, name="Scan", content=b"%PDF named")
    Document.objects.filter(pk=document.pk).update(
        file_name="\u043f\u0430\u0441\u043f\u043e\u0440\u0442 1.pdf"
    )
    link = services.share_link_create(user=owner, document_id=document.pk)
    assert link.file_name == "\u043f\u0430\u0441\u043f\u043e\u0440\u0442 1.pdf"
    assert unquote(link.url).endswith(f"/docbot/files/{link.token}/{link.file_name}")
    response = http.get("/" + link.url.split("/", 3)[3])
    assert response.status_code == 200
    assert response.content == b"%PDF named"
    assert response.headers["content-disposition"] == (
        "attachment; filename*=utf-8''%D0%BF%D0%B0%D1%81%D0%BF%D0%BE%D1%80%D1%82%201.pdf"
    )
    # The name in the link is for people: the server sends the document's own name.
    renamed = http.get(f"/docbot/files/{link.token}/other.exe")
    assert renamed.status_code == 200
    assert "other.exe" not in renamed.headers["content-disposition"]


def test_a_photo_downloads_as_its_document_name_with_jpg(http: httpx.Client) -> None:
    owner = telegram_user(9702)
    document = stored_document(owner, name="Selfie", content=b"\xff\xd8jpeg")
    Document.objects.filter(pk=document.pk).update(file_name="", mime_type="image/jpeg")
    link = services.share_link_create(user=owner, document_id=document.pk)
    assert link.url.endswith("/Selfie.jpg")
    response = http.get(f"/docbot/files/{link.token}/Selfie.jpg")
    assert response.headers["content-disposition"] == 'attachment; filename="Selfie.jpg"'


@pytest.mark.parametrize("scheme", ["Token", "Bearer"])
def test_the_service_token_works_under_either_scheme_word(http: httpx.Client, scheme: str) -> None:
    owner = telegram_user(9703)
    stored_document(owner, name="Scan")
    token = services.service_token_issue()
    headers = {"Authorization": f"{scheme} {token}", "X-Telegram-User-Id": "9703"}
    response = http.get("/api/docbot/documents/", headers=headers)
    assert response.status_code == 200
    assert [d["name"] for d in response.json()["results"]] == ["Scan"]
    share = http.post(f"/api/docbot/documents/{Document.objects.get().pk}/share", headers=headers)
    assert share.json()["file_name"] == "Scan.pdf"


@pytest.mark.django_db
def test_the_docbot_scheme_in_the_api_docs_names_both_words() -> None:
    schema: dict[str, Any] = Client().get("/api/schema/", HTTP_ACCEPT="application/json").json()
    scheme = schema["components"]["securitySchemes"]["docbotServiceToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "Token <token>" in scheme["description"]
    assert "Bearer <token>" in scheme["description"]
    assert "X-Telegram-User-Id" in scheme["description"]
